"""(IA)^3 in PEFT's API and format: both directions against peft on decoders and an encoder, the same files,
PEFT's default targets, merge parity."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft_interop import merge_parity, same_files_as_peft, saved_by_peft_loads_here, saved_here_loads_in_peft
from tiny_models import FAMILIES, ids, out

from deltatune import ConfigError, IA3Config, get_peft_model

CASES = [
    ("gpt2", {}),  # PEFT's defaults: c_attn and mlp.c_proj (Conv1D, feed-forward)
    ("opt", {"target_modules": ["q_proj", "v_proj", "fc2"], "feedforward_modules": ["fc2"]}),
    ("llama", {}),
    ("bert", {"task_type": "SEQ_CLS"}),
    (
        "bert",
        {
            "task_type": "SEQ_CLS",
            "target_modules": r".*\.(query|intermediate\.dense)",
            "feedforward_modules": ".*intermediate.*",
        },
    ),
]
IDS = ["gpt2-default", "opt-lists", "llama-default", "bert-default", "bert-regex"]


@pytest.mark.parametrize(("family", "opts"), CASES, ids=IDS)
def test_saved_here_loads_in_peft(tmp_path, family, opts):
    saved_here_loads_in_peft(tmp_path, family, IA3Config(**copy.deepcopy(opts)))


@pytest.mark.parametrize(("family", "opts"), CASES, ids=IDS)
def test_saved_by_peft_loads_here(tmp_path, family, opts):
    saved_by_peft_loads_here(tmp_path, family, peft.IA3Config(**copy.deepcopy(opts)))


@pytest.mark.slow  # the round trips above already fail on a wrong key; this names it
@pytest.mark.parametrize(("family", "opts"), CASES[:4], ids=IDS[:4])
def test_same_files_and_default_targets_as_peft(tmp_path, family, opts):
    same_files_as_peft(
        tmp_path, family, IA3Config(**copy.deepcopy(opts)), peft.IA3Config(**copy.deepcopy(opts))
    )


@pytest.mark.parametrize(("family", "opts"), [CASES[0], CASES[1], CASES[3]], ids=[IDS[0], IDS[1], IDS[3]])
def test_merge_parity_with_peft(tmp_path, family, opts):
    merge_parity(tmp_path, family, IA3Config(**copy.deepcopy(opts)))


def test_starts_as_the_base_and_refuses_mixed_batches():
    base = FAMILIES["opt"]()
    x = ids()
    plain = out(base, x)
    model = get_peft_model(base, IA3Config())
    torch.testing.assert_close(out(model, x), plain, atol=0, rtol=0)
    model.eval()
    with pytest.raises(ValueError, match="don't support mixed-adapter batches"):
        model(input_ids=x, adapter_names=["default"] * x.shape[0])


def test_config_checks():
    with pytest.raises(
        ConfigError, match="feedforward_modules \\['fc1'\\] must be a subset of target_modules"
    ):
        IA3Config(target_modules=["q_proj"], feedforward_modules=["fc1"])
    with pytest.raises(ValueError, match="no \\(IA\\)\\^3 default for model type None"):
        get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), IA3Config())
