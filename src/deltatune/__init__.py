"""deltatune: fine-tune pretrained transformers by learning a small delta next to a frozen base.

Every method of the founding article in one library — full, top-layer, bottleneck adapters (Houlsby,
Pfeiffer) and LoRA (also on a quantized base) — behind PEFT's API and on-disk format.
"""

from deltatune.config import (
    BottleneckConfig,
    ConfigError,
    FullFinetuneConfig,
    LoraConfig,
    TopLayersConfig,
)
from deltatune.model import PeftModel, get_peft_model

__version__ = "0.1.0"

__all__ = [
    "BottleneckConfig",
    "ConfigError",
    "FullFinetuneConfig",
    "LoraConfig",
    "PeftModel",
    "TopLayersConfig",
    "get_peft_model",
    "__version__",
]
