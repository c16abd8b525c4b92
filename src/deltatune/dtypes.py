"""Dtype names as every command and config spells them: `fp32 | bf16 | fp16`, with the aliases
`float32 | bfloat16 | float16` (and `float`, `half`) accepted everywhere. Light: imports torch only when a
`torch.dtype` is asked for."""

from __future__ import annotations

import argparse
import functools
import logging
import os
from typing import Any

NAMES = ("fp32", "bf16", "fp16")
ALIASES = {
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    "torch.float32": "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "torch.bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "torch.float16": "fp16",
}
HELP = "fp32, bf16 or fp16 (also float32, bfloat16, float16)"

logger = logging.getLogger(__name__)


def canonical(name: Any) -> str | None:
    """`"bfloat16"` -> `"bf16"`; None for a name that is no dtype."""
    return ALIASES.get(str(name).strip().lower()) if isinstance(name, str) else None


def argument(text: str) -> str:
    """An argparse `type=`: the canonical name, or a usage error listing the choices."""
    name = canonical(text)
    if name is None:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; use {HELP}")
    return name


def torch_dtype(name: str) -> Any:
    """The `torch.dtype` of a dtype name or alias."""
    import torch

    canon = canonical(name)
    if canon is None:
        raise ValueError(f"unknown dtype {name!r}; use {HELP}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[canon]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); without it, bf16 matmuls are emulated
    and typically several times slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = set()
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
        if flags:
            return bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
    except OSError:
        pass
    try:  # not Linux: ask torch (AVX512 CPUs before Cooper Lake have no bf16; Apple silicon has it)
        import platform

        import torch

        return platform.machine().lower() in ("arm64", "aarch64") or "AMX" in str(
            torch.backends.cpu.get_cpu_capability()
        )
    except Exception:
        return False


_warned: set[str] = set()


def warn_if_slow(name: str, device: str) -> bool:
    """Warn once per process when `name` is a slow choice on `device` (bf16 on a CPU without native bf16).
    Returns whether it warned. `DELTATUNE_NO_DTYPE_WARNING=1` silences it."""
    if (
        canonical(name) != "bf16"
        or not str(device).startswith("cpu")
        or cpu_has_native_bf16()
        or os.environ.get("DELTATUNE_NO_DTYPE_WARNING")
        or "bf16-cpu" in _warned
    ):
        return False
    _warned.add("bf16-cpu")
    logger.warning(
        "warning: bf16 on this CPU is emulated (no AVX512-BF16/AMX): expect it to be several times slower "
        "than fp32; use fp32 (precision=fp32 base_dtype=fp32) unless you need the memory"
    )
    return True
