"""PEFT's on-disk format, both directions: an adapter saved here loads in peft with the same outputs, and
an adapter saved by peft loads here with the same outputs (fp32, 1e-5)."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import FAMILIES, ids, out

from deltatune import LoraConfig, PeftModel, get_peft_model

# (family, options beyond r) — non-default options on every family, as the issue asks.
CASES = [
    ("gpt2", {"use_rslora": True}),
    (
        "gpt2",
        {"target_modules": ["c_attn", "c_fc"], "rank_pattern": {"c_fc": 2}, "alpha_pattern": {"c_attn": 3}},
    ),
    ("opt", {"target_modules": ["q_proj", "v_proj", "fc1"], "bias": "lora_only", "rank_pattern": {"fc1": 6}}),
    ("opt", {"target_modules": "all-linear", "use_dora": True}),
    ("opt", {"target_modules": ["q_proj", "embed_tokens"]}),
    (
        "llama",
        {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_rslora": True, "layers_to_transform": [1]},
    ),
    ("llama", {"modules_to_save": ["lm_head"], "bias": "all"}),
    ("bert", {"task_type": "SEQ_CLS", "bias": "lora_only"}),
    ("bert", {"task_type": "SEQ_CLS", "use_dora": True, "modules_to_save": ["pooler"]}),
]
IDS = [f"{fam}-{'-'.join(opts) or 'plain'}" for fam, opts in CASES]


def _randomize(model: torch.nn.Module) -> None:
    """Give trained-looking values to every trainable tensor so a wrong key or formula shows."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize(("family", "opts"), CASES, ids=IDS)
def test_saved_here_loads_in_peft(tmp_path, family, opts):
    base = FAMILIES[family]()
    reference_base = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **copy.deepcopy(opts)))
    _randomize(model)
    x = ids()
    ours = out(model, x)
    model.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(reference_base, tmp_path).eval()
    torch.testing.assert_close(out(theirs, x), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("family", "opts"), CASES, ids=IDS)
def test_saved_by_peft_loads_here(tmp_path, family, opts):
    base = FAMILIES[family]()
    reference_base = copy.deepcopy(base)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, **copy.deepcopy(opts)))
    _randomize(theirs)
    theirs.eval()
    x = ids()
    expected = out(theirs, x)
    theirs.save_pretrained(tmp_path)

    ours = PeftModel.from_pretrained(reference_base, tmp_path)
    torch.testing.assert_close(out(ours, x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("family", "opts"), CASES[:3] + CASES[7:8], ids=IDS[:3] + IDS[7:8])
def test_same_files_as_peft(tmp_path, family, opts):
    """Same tensor keys and shapes as peft writes for the same config, and a config peft reads as equal."""
    ours = get_peft_model(FAMILIES[family](), LoraConfig(r=4, lora_alpha=8, **copy.deepcopy(opts)))
    theirs = peft.get_peft_model(
        FAMILIES[family](), peft.LoraConfig(r=4, lora_alpha=8, **copy.deepcopy(opts))
    )
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    b = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}

    ours_cfg = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    theirs_cfg = peft.PeftConfig.from_pretrained(tmp_path / "theirs")
    for key in (
        "peft_type",
        "r",
        "lora_alpha",
        "bias",
        "use_rslora",
        "use_dora",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "task_type",
    ):
        assert getattr(ours_cfg, key) == getattr(theirs_cfg, key), key
    assert set(ours_cfg.target_modules) == set(theirs_cfg.target_modules)
    assert set(ours_cfg.modules_to_save or []) == set(theirs_cfg.modules_to_save or [])


def test_trainable_parameter_line_matches_peft(capsys):
    ours = get_peft_model(FAMILIES["bert"](), LoraConfig(r=4, task_type="SEQ_CLS", bias="lora_only"))
    theirs = peft.get_peft_model(
        FAMILIES["bert"](), peft.LoraConfig(r=4, task_type="SEQ_CLS", bias="lora_only")
    )
    ours.print_trainable_parameters()
    line_ours = capsys.readouterr().out
    theirs.print_trainable_parameters()
    assert line_ours == capsys.readouterr().out
    assert line_ours.startswith("trainable params: ")


def test_unknown_config_key_loads_with_warning(tmp_path, caplog):
    model = get_peft_model(FAMILIES["opt"](), LoraConfig(r=2))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["some_future_option"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING"):
        PeftModel.from_pretrained(FAMILIES["opt"](), tmp_path)
    assert "some_future_option" in caplog.text


def test_peft_feature_we_lack_is_refused(tmp_path):
    model = get_peft_model(FAMILIES["opt"](), LoraConfig(r=2))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["lora_bias"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lora_bias"):
        PeftModel.from_pretrained(FAMILIES["opt"](), tmp_path)
