"""Bottleneck adapters (Houlsby, Pfeiffer): placement, init, parameter counts, training, save/load, swapping,
mixed batches and bad input, on tiny random models of each supported family."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_families import (
    FAMILIES,
    LABELS,
    LAYERS,
    TASK,
    VOCAB,
    bert,
    gpt2,
    ids,
    llama,
    logits,
    train_briefly,
)
from torch import nn
from transformers import (
    ElectraConfig,
    ElectraForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from deltatune import BottleneckConfig, ConfigError, PeftModel, get_peft_model
from deltatune.checkpoint import CheckpointError
from deltatune.methods.bottleneck import BottleneckLayer

# Where each block's attention output and FFN output projections are, written out by hand.
SITES = {
    "bert": ("bert.encoder.layer.{}.attention.output.dense", "bert.encoder.layer.{}.output.dense"),
    "distilbert": (
        "distilbert.transformer.layer.{}.attention.out_lin",
        "distilbert.transformer.layer.{}.ffn.lin2",
    ),
    "gpt2": ("transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj"),
    "opt": ("model.decoder.layers.{}.self_attn.out_proj", "model.decoder.layers.{}.fc2"),
    "llama": ("model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj"),
}


def expected_sites(family: str, style: str) -> list[str]:
    attn, ffn = SITES[family]
    kinds = (attn, ffn) if style == "houlsby" else (ffn,)
    return [k.format(i) for i in range(LAYERS) for k in kinds]


def wrap(family: str, style: str = "houlsby", seed: int = 0, **kwargs) -> PeftModel:
    config = BottleneckConfig(style=style, reduction_factor=8, task_type=TASK[family], **kwargs)
    return get_peft_model(FAMILIES[family](seed), config).eval()


def randomize_adapters(model: nn.Module, seed: int = 5, scale: float = 0.3, head: bool = True) -> None:
    g = torch.Generator().manual_seed(seed)
    marks = (".adapter_", ".modules_to_save.") if head else (".adapter_",)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(m in name for m in marks):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def wrapped(model: nn.Module) -> dict[str, BottleneckLayer]:
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, BottleneckLayer)}


# ---- (1) init ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_zeros_init_leaves_output_unchanged(family, style):
    x = ids()
    base_out = logits(FAMILIES[family](), x)
    model = wrap(family, style)
    assert torch.equal(logits(model, x), base_out)
    # The adapters are in the forward path: giving them values (head untouched) changes the output.
    randomize_adapters(model, head=False)
    assert not torch.allclose(logits(model, x), base_out, atol=1e-4)


def test_bert_init_is_small_and_near_identity():
    model = wrap("bert", init="bert")
    layer = wrapped(model)["bert.encoder.layer.0.output.dense"]
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    for w in (down.weight, up.weight):
        assert 0.01 < w.std().item() < 0.03
    assert torch.count_nonzero(down.bias) == 0 and torch.count_nonzero(up.bias) == 0
    h = torch.randn(64, 32)
    rel = ((layer.adapt("default", h) - h).norm(dim=-1) / h.norm(dim=-1)).max().item()
    assert 0 < rel < 0.02


# ---- (2) parameter counts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_trainable_parameters_match_formula(family, style, capsys):
    base_total = sum(p.numel() for p in FAMILIES[family]().parameters())
    model = wrap(family, style)
    h, b = 32, 32 // 8
    per_adapter = 2 * h * b + h + b
    adapters = LAYERS * (2 if style == "houlsby" else 1) * per_adapter
    head = h * LABELS + LABELS if TASK[family] == "SEQ_CLS" else 0
    if family == "distilbert":
        head += h * h + h  # `pre_classifier` ends with "classifier": PEFT's suffix rule trains it too
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == adapters + head
    assert total == base_total + adapters + head  # the head's trained copy sits beside the frozen original
    model.print_trainable_parameters()
    assert f"trainable params: {adapters + head:,d}" in capsys.readouterr().out


# ---- (3) placement ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_input_is_the_projection_output_in_every_block(family, style):
    base = FAMILIES[family]()
    sites = expected_sites(family, style)
    originals = {name: base.get_submodule(name) for name in sites}
    model = get_peft_model(base, BottleneckConfig(style=style, reduction_factor=8, init="bert")).eval()
    layers = wrapped(model)
    assert sorted(layers) == sorted(sites)
    assert all(layers[n].base_layer is originals[n] for n in sites)

    proj_out, adapter_in, layer_out = {}, {}, {}
    hooks = []
    for name in sites:
        hooks.append(originals[name].register_forward_hook(lambda m, i, o, n=name: proj_out.setdefault(n, o)))
        down = layers[name].adapter_down["default"]
        hooks.append(down.register_forward_pre_hook(lambda m, i, n=name: adapter_in.setdefault(n, i[0])))
        hooks.append(layers[name].register_forward_hook(lambda m, i, o, n=name: layer_out.setdefault(n, o)))
    logits(model, ids())
    for hook in hooks:
        hook.remove()
    assert sorted(adapter_in) == sorted(sites)
    for name in sites:
        h = proj_out[name]
        assert torch.equal(adapter_in[name], h)
        # What the block receives is h + up(relu(down(h))), computed here by hand.
        layer = layers[name]
        down, up = layer.adapter_down["default"], layer.adapter_up["default"]
        expected = h + F.relu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias
        torch.testing.assert_close(layer_out[name], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("model_cls", "config", "attn", "ffn"),
    [
        (
            RobertaForSequenceClassification,
            RobertaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=40),
            "roberta.encoder.layer.{}.attention.output.dense",
            "roberta.encoder.layer.{}.output.dense",
        ),
        (
            ElectraForSequenceClassification,
            ElectraConfig(vocab_size=VOCAB, hidden_size=16, embedding_size=16, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=32, max_position_embeddings=32),
            "electra.encoder.layer.{}.attention.output.dense",
            "electra.encoder.layer.{}.output.dense",
        ),
        (
            MistralForCausalLM,
            MistralConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=32),
            "model.layers.{}.self_attn.o_proj",
            "model.layers.{}.mlp.down_proj",
        ),
        (
            Qwen2ForCausalLM,
            Qwen2Config(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, intermediate_size=32),
            "model.layers.{}.self_attn.o_proj",
            "model.layers.{}.mlp.down_proj",
        ),
    ],
)  # fmt: skip
def test_placement_table_covers_other_families(model_cls, config, attn, ffn):
    torch.manual_seed(0)
    base = model_cls(config).eval()
    x = ids()
    before = logits(base, x)
    model = get_peft_model(base, BottleneckConfig(style="houlsby", reduction_factor=4))
    assert sorted(wrapped(model)) == sorted(k.format(i) for i in range(2) for k in (attn, ffn))
    assert torch.equal(logits(model, x), before)


class Tiny(nn.Module):
    """A plain PyTorch model that deltatune has no table entry for."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"mix": nn.Linear(hidden, hidden), "proj": nn.Linear(hidden, hidden),
                           "up": nn.Linear(hidden, 2 * hidden), "down": nn.Linear(2 * hidden, hidden)})
            for _ in range(3)
        )  # fmt: skip
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        for block in self.blocks:
            x = x + block["proj"](torch.tanh(block["mix"](x)))
            x = x + block["down"](torch.relu(block["up"](x)))
        return self.head(x)


