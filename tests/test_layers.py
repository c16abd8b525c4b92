"""Full and top-layer fine-tuning: what trains (against closed-form counts), training, save/load, unloading
and bad input, on tiny random models of each supported family."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_families import (
    FAMILIES,
    FFN,
    LABELS,
    LAYERS,
    TASK,
    VOCAB,
    H,
    bert,
    gpt2,
    ids,
    logits,
    train_briefly,
)
from torch import nn
from transformers import (
    BertForSequenceClassification,
)

from deltatune import ConfigError, FullFinetuneConfig, PeftModel, TopLayersConfig, get_peft_model
from deltatune.checkpoint import CheckpointError

BLOCKS = {
    "bert": "bert.encoder.layer",
    "distilbert": "distilbert.transformer.layer",
    "gpt2": "transformer.h",
    "opt": "model.decoder.layers",
    "llama": "model.layers",
}
FINAL_NORM = {"gpt2": "transformer.ln_f", "opt": "model.decoder.final_layer_norm", "llama": "model.norm"}


def block_params(family: str) -> int:
    """One block's parameter count, written out from the architectures (h hidden, f FFN width)."""
    h, f = H, FFN
    if family in ("bert", "distilbert", "opt"):
        # q, k, v, out with biases; two LayerNorms; FFN in and out with biases.
        return 4 * (h * h + h) + 2 * 2 * h + (h * f + f) + (f * h + h)
    if family == "gpt2":
        # c_attn [h, 3h], c_proj [h, h], c_fc [h, 4h], c_proj [4h, h], all with biases; two LayerNorms.
        return (3 * h * h + 3 * h) + (h * h + h) + (4 * h * h + 4 * h) + (4 * h * h + h) + 2 * 2 * h
    # llama: q and o [h, h], k and v [h, 1 kv head of 16], gate/up/down [h, f], two RMSNorms; no biases.
    return 2 * h * h + 2 * h * 16 + 3 * h * f + 2 * h


def head_params(family: str) -> int:
    if family == "bert":
        return H * LABELS + LABELS
    if family == "distilbert":
        # `pre_classifier` ends with "classifier": PEFT's suffix rule makes it part of the trained head.
        return H * LABELS + LABELS + H * H + H
    return 0


def final_norm_params(family: str) -> int:
    return {"gpt2": 2 * H, "opt": 2 * H, "llama": H}.get(family, 0)


def perturb_trainable(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- what trains --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_finetuning_trains_everything(family, capsys):
    total = n_params(FAMILIES[family]())
    model = get_peft_model(FAMILIES[family](), FullFinetuneConfig(task_type=TASK[family]))
    assert model.get_nb_trainable_parameters() == (total, total)
    model.print_trainable_parameters()
    assert (
        f"trainable params: {total:,d} || all params: {total:,d} || trainable%: 100.0000"
        in capsys.readouterr().out
    )


@pytest.mark.parametrize("num_layers", [0, 1, 2])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_top_layers_trainable_count_matches_formula(family, num_layers):
    total = n_params(FAMILIES[family]())
    model = get_peft_model(FAMILIES[family](), TopLayersConfig(num_layers=num_layers, task_type=TASK[family]))
    expected = num_layers * block_params(family) + head_params(family) + final_norm_params(family)
    # The head trains as a copy beside the frozen original (as with LoRA's modules_to_save).
    assert model.get_nb_trainable_parameters() == (expected, total + head_params(family))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_top_layers_train_exactly_the_top_blocks_final_norm_and_head(family):
    model = get_peft_model(FAMILIES[family](), TopLayersConfig(num_layers=1, task_type=TASK[family]))
    trainable = {n.removeprefix("base_model.") for n, p in model.named_parameters() if p.requires_grad}
    base = FAMILIES[family]()
    prefixes = [f"{BLOCKS[family]}.{LAYERS - 1}."]
    if family in FINAL_NORM:
        prefixes.append(f"{FINAL_NORM[family]}.")
    expected = {n for n, _ in base.named_parameters() if n.startswith(tuple(prefixes))}
    if TASK[family] == "SEQ_CLS":
        heads = ["classifier", "pre_classifier"] if family == "distilbert" else ["classifier"]
        expected |= {f"{h}.modules_to_save.default.{t}" for h in heads for t in ("weight", "bias")}
    assert trainable == expected


def test_lm_head_trains_as_a_copy_and_the_tied_embedding_stays_frozen():
    model = get_peft_model(
        gpt2(), TopLayersConfig(num_layers=0, train_final_norm=False, modules_to_save=["lm_head"])
    )
    assert model.get_nb_trainable_parameters()[0] == VOCAB * H
    embeddings = model.get_input_embeddings().weight.detach().clone()
    x = ids()
    opt_ = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=x, labels=x).loss.backward()
    opt_.step()
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert not torch.equal(model.get_base_model().lm_head.modules_to_save["default"].weight, embeddings)


def test_final_norm_can_stay_frozen():
    model = get_peft_model(gpt2(), TopLayersConfig(num_layers=1, train_final_norm=False))
    assert model.get_nb_trainable_parameters()[0] == block_params("gpt2")
    assert not model.get_base_model().transformer.ln_f.weight.requires_grad


