"""What every layer wrapper that holds adapters by name keeps the same way: which adapters it has, which are
active, and deleting one. (IA)^3, VeRA and OFT layers share it; each names the dicts that hold its adapters."""

from __future__ import annotations

from collections.abc import Iterable


class AdapterBookkeeping:
    """Mixin for a layer with `active_adapters`, `merged_adapters` and per-adapter dicts.

    `_adapter_holders`: attribute names of the `nn.ModuleDict`/`nn.ParameterDict`s keyed by adapter name (the
    first one's keys are the layer's adapters); `_adapter_extras`: plain dicts keyed by adapter name.
    """

    _adapter_holders: tuple[str, ...] = ()
    _adapter_extras: tuple[str, ...] = ()
    active_adapters: list[str]
    merged_adapters: list[str]

    @property
    def adapters(self) -> list[str]:
        return list(getattr(self, self._adapter_holders[0]))

    def set_active(self, names: Iterable[str]) -> None:
        have = getattr(self, self._adapter_holders[0])
        self.active_adapters = [n for n in names if n in have]

    def delete(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base; unmerge it before deleting it")
        for attr in self._adapter_holders:
            holder = getattr(self, attr)
            if name in holder:
                del holder[name]
        for attr in self._adapter_extras:
            getattr(self, attr).pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def reset_cache(self) -> None:
        """Nothing derived from the weights is kept."""