@pytest.mark.parametrize("non_linearity", ["relu", "gelu", "swish", "tanh"])
def test_user_patterns_on_an_unknown_model(non_linearity):
    torch.manual_seed(0)
    model = get_peft_model(
        Tiny(),
        BottleneckConfig(
            reduction_factor=4,
            init="bert",
            non_linearity=non_linearity,
            attention_output_modules=r"blocks\.\d+\.proj",
            ffn_output_modules=["down"],
        ),
    )
    assert sorted(wrapped(model)) == sorted(f"blocks.{i}.{k}" for i in range(3) for k in ("proj", "down"))
    layer = wrapped(model)["blocks.1.down"]
    act = {"relu": torch.relu, "gelu": F.gelu, "swish": lambda t: t * torch.sigmoid(t), "tanh": torch.tanh}
    x = torch.randn(5, 32)
    h = layer.base_layer(x)
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    expected = h + act[non_linearity](h @ down.weight.T + down.bias) @ up.weight.T + up.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


def test_hidden_size_is_the_projection_output_width():
    # A user pattern on Llama's up_proj (output 64 wide) gives a 64 // 8 = 8 bottleneck over 64 features.
    model = get_peft_model(
        llama(), BottleneckConfig(style="pfeiffer", reduction_factor=8, ffn_output_modules=["up_proj"])
    )
    layer = wrapped(model)["model.layers.0.mlp.up_proj"]
    assert tuple(layer.adapter_down["default"].weight.shape) == (8, 64)
    assert tuple(layer.adapter_up["default"].weight.shape) == (64, 8)
    assert sorted(wrapped(model)) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]


