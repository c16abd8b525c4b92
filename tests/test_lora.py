"""LoRA behaviour: merge parity, disabling, unloading, initializations, training, and targets."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import FAMILIES, bert_cls, gpt2, ids, llama, opt, out
from torch import nn

from deltatune import ConfigError, LoraConfig, PeftModel, get_peft_model
from deltatune.methods.lora import LoraEmbedding, LoraLinear


def _trained(model: nn.Module, seed: int = 3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama", "bert"])
@pytest.mark.parametrize("dora", [False, True])
def test_merge_parity(family, dora):
    """Same output with the adapter active, merged, unmerged, and after merge_and_unload (fp32)."""
    task = "SEQ_CLS" if family == "bert" else None
    model = _trained(
        get_peft_model(
            FAMILIES[family](),
            LoraConfig(r=4, lora_alpha=16, use_dora=dora, task_type=task, target_modules="all-linear"),
        )
    )
    x = ids()
    active = out(model, x)
    model.merge_adapter()
    torch.testing.assert_close(out(model, x), active, atol=1e-5, rtol=0)
    model.merge_adapter()  # idempotent: merging twice must not add the delta twice
    torch.testing.assert_close(out(model, x), active, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    model.unmerge_adapter()
    torch.testing.assert_close(out(model, x), active, atol=1e-5, rtol=0)
    plain = model.merge_and_unload()
    torch.testing.assert_close(out(plain, x), active, atol=1e-5, rtol=0)


def test_merge_formula_is_w_plus_scaled_ba():
    """W' = W + (alpha/r) B A, checked on the weight itself against a hand computation."""
    base = opt()
    w_before = base.model.decoder.layers[0].self_attn.q_proj.weight.detach().clone()
    model = _trained(get_peft_model(base, LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj"])))
    layer = model.base_model.model.decoder.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    merged = model.merge_and_unload()
    w_after = merged.model.decoder.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(w_after, w_before + (12 / 4) * b @ a, atol=1e-6, rtol=0)


def test_merge_parity_bf16():
    base = opt().to(torch.bfloat16)
    model = _trained(
        get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "fc1"]))
    )
    x = ids()
    active = out(model, x).float()
    model.merge_adapter()
    merged = out(model, x).float()
    model.unmerge_adapter()
    unmerged = out(model, x).float()
    scale = active.abs().max()
    assert (merged - active).abs().max() <= 0.05 * scale
    assert (unmerged - active).abs().max() <= 0.05 * scale
    assert model.merge_and_unload().model.decoder.layers[0].fc1.weight.dtype == torch.bfloat16


def test_disable_adapter_gives_base_output_exactly():
    base = llama()
    x = ids()
    expected = out(base, x)
    model = _trained(get_peft_model(base, LoraConfig(r=4, target_modules="all-linear")))
    assert not torch.allclose(out(model, x), expected)
    with model.disable_adapter():
        assert torch.equal(out(model, x), expected)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(out(model, x), expected, atol=1e-6, rtol=0)
    assert not torch.allclose(out(model, x), expected)


def test_merge_and_unload_leaves_no_trace():
    base = gpt2()
    keys = set(base.state_dict())
    model = _trained(get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn", "c_fc"])))
    plain = model.merge_and_unload()
    assert type(plain).__name__ == "GPT2LMHeadModel"
    assert set(plain.state_dict()) == keys
    assert not any("deltatune" in type(m).__module__ for m in plain.modules())
    assert all(p.requires_grad for p in plain.parameters())


def test_unload_restores_base_weights():
    base = opt()
    before = copy.deepcopy(base.state_dict())
    model = _trained(get_peft_model(base, LoraConfig(r=2)))
    model.merge_adapter()
    plain = model.unload()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)


def test_default_init_starts_unchanged_and_false_does_not():
    x = ids()
    base = opt()
    expected = out(base, x)
    assert torch.equal(out(get_peft_model(copy.deepcopy(base), LoraConfig(r=4)), x), expected)
    assert torch.equal(
        out(get_peft_model(copy.deepcopy(base), LoraConfig(r=4, init_lora_weights="gaussian")), x), expected
    )
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, init_lora_weights=False))
    assert not torch.allclose(out(model, x), expected)


def test_gaussian_init_std():
    model = get_peft_model(
        opt(hidden=256), LoraConfig(r=4, init_lora_weights="gaussian", target_modules=["fc1"])
    )
    a = model.base_model.model.decoder.layers[0].fc1.lora_A["default"].weight
    assert abs(a.std().item() - 1 / 4) < 0.02


