"""OFT in PEFT's API and format: both directions against peft on decoders and an encoder, the same files,
merge parity, and PEFT's Cayley transform (Neumann series and exact)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft_interop import merge_parity, same_files_as_peft, saved_by_peft_loads_here, saved_here_loads_in_peft
from tiny_models import FAMILIES, ids, out

from deltatune import ConfigError, OFTConfig, get_peft_model

CASES = [
    ("opt", {"oft_block_size": 8}),  # PEFT's default targets (q_proj, v_proj)
    ("opt", {"r": 4, "oft_block_size": 0, "target_modules": ["q_proj", "fc2"], "use_cayley_neumann": False}),
    ("llama", {"oft_block_size": 16, "block_share": True}),
    ("bert", {"oft_block_size": 8, "task_type": "SEQ_CLS"}),
    (
        "bert",
        {"oft_block_size": 8, "task_type": "SEQ_CLS", "bias": "oft_only", "num_cayley_neumann_terms": 3},
    ),
]
IDS = ["opt-default", "opt-r-exact", "llama-shared", "bert-default", "bert-bias"]


@pytest.mark.parametrize(("family", "opts"), CASES, ids=IDS)
def test_saved_here_loads_in_peft(tmp_path, family, opts):
    saved_here_loads_in_peft(tmp_path, family, OFTConfig(**copy.deepcopy(opts)))


@pytest.mark.parametrize(("family", "opts"), CASES, ids=IDS)
def test_saved_by_peft_loads_here(tmp_path, family, opts):
    saved_by_peft_loads_here(tmp_path, family, peft.OFTConfig(**copy.deepcopy(opts)))


@pytest.mark.slow  # the round trips above already fail on a wrong key; this names it
@pytest.mark.parametrize(("family", "opts"), CASES[:4], ids=IDS[:4])
def test_same_files_as_peft(tmp_path, family, opts):
    same_files_as_peft(
        tmp_path, family, OFTConfig(**copy.deepcopy(opts)), peft.OFTConfig(**copy.deepcopy(opts))
    )


@pytest.mark.parametrize(("family", "opts"), [CASES[0], CASES[1], CASES[3]], ids=[IDS[0], IDS[1], IDS[3]])
def test_merge_parity_with_peft(tmp_path, family, opts):
    merge_parity(tmp_path, family, OFTConfig(**copy.deepcopy(opts)))


def test_starts_as_the_base_and_rotations_are_orthogonal():
    base = FAMILIES["opt"]()
    x = ids()
    plain = out(base, x)
    model = get_peft_model(base, OFTConfig(oft_block_size=8, use_cayley_neumann=False))
    torch.testing.assert_close(out(model, x), plain, atol=0, rtol=0)
    layer = model.base_model.model.decoder.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.oft_R["default"].weight.normal_(std=0.3)
    rot = layer.oft_R["default"].matrix()
    torch.testing.assert_close(rot @ rot.T, torch.eye(32), atol=1e-5, rtol=0)  # exact Cayley: orthogonal


def test_refusals():
    with pytest.raises(ConfigError, match="give either r \\(4\\) or oft_block_size \\(32\\)"):
        OFTConfig(r=4)
    with pytest.raises(ValueError, match="matched .* of type Conv1D, which can't be adapted"):
        get_peft_model(FAMILIES["gpt2"](), OFTConfig(oft_block_size=8, target_modules=["c_attn"]))
