"""Modules trained in full beside any method (a classification head, say): one copy per adapter.

Parameter names are PEFT's: `<module>.original_module.*` (frozen) and `<module>.modules_to_save.<adapter>.*`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable

import torch
from torch import nn

from deltatune import inject
from deltatune.methods.mixed import BASE, MIXED


class ModulesToSave(nn.Module):
    """Wraps a module; each adapter trains its own copy; the original stays untouched."""

    is_delta_layer = True
    supports_merge = True  # merging is a no-op: the active copy is the module
    supports_mixed_batch = True
    merges_into_weight = False

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.merged_adapters: list[str] = []

    @property
    def adapters(self) -> list[str]:
        return list(self.modules_to_save)

    @property
    def base_layer(self) -> nn.Module:
        return self.original_module

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self.modules_to_save[name].requires_grad_(True)
        self.set_active(self.active_adapters or [name])
        inject.tree_changed()  # the copy may hold adapter layers (of another adapter's target modules)

    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = [n for n in names if n in self.modules_to_save][:1]

    def delete(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
            inject.tree_changed()
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def merge(self, adapter_names: Iterable[str] | None = None) -> None:
        """Nothing to merge: the active copy simply is the module."""

    def unmerge(self) -> None:
        """Nothing to unmerge."""

    def reset_cache(self) -> None:
        """Nothing derived from the weights is kept."""

    def active_module(self) -> nn.Module:
        if self.disabled or not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    def forward(self, x: torch.Tensor, *args, **kwargs):
        mix = MIXED.get()
        if mix is None or self.disabled:
            return self.active_module()(x, *args, **kwargs)
        groups = mix.groups(set(self.modules_to_save))
        if len(groups) == 1:
            (name,) = groups
            module = self.original_module if name == BASE else self.modules_to_save[name]
            return module(x, *args, **kwargs)
        # Rows grouped by adapter: one call per group, not per row.
        per_row = x.shape[0] // len(mix)
        out = None
        for name, rows in groups.items():
            module = self.original_module if name == BASE else self.modules_to_save[name]
            idx = torch.tensor(rows, device=x.device)
            if per_row > 1:
                idx = (idx[:, None] * per_row + torch.arange(per_row, device=x.device)).reshape(-1)
            y = module(x[idx], *args, **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[idx] = y
        return out


def inject_modules(model: nn.Module, names: Iterable[str], adapter_name: str) -> list[str]:
    """Wrap every module whose name ends with one of `names` (PEFT's rule) and add `adapter_name`'s copy."""
    names = list(names)
    found = []
    for key, module in list(model.named_modules()):
        if not key or not any(key.endswith(n) for n in names):
            continue
        if (
            any(key.startswith(f"{f}.") for f in found)
            or ".modules_to_save." in key
            or key.endswith(".original_module")
        ):
            continue
        if not isinstance(module, ModulesToSave):
            if getattr(module, "is_delta_layer", False):
                continue
            module = ModulesToSave(module)
            inject.replace_module(model, key, module)
        if adapter_name not in module.modules_to_save:
            module.add(adapter_name)
        found.append(key)
    return found


def covered(name: str, names: Iterable[str]) -> bool:
    """Whether module `name` lies inside one of the `modules_to_save` (never adapt those)."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in names)


def is_adapter_param(name: str, adapter_name: str) -> bool:
    return f".modules_to_save.{adapter_name}." in name


def saved_key(name: str, adapter_name: str) -> str:
    return name.replace(f".modules_to_save.{adapter_name}.", ".")
