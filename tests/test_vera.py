"""VeRA in PEFT's API and format: both directions against peft on decoders and an encoder (with and without the
shared projections in the file), the same files, merge parity."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft_interop import merge_parity, same_files_as_peft, saved_by_peft_loads_here, saved_here_loads_in_peft
from tiny_models import FAMILIES, ids, out

from deltatune import PeftModel, VeraConfig, get_peft_model
from deltatune.errors import CheckpointError

CASES = [
    ("gpt2", {"r": 8}),  # Conv1D c_attn (PEFT's default)
    ("opt", {"r": 6, "target_modules": ["q_proj", "v_proj", "fc1", "fc2"], "projection_prng_key": 3}),
    ("llama", {"r": 4, "save_projection": False}),
    ("bert", {"r": 8, "task_type": "SEQ_CLS"}),
    (
        "bert",
        {
            "r": 4,
            "task_type": "SEQ_CLS",
            "target_modules": ["query", "intermediate.dense"],
            "bias": "vera_only",
        },
    ),
]
IDS = ["gpt2-default", "opt-mixed-shapes", "llama-no-projection", "bert-default", "bert-bias"]


@pytest.mark.parametrize(("family", "opts"), CASES, ids=IDS)
def test_saved_here_loads_in_peft(tmp_path, family, opts):
    saved_here_loads_in_peft(tmp_path, family, VeraConfig(**copy.deepcopy(opts)))


@pytest.mark.parametrize(("family", "opts"), CASES, ids=IDS)
def test_saved_by_peft_loads_here(tmp_path, family, opts):
    saved_by_peft_loads_here(tmp_path, family, peft.VeraConfig(**copy.deepcopy(opts)))


@pytest.mark.slow  # the round trips above already fail on a wrong key; this names it
@pytest.mark.parametrize(("family", "opts"), CASES[:4], ids=IDS[:4])
def test_same_files_and_projections_as_peft(tmp_path, family, opts):
    same_files_as_peft(
        tmp_path, family, VeraConfig(**copy.deepcopy(opts)), peft.VeraConfig(**copy.deepcopy(opts))
    )
    if opts.get("save_projection", True):  # the shared matrices are drawn exactly as PEFT draws them
        from safetensors.torch import load_file

        ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
        theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
        assert torch.equal(ours["base_model.vera_A"], theirs["base_model.vera_A"])
        assert torch.equal(ours["base_model.vera_B"], theirs["base_model.vera_B"])


@pytest.mark.parametrize(("family", "opts"), [CASES[0], CASES[1], CASES[3]], ids=[IDS[0], IDS[1], IDS[3]])
def test_merge_parity_with_peft(tmp_path, family, opts):
    merge_parity(tmp_path, family, VeraConfig(**copy.deepcopy(opts)))


def test_starts_as_the_base_and_few_parameters_train():
    base = FAMILIES["opt"]()
    x = ids()
    plain = out(base, x)
    model = get_peft_model(base, VeraConfig(r=16))
    torch.testing.assert_close(out(model, x), plain, atol=0, rtol=0)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 2 * 2 * (32 + 16)  # 2 layers x q/v x (lambda_b [out] + lambda_d [r])


def test_missing_projection_is_a_clear_error(tmp_path):
    model = get_peft_model(FAMILIES["opt"](), VeraConfig(r=4))
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    del tensors["base_model.vera_A"], tensors["base_model.vera_B"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="save_projection=true but its file has no base_model.vera_A"):
        PeftModel.from_pretrained(FAMILIES["opt"](), tmp_path)