# ---- (4) training -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_lowers_loss_and_leaves_base_bit_identical(family, style):
    model = wrap(family, style)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapter_" in n}
    assert all(model.get_parameter(n).requires_grad for n in adapters)
    first, last = train_briefly(model, family, lr=3e-2)
    # Deterministic (eval mode, no dropout): a frozen or detached adapter would leave the loss exactly as it was.
    # Tiny random causal LMs move slowly (their tied 0.02-std head caps the logits), hence the small margin.
    assert last < first - 0.05
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(model.get_parameter(n), before) for n, before in adapters.items())


# ---- (5) save / load --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "style"), [("bert", "houlsby"), ("gpt2", "pfeiffer"), ("llama", "houlsby")]
)
def test_save_load_round_trip(family, style, tmp_path):
    model = wrap(family, style, non_linearity="gelu")
    randomize_adapters(model)
    x = ids()
    expected = logits(model, x)
    model.save_pretrained(tmp_path)

    saved = load_file(tmp_path / "adapter_model.safetensors")
    keys = {
        f"base_model.model.{site}.adapter_{which}.{t}"
        for site in expected_sites(family, style)
        for which in ("down", "up")
        for t in ("weight", "bias")
    }
    if TASK[family] == "SEQ_CLS":
        keys |= {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert set(saved) == keys
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["style"], config["non_linearity"]) == ("BOTTLENECK", style, "gelu")

    loaded = PeftModel.from_pretrained(FAMILIES[family](), tmp_path)
    assert torch.equal(logits(loaded, x), expected)
    assert not any(p.requires_grad for p in loaded.parameters())


# ---- several adapters -------------------------------------------------------------------------------------
def test_add_set_delete_adapters():
    model = wrap("gpt2", "houlsby")
    model.add_adapter(
        "ffn_only", BottleneckConfig(style="pfeiffer", reduction_factor=4, non_linearity="tanh")
    )
    randomize_adapters(model)
    x = ids()
    out_default = logits(model, x)
    model.set_adapter("ffn_only")
    out_other = logits(model, x)
    assert not torch.allclose(out_default, out_other)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".ffn_only." in n and ".mlp.c_proj." in n for n in trainable)

    model.delete_adapter("default")
    layers = wrapped(model)
    # The attention projections had only the deleted adapter: they are plain Conv1D layers again.
    assert sorted(layers) == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    assert all(layer.adapters == ["ffn_only"] for layer in layers.values())
    assert type(model.get_base_model().transformer.h[0].attn.c_proj).__name__ == "Conv1D"
    assert torch.equal(logits(model, x), out_other)


def test_disable_adapter_and_unload_give_the_base_output():
    x = ids()
    base_out = logits(bert(), x)
    model = wrap("bert", "houlsby")
    randomize_adapters(model)
    with model.disable_adapter():
        # The trained head copy is disabled too: exactly the base model.
        assert torch.equal(logits(model, x), base_out)
    assert not torch.allclose(logits(model, x), base_out)
    plain = model.unload()
    assert not any(isinstance(m, BottleneckLayer) for m in plain.modules())
    assert torch.equal(logits(plain, x), base_out)


