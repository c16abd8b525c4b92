"""The per-row adapter choice of a mixed-adapter batch, shared by every adapter layer of a forward pass.

The wrapper sets `MIXED` around a forward or generate call; each layer turns the row names into an
index into its own stack of adapters (slot 0 is "no adapter") once per distinct adapter set.
"""

from __future__ import annotations

from contextvars import ContextVar

import torch

BASE = "__base__"


class MixedBatch:
    """Which adapter each row of the batch uses (`"__base__"`: none)."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.name_set = frozenset(self.names)
        self._rows: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.names)

    def rows(self, slots: tuple[str, ...], device: torch.device) -> torch.Tensor:
        """Index of each row's adapter in `slots` (+1; 0 when the row's adapter is not in `slots`)."""
        key = (slots, device)
        if key not in self._rows:
            where = {n: i + 1 for i, n in enumerate(slots)}
            self._rows[key] = torch.tensor(
                [where.get(n, 0) for n in self.names], dtype=torch.long, device=device
            )
        return self._rows[key]

    def other_blocks(self, slots: tuple[str, ...], rank: int, device: torch.device) -> torch.Tensor:
        """`[rows, (len(slots)+1) * rank]`, True on the columns of a flattened stack that are not the row's own
        adapter's `rank` columns (its own: slot 0, the base, when its adapter is not in `slots`)."""
        key = ("other_blocks", slots, rank, device)
        if key not in self._rows:
            rows = self.rows(slots, device)
            other = rows[:, None] != torch.arange(len(slots) + 1, device=device)[None, :]
            self._rows[key] = other.repeat_interleave(rank, dim=1)
        return self._rows[key]

    def groups(self, known: set[str]) -> dict[str, list[int]]:
        """Row indices per adapter, for the adapters in `known` (others fall back to the base)."""
        out: dict[str, list[int]] = {}
        for i, n in enumerate(self.names):
            out.setdefault(n if n in known else BASE, []).append(i)
        return out


MIXED: ContextVar[MixedBatch | None] = ContextVar("deltatune_mixed_batch", default=None)


def rows_view(x: torch.Tensor, batch: int) -> torch.Tensor:
    """`x` as `[batch, tokens, features]`: every leading layout a layer sees keeps a row's tokens together
    (`[B, S, H]`, flattened `[B*S, H]` as in OPT's fc1/fc2, or beam-expanded `[B*k, S, H]`)."""
    if x.shape[0] % batch != 0:
        raise ValueError(
            f"a layer received {x.shape[0]} rows for a mixed batch of {batch}; adapter_names must have one entry "
            "per input row"
        )
    return x.reshape(batch, -1, x.shape[-1])