def test_pissa_keeps_output_and_uses_top_svd():
    base = opt()
    w = base.model.decoder.layers[1].fc1.weight.detach().clone()
    x = ids()
    expected = out(base, x)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["fc1"])
    )
    torch.testing.assert_close(out(model, x), expected, atol=1e-5, rtol=0)
    layer = model.base_model.model.decoder.layers[1].fc1
    low_rank = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(low_rank, u[:, :4] @ torch.diag(s[:4]) @ vh[:4], atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.base_layer.weight + low_rank, w, atol=1e-5, rtol=0)


def test_rslora_scaling():
    model = get_peft_model(opt(), LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj"]))
    layer = model.base_model.model.decoder.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4)


def test_dora_output_matches_formula():
    """DoRA: y = m * (W + sBA) x / ||W + sBA||_row + b, computed by hand."""
    base = opt()
    model = _trained(
        get_peft_model(base, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["fc1"]))
    )
    layer = model.base_model.model.decoder.layers[0].fc1
    x = torch.randn(5, layer.in_features)
    w = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    m = layer.lora_magnitude_vector["default"]
    expected = (m / w.norm(dim=1)) * (x @ w.T) + layer.base_layer.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_conv1d_and_embedding_layers():
    model = _trained(get_peft_model(gpt2(), LoraConfig(r=2, target_modules=["c_attn", "wte"])))
    assert isinstance(model.base_model.transformer.h[0].attn.c_attn, LoraLinear)
    assert model.base_model.transformer.h[0].attn.c_attn.fan_in_fan_out
    assert isinstance(model.base_model.transformer.wte, LoraEmbedding)
    assert model.peft_config["default"].fan_in_fan_out  # set automatically for Conv1D, as PEFT does
    x = ids()
    active = out(model, x)
    torch.testing.assert_close(out(model.merge_and_unload(), x), active, atol=1e-5, rtol=0)


def test_embedding_lora_equals_hand_computation():
    emb = nn.Embedding(10, 6)
    model = _trained(get_peft_model(nn.Sequential(emb), LoraConfig(r=3, lora_alpha=6, target_modules=["0"])))
    layer = model.base_model[0]
    idx = torch.tensor([[1, 4, 9]])
    delta = (layer.lora_embedding_B["default"] @ layer.lora_embedding_A["default"]).T * 2.0
    torch.testing.assert_close(model(idx), layer.base_layer.weight[idx] + delta[idx], atol=1e-6, rtol=0)


def test_plain_pytorch_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model = _trained(get_peft_model(net, LoraConfig(r=2, target_modules=["0", "2"])))
    x = torch.randn(3, 8)
    y = model(x)
    torch.testing.assert_close(model.merge_and_unload()(x), y, atol=1e-6, rtol=0)


def test_training_lowers_loss_and_touches_only_lora():
    base = opt()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.train()
    opt_ = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    x = ids(batch=4, seq=12)
    losses = []
    for _ in range(25):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt_.step()
        opt_.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    for name, tensor in model.base_model.state_dict().items():
        clean = name.replace(".base_layer", "")
        if "lora_" not in name:
            assert torch.equal(tensor, frozen[clean]), name