def test_explicit_blocks_module():
    class TwoLists(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
            self.bigger = nn.ModuleList([nn.Linear(4, 64)])
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.norm(x)

    model = get_peft_model(TwoLists(), TopLayersConfig(num_layers=2, blocks_module="blocks"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"base_model.{m}.{t}" for m in ("blocks.1", "blocks.2", "norm") for t in ("weight", "bias")
    }


# ---- training -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "config"),
    [
        ("bert", TopLayersConfig(num_layers=1)),
        ("bert", TopLayersConfig(num_layers=0)),
        ("gpt2", TopLayersConfig(num_layers=1)),
        ("llama", TopLayersConfig(num_layers=1)),
        ("bert", FullFinetuneConfig()),
        ("opt", FullFinetuneConfig()),
    ],
)
def test_training_lowers_loss_and_leaves_frozen_weights_bit_identical(family, config):
    config.task_type = TASK[family]
    model = get_peft_model(FAMILIES[family](), config).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    first, last = train_briefly(model, family, lr=1e-2)
    # Deterministic (eval mode): a model with nothing effectively training keeps exactly its loss.
    assert last < first - 0.05

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable  # every frozen weight is bit-identical
    if isinstance(config, FullFinetuneConfig):
        embeddings = model.get_input_embeddings().weight
        assert not torch.equal(
            embeddings, before[next(n for n, p in model.named_parameters() if p is embeddings)]
        )
    elif config.num_layers:
        top = f"base_model.{BLOCKS[family]}.{LAYERS - 1}."
        assert any(n.startswith(top) for n in changed)
        assert not any(n.startswith(f"base_model.{BLOCKS[family]}.0.") for n in changed)
    else:
        assert changed and all(".modules_to_save." in n for n in changed)


# ---- save / load --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "config"),
    [
        ("bert", TopLayersConfig(num_layers=1)),
        ("gpt2", TopLayersConfig(num_layers=1)),
        ("distilbert", TopLayersConfig(num_layers=0)),
        ("bert", FullFinetuneConfig()),
        ("gpt2", FullFinetuneConfig()),
    ],
)
def test_save_load_round_trip_saves_only_what_trained(family, config, tmp_path):
    config.task_type = TASK[family]
    model = get_peft_model(FAMILIES[family](), config).eval()
    perturb_trainable(model)
    x = ids()
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == config.peft_type

    saved = load_file(tmp_path / "adapter_model.safetensors")
    base_names = [n for n, _ in FAMILIES[family]().named_parameters()]
    if isinstance(config, FullFinetuneConfig):
        keys = set(base_names)
    else:
        prefixes = [f"{BLOCKS[family]}.{i}." for i in range(LAYERS - config.num_layers, LAYERS)]
        prefixes += [f"{FINAL_NORM[family]}."] if family in FINAL_NORM else []
        prefixes += ["classifier.", "pre_classifier."] if TASK[family] == "SEQ_CLS" else []
        keys = {n for n in base_names if n.startswith(tuple(prefixes))}
    assert set(saved) == {f"base_model.model.{k}" for k in keys}

    fresh = FAMILIES[family]()
    assert not torch.equal(logits(fresh, x), expected)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(logits(loaded, x), expected)
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("config", [TopLayersConfig(num_layers=1, task_type="SEQ_CLS"), FullFinetuneConfig()])
def test_merge_and_unload_returns_the_trained_plain_model(config):
    model = get_peft_model(bert(), config).eval()
    perturb_trainable(model)
    x = ids()
    expected = logits(model, x)
    plain = model.merge_and_unload()
    assert type(plain) is BertForSequenceClassification
    assert type(plain.classifier) is nn.Linear
    assert torch.equal(logits(plain, x), expected)
    other = get_peft_model(bert(), config)
    with pytest.raises(ValueError, match="no separate base"), other.disable_adapter():
        pass


# ---- bad input ------------------------------------------------------------------------------------------------
def test_num_layers_beyond_depth_names_the_depth():
    with pytest.raises(
        ValueError, match=r"num_layers=3 but the model has 2 blocks \(in 'bert\.encoder\.layer'\)"
    ):
        get_peft_model(bert(), TopLayersConfig(num_layers=3, task_type="SEQ_CLS"))


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_num_layers_fails_at_config_time(bad):
    with pytest.raises(ConfigError, match="num_layers must be a non-negative integer"):
        TopLayersConfig(num_layers=bad)


def test_blocks_not_found_says_how_to_pass_them():
    with pytest.raises(ValueError, match="could not find the model's transformer blocks.*blocks_module="):
        get_peft_model(
            nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), TopLayersConfig(num_layers=1)
        )
    with pytest.raises(
        ValueError, match=r"blocks_module='encoder' is not an nn.ModuleList.*'bert\.encoder\.layer'"
    ):
        get_peft_model(bert(), TopLayersConfig(num_layers=1, blocks_module="encoder"))


def test_feature_extraction_with_nothing_to_train_is_refused():
    model = nn.Sequential(nn.ModuleList([nn.Linear(4, 4)]))
    with pytest.raises(ValueError, match="would train nothing"):
        get_peft_model(model, TopLayersConfig(num_layers=0))


def test_full_finetuning_refuses_modules_to_save():
    with pytest.raises(ValueError, match="trains every module already"):
        get_peft_model(bert(), FullFinetuneConfig(modules_to_save=["classifier"]))


def test_loading_into_another_hidden_size_names_the_mismatch(tmp_path):
    get_peft_model(bert(), TopLayersConfig(num_layers=1, task_type="SEQ_CLS")).save_pretrained(tmp_path)
    with pytest.raises(
        CheckpointError,
        match=r"bert\.encoder\.layer\.1\.attention\.self\.query\.weight: expected shape \(16, 16\), "
        r"found \(32, 32\)",
    ):
        PeftModel.from_pretrained(bert(hidden=16), tmp_path)
