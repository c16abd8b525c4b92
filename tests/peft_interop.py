"""Shared checks for a method against peft: files saved here load in peft and the reverse (outputs to 1e-5),
the same tensor keys and shapes as peft writes, and merge parity. Each method's test file passes its configs."""

from __future__ import annotations

import copy

import peft
import torch
from safetensors.torch import load_file
from tiny_models import FAMILIES, ids, out

from deltatune import PeftModel, get_peft_model


def randomize(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Give trained-looking values to every trainable tensor so a wrong key or formula shows."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def saved_here_loads_in_peft(tmp_path, family: str, ours_config) -> None:
    base = FAMILIES[family]()
    reference_base = copy.deepcopy(base)
    model = get_peft_model(base, ours_config)
    randomize(model)
    model.eval()
    x = ids()
    expected = out(model, x)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(reference_base, tmp_path).eval()
    torch.testing.assert_close(out(theirs, x), expected, atol=1e-5, rtol=0)


def saved_by_peft_loads_here(tmp_path, family: str, peft_config) -> None:
    base = FAMILIES[family]()
    reference_base = copy.deepcopy(base)
    theirs = peft.get_peft_model(base, peft_config)
    randomize(theirs)
    theirs.eval()
    x = ids()
    expected = out(theirs, x)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(reference_base, tmp_path)
    torch.testing.assert_close(out(ours, x), expected, atol=1e-5, rtol=0)


def same_files_as_peft(tmp_path, family: str, ours_config, peft_config) -> None:
    """The same tensor keys and shapes as peft writes for the same config."""
    get_peft_model(FAMILIES[family](), ours_config).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(FAMILIES[family](), peft_config).save_pretrained(tmp_path / "theirs")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def merge_parity(tmp_path, family: str, ours_config, *, tol: float = 1e-5) -> None:
    """Merged equals unmerged; unmerge and disable_adapter give the base back; the merged weights equal
    the ones peft merges from the same file."""
    base = FAMILIES[family]()
    reference_base = copy.deepcopy(base)
    ours = get_peft_model(base, ours_config)
    randomize(ours)
    ours.eval()
    x = ids()
    expected = out(ours, x)
    plain = out(reference_base, x)
    ours.save_pretrained(tmp_path)
    ours.merge_adapter()
    torch.testing.assert_close(out(ours, x), expected, atol=tol, rtol=0)
    with ours.disable_adapter():  # unmerging subtracts (or restores) the delta: the base again, to rounding
        torch.testing.assert_close(out(ours, x), plain, atol=1e-6, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(out(ours, x), expected, atol=1e-6, rtol=0)
    merged = ours.merge_and_unload()
    torch.testing.assert_close(out(merged, x), expected, atol=tol, rtol=0)
    theirs = peft.PeftModel.from_pretrained(reference_base, tmp_path).merge_and_unload()
    theirs_sd = theirs.state_dict()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, theirs_sd[k], atol=tol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
