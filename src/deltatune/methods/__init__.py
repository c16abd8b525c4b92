"""One small module per fine-tuning method, and `registry`, the one table of methods every command reads.

Each method module implements `registry.MethodModule` (inject, parameter names, key mapping, ...) and the
layers it wraps implement `registry.DeltaLayer`; see `deltatune.methods.registry`.
"""

from __future__ import annotations

from types import ModuleType


def method_for(peft_type: str) -> ModuleType:
    """The method module implementing `peft_type` (from the registry)."""
    from deltatune.methods import registry

    return registry.module_for(peft_type)