def test_seq_cls_head_trains_and_is_saved(tmp_path):
    model = get_peft_model(bert_cls(), LoraConfig(r=2, task_type="SEQ_CLS"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.classifier.modules_to_save.default.weight" in trainable
    assert "base_model.classifier.original_module.weight" not in trainable
    _trained(model)
    model.save_pretrained(tmp_path)
    x = ids()
    loaded = PeftModel.from_pretrained(bert_cls(), tmp_path)
    torch.testing.assert_close(out(loaded, x), out(model, x), atol=1e-6, rtol=0)


# ---- targets --------------------------------------------------------------------------------------


def _targets(model: PeftModel) -> set[str]:
    return {n for n, m in model.base_model.named_modules() if isinstance(m, (LoraLinear, LoraEmbedding))}


@pytest.mark.parametrize(
    ("factory", "suffixes"),
    [
        (gpt2, {"c_attn"}),
        (opt, {"q_proj", "v_proj"}),
        (llama, {"q_proj", "v_proj"}),
        (bert_cls, {"query", "value"}),
    ],
)
def test_default_targets_per_architecture(factory, suffixes):
    model = get_peft_model(factory(), LoraConfig(r=2))
    names = _targets(model)
    assert {n.rsplit(".", 1)[-1] for n in names} == suffixes
    assert len(names) == 2 * len(suffixes)


def test_target_list_regex_all_linear_and_exclude():
    assert _targets(get_peft_model(opt(), LoraConfig(r=2, target_modules=["self_attn.q_proj"]))) == {
        "model.decoder.layers.0.self_attn.q_proj",
        "model.decoder.layers.1.self_attn.q_proj",
    }
    assert _targets(get_peft_model(opt(), LoraConfig(r=2, target_modules=r".*layers\.1\.fc\d"))) == {
        "model.decoder.layers.1.fc1",
        "model.decoder.layers.1.fc2",
    }
    all_linear = _targets(get_peft_model(opt(), LoraConfig(r=2, target_modules="all-linear")))
    assert len(all_linear) == 12 and "lm_head" not in all_linear
    excluded = _targets(
        get_peft_model(opt(), LoraConfig(r=2, target_modules="all-linear", exclude_modules=["fc1", "fc2"]))
    )
    assert len(excluded) == 8
    layer1 = _targets(get_peft_model(opt(), LoraConfig(r=2, layers_to_transform=1)))
    assert layer1 == {"model.decoder.layers.1.self_attn.q_proj", "model.decoder.layers.1.self_attn.v_proj"}


def test_rank_pattern_sets_per_module_rank():
    model = get_peft_model(
        opt(),
        LoraConfig(
            r=2,
            target_modules=["q_proj", "fc1"],
            rank_pattern={"fc1": 5},
            alpha_pattern={r"layers\.0\.self_attn\.q_proj": 7},
        ),
    )
    layers = model.base_model.model.decoder.layers
    assert layers[0].fc1.r["default"] == 5 and layers[0].self_attn.q_proj.r["default"] == 2
    assert (
        layers[0].self_attn.q_proj.lora_alpha["default"] == 7
        and layers[1].self_attn.q_proj.lora_alpha["default"] == 8
    )


# ---- bad input ------------------------------------------------------------------------------------


def test_target_that_matches_nothing_lists_modules():
    base = opt()
    with pytest.raises(ValueError, match=r"matched no module.*q_proj"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["query"]))
    assert not any(isinstance(m, LoraLinear) for m in base.modules())


def test_target_of_wrong_type_is_refused():
    with pytest.raises(ValueError, match="can't be adapted"):
        get_peft_model(opt(), LoraConfig(r=2, target_modules=["self_attn"]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": -3}, "r must be a positive integer"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"bias": "some"}, "unknown bias 'some'"),
        ({"task_type": "CLASSIFY"}, "unknown task_type 'CLASSIFY'"),
        ({"init_lora_weights": "xavier"}, "init_lora_weights"),
        ({"rank_pattern": {"q": 0}}, "rank_pattern"),
        ({"lora_alpha": 0}, "lora_alpha"),
    ],
)
def test_bad_config_fails_before_any_model(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_adapter_name_with_path_is_refused():
    with pytest.raises(ValueError, match="invalid adapter name"):
        get_peft_model(opt(), LoraConfig(r=2), adapter_name="../x")


def test_a_plain_string_target_that_names_modules_says_to_pass_a_list():
    # a string is a full-match regex (PEFT's rule), so "q_proj" matches no full name; the error says how to
    # match by name, and the list form then works
    with pytest.raises(ValueError, match=r"full-match regex .* target_modules=\['q_proj'\]\)"):
        get_peft_model(opt(), LoraConfig(r=2, target_modules="q_proj"))
    with pytest.raises(ValueError, match=r"matched no module to adapt\. Adaptable"):  # no hint: no such name
        get_peft_model(opt(), LoraConfig(r=2, target_modules="query"))
    assert get_peft_model(opt(), LoraConfig(r=2, target_modules=["q_proj"])).adapter_names == ["default"]


def test_the_modules_suggested_leave_out_the_parts_of_adapters_already_there():
    """Loading another architecture's adapter next to one listed 'base_layer' and the first adapter's name
    (its lora_A/lora_B entries) among the model's adaptable modules."""
    model = get_peft_model(opt(), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="spam")
    with pytest.raises(ValueError) as e:
        model.add_adapter("cls", LoraConfig(r=2, target_modules=["query"]))
    assert (
        "suffixes ['embed_positions', 'embed_tokens', 'fc1', 'fc2', 'k_proj', 'lm_head', 'out_proj', 'q_proj', "
        "'v_proj']; e.g. ['model.decoder.embed_tokens'" in str(e.value)
    )
