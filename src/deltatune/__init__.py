"""deltatune: fine-tune pretrained transformers by learning a small delta next to a frozen base.

Every method of the founding article in one library — full, top-layer, bottleneck adapters (Houlsby,
Pfeiffer) and LoRA (also on a quantized base) — behind PEFT's API and on-disk format.

`PeftModel` and `get_peft_model` (and torch with them) are imported on first use, so that `import deltatune`
and `deltatune --help` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltatune.config import (
    BottleneckConfig,
    ConfigError,
    FullFinetuneConfig,
    IA3Config,
    LoraConfig,
    OFTConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    TopLayersConfig,
    VeraConfig,
)

if TYPE_CHECKING:
    from deltatune.model import PeftModel, get_peft_model

__version__ = "0.1.0"

__all__ = [
    "BottleneckConfig",
    "ConfigError",
    "FullFinetuneConfig",
    "IA3Config",
    "LoraConfig",
    "OFTConfig",
    "PeftModel",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "TopLayersConfig",
    "VeraConfig",
    "get_peft_model",
    "__version__",
]

_LAZY = {"PeftModel": "deltatune.model", "get_peft_model": "deltatune.model"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
