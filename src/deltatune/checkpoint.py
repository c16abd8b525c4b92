"""Adapter files in PEFT's on-disk format, written atomically, read without unpickling.

A directory holds `adapter_config.json` and `adapter_model.safetensors` whose keys are
`base_model.model.<module path>.<tensor>` with the adapter name removed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."


class CheckpointError(ValueError):
    """An adapter file is missing, corrupt, or doesn't fit the model; the message says which and why."""


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` through a temp file in the same folder, then rename over it."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(path, write)


def atomic_save_tensors(
    path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save tensors as safetensors at `path`, atomically (a crash leaves the old file intact)."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=metadata or {"format": "pt"}))


def atomic_torch_save(path: str, obj: object) -> None:
    """`torch.save` through a temp file and rename (for optimizer state in training checkpoints)."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_adapter(directory: str, tensors: dict[str, torch.Tensor], config_dict: dict) -> None:
    """Write one adapter directory: weights first, then the config, each atomically."""
    os.makedirs(directory, exist_ok=True)
    atomic_save_tensors(os.path.join(directory, WEIGHTS_NAME), tensors)
    atomic_write_text(
        os.path.join(directory, "adapter_config.json"), json.dumps(config_dict, indent=2, sort_keys=True)
    )


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file, or a `.bin` with `torch.load(weights_only=True)` (never a full unpickle)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist")
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"{path} is corrupt or truncated ({e}); save the adapter again or restore the file"
            ) from e
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses arbitrary objects with an UnpicklingError, among others
        raise CheckpointError(
            f"{path} could not be read as a plain tensor file ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    return data


def load_adapter_weights(directory: str) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory (safetensors preferred, `.bin` read safely)."""
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return load_tensors(path)
    raise CheckpointError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {directory!r}")


def head_num_labels(tensors: dict[str, torch.Tensor]) -> int | None:
    """How many labels an adapter's classification head (`classifier`/`score`, saved with it) has, if any."""
    for head in ("classifier.weight", "score.weight", "classifier.out_proj.weight"):
        tensor = tensors.get(KEY_PREFIX + head)
        if tensor is not None and tensor.dim() == 2:
            return int(tensor.shape[0])
    return None


def check_shapes(expected: dict[str, torch.Size], found: dict[str, torch.Tensor], where: str) -> None:
    """Raise one error naming every missing, unexpected and mismatched key (nothing is loaded before)."""
    problems = []
    for key, tensor in found.items():
        if key not in expected:
            problems.append(f"  {key}: in the file, but the model has no such parameter")
        elif tuple(expected[key]) != tuple(tensor.shape):
            problems.append(f"  {key}: expected shape {tuple(expected[key])}, found {tuple(tensor.shape)}")
    for key in expected:
        if key not in found:
            problems.append(f"  {key}: missing from the file")
    if problems:
        raise CheckpointError(
            f"the adapter in {where} does not fit this model ({len(problems)} problem(s)); was it trained on "
            "another architecture or size?\n"
            + "\n".join(problems[:50])
            + ("\n  ..." if len(problems) > 50 else "")
        )
