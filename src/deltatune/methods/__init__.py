"""One small module per fine-tuning method.

Each method module offers the same few functions, which the wrapper (`deltatune.model`) calls:

- `inject_adapter(model, config, adapter_name, skip) -> list[str]`: put the method into the model in place
  (wrapping layers or only choosing what trains) and return the affected module names;
- `adapter_param_names(model, config, adapter_name) -> list[str]`: the parameters that train and are saved;
- `saved_key(name, adapter_name)` / `internal_key(key, adapter_name)`: parameter name <-> the key in the file.

Layers that a method wraps carry `is_delta_layer = True` and offer `adapters`, `active_adapters`,
`disabled`, `merged_adapters`, `set_active`, `delete`, `merge`, `unmerge` and `base_layer`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = {"LORA": "lora", "BOTTLENECK": "bottleneck", "TOP_LAYERS": "layers", "FULL": "layers"}


def method_for(peft_type: str) -> ModuleType:
    """The method module implementing `peft_type`."""
    if peft_type not in _MODULES:
        raise ValueError(f"unknown method {peft_type!r}; deltatune has {', '.join(_MODULES)}")
    return importlib.import_module(f"deltatune.methods.{_MODULES[peft_type]}")