# ---- (7) mixed batches ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "opt", "gpt2"])
def test_mixed_batch_equals_per_row_runs(family):
    model = wrap(family, "houlsby")
    model.add_adapter("b", BottleneckConfig(style="pfeiffer", reduction_factor=4, task_type=TASK[family]))
    randomize_adapters(model)
    names = ["b", "default", "__base__", "b", "default"]
    x = ids(batch=len(names))

    calls = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, i, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
        for n, m in model.named_modules()
        if ".adapter_down." in n
    ]
    mixed = logits(model, x, adapter_names=names)
    for hook in hooks:
        hook.remove()
    # One adapter call per group and layer, never one per row.
    assert calls and all(count == 1 for count in calls.values())

    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = logits(model, x[i : i + 1])
        else:
            model.set_adapter(name)
            alone = logits(model, x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)


# ---- (6) bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"style": "lin"}, "unknown style 'lin'"),
        ({"non_linearity": "sigmoid"}, "unknown non_linearity 'sigmoid'"),
        ({"init": "xavier"}, "unknown init 'xavier'"),
        ({"reduction_factor": 0}, "reduction_factor must be a positive integer"),
        ({"dropout": 1.0}, "dropout must be in"),
    ],
)
def test_bad_config_fails_at_config_time(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BottleneckConfig(**kwargs)


def test_reduction_factor_leaving_no_bottleneck_is_refused_and_model_untouched():
    base = bert()
    with pytest.raises(ValueError, match=r"bottleneck of size 0 for hidden size 32.*reduction_factor <= 32"):
        get_peft_model(base, BottleneckConfig(reduction_factor=64))
    assert not any(isinstance(m, BottleneckLayer) for m in base.modules())


def test_unknown_model_without_patterns_says_what_to_pass():
    with pytest.raises(ValueError, match=r"attention_output_modules and ffn_output_modules.*suffixes"):
        get_peft_model(Tiny(), BottleneckConfig())
    with pytest.raises(ValueError, match=r"pass ffn_output_modules \("):
        get_peft_model(Tiny(), BottleneckConfig(style="pfeiffer"))


def test_patterns_matching_nothing_or_a_non_linear_module_are_refused():
    with pytest.raises(ValueError, match=r"ffn_output_modules=\['nope'\] matched no module.*'down'"):
        get_peft_model(Tiny(), BottleneckConfig(style="pfeiffer", ffn_output_modules=["nope"]))
    with pytest.raises(ValueError, match=r"type LayerNorm; bottleneck adapters go on a linear"):
        get_peft_model(gpt2(), BottleneckConfig(style="pfeiffer", ffn_output_modules=["ln_2"]))
    with pytest.raises(ValueError, match="matched both"):
        get_peft_model(
            Tiny(), BottleneckConfig(attention_output_modules=["down"], ffn_output_modules=["down"])
        )


def test_loading_into_another_hidden_size_names_the_mismatch(tmp_path):
    model = wrap("bert", "houlsby")
    model.save_pretrained(tmp_path)
    small = bert(hidden=16)
    with pytest.raises(
        CheckpointError,
        match=r"bert\.encoder\.layer\.0\.attention\.output\.dense\.adapter_down\.default\.weight: "
        r"expected shape \(2, 16\), found \(4, 32\)",
    ):
        PeftModel.from_pretrained(small, tmp_path)
    assert not any(isinstance(m, BottleneckLayer) for m in small.modules())


def test_merge_and_unload_raises_a_clear_error_and_leaves_the_model_working():
    model = wrap("bert", "houlsby")
    randomize_adapters(model)
    x = ids()
    before = logits(model, x)
    with pytest.raises(ValueError, match=r"can't be merged.*non-linearity.*latency.*LoRA"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="can't be merged"):
        model.merge_adapter()
    assert len(wrapped(model)) == 2 * LAYERS
    assert type(model.get_base_model().classifier).__name__ == "ModulesToSave"
    assert torch.equal(logits(model, x), before)


class FrozenQuantLinear(nn.Linear):
    """Stands in for a frozen quantized linear (the merge path that dequantizes)."""

    is_quantized_linear = True


def test_merge_and_unload_on_a_quantized_base_raises_the_same_error():
    model = Tiny()
    for block in model.blocks:
        block["down"] = FrozenQuantLinear(32, 16)
    peft = get_peft_model(
        model, BottleneckConfig(style="pfeiffer", reduction_factor=4, ffn_output_modules=["down"])
    )
    with pytest.raises(ValueError, match=r"can't be merged.*LoRA"):
        peft.merge_and_unload(dtype=torch.float32)
