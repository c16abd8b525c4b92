"""The running batch's KV cache: preallocated per-layer buffers with one slot per row, so that joining and leaving
cost only the rows concerned.

Layout, for each layer: keys and values `[row_capacity, heads, column_capacity, head_dim]`; the active region is
rows `[0, n)` and columns `[start, end)`. Every row's tokens end at column `end` (left padding); `mask[row, col]`
says which columns are a row's real tokens. A decoding step writes column `end` of every row in place and then
advances `end` — nothing is copied (transformers' `DynamicCache` concatenates, i.e. copies the whole cache, at every
step). A row joins by writing its prefilled keys/values into the next free slot (its columns right-aligned to
`end`); a row leaves by moving the last rows into the holes (only those rows are copied) and dropping leading
columns that no row uses any more. The buffers are reallocated (doubling) only when rows or columns run out, and
freed when the batch runs dry.

Columns a row doesn't use are zero in its slot (they are masked out, but a stale NaN left behind by an earlier,
failed row would turn a masked score into NaN), so a slot is cleared when a row takes it.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


class _SlotLayer(DynamicLayer):
    """One layer's view of the shared buffers; `update` writes the new tokens at column `end` in place."""

    is_croppable = False

    def __init__(self, owner: RowCache, index: int):  # noqa: D107 (no super().__init__: keys/values are views)
        self.owner, self.index = owner, index
        self.is_initialized = True

    @property
    def keys(self) -> torch.Tensor:
        o = self.owner
        return o.k[self.index][: o.n, :, o.start : o.end]

    @property
    def values(self) -> torch.Tensor:
        o = self.owner
        return o.v[self.index][: o.n, :, o.start : o.end]

    def lazy_initialization(self, key_states, value_states) -> None:  # the owner allocates
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        o = self.owner
        q = key_states.shape[-2]
        if o.end + q > o.k[self.index].shape[2] or key_states.shape[0] != o.n:
            raise RuntimeError("RowCache.reserve() must be called before a forward over the running rows")
        k, v = o.k[self.index], o.v[self.index]
        k[: o.n, :, o.end : o.end + q] = key_states
        v[: o.n, :, o.end : o.end + q] = value_states
        return k[: o.n, :, o.start : o.end + q], v[: o.n, :, o.start : o.end + q]

    def get_seq_length(self) -> int:
        return self.owner.end - self.owner.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("a RowCache is reset by its owner")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a RowCache is not cropped")


class RowCache(Cache):
    """The KV cache of a running batch (see the module's docstring). `mask`, `positions` and the rows' order are
    the cache's: `select` reports the new order of the rows it keeps."""

    def __init__(self):
        super().__init__(layers=[])
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None  # [row_capacity, column_capacity], long
        # [row_capacity]: each row's next position (its token count)
        self.positions: torch.Tensor | None = None
        self.n = self.start = self.end = 0

    # ---- shape --------------------------------------------------------------------------------------------
    @property
    def width(self) -> int:
        return self.end - self.start

    def _reallocate(self, rows: int, left: int, right: int) -> None:
        """New buffers with room for `rows` rows, `left` free columns before the active region and `right` after;
        the active region is copied over."""
        width, n = self.width, self.n
        columns = left + width + right
        for buffers in (self.k, self.v):
            for i, old in enumerate(buffers):
                new = old.new_zeros(rows, old.shape[1], columns, old.shape[3])
                new[:n, :, left : left + width] = old[:n, :, self.start : self.end]
                buffers[i] = new
        mask = self.mask.new_zeros(rows, columns)
        mask[:n, left : left + width] = self.mask[:n, self.start : self.end]
        positions = self.positions.new_zeros(rows)
        positions[:n] = self.positions[:n]
        self.mask, self.positions = mask, positions
        self.start, self.end = left, left + width

    def reserve(self, tokens: int) -> None:
        """Make room for `tokens` more columns after `end`."""
        if self.end + tokens > self.mask.shape[1]:
            self._reallocate(self.mask.shape[0], 0, max(tokens, self.width + tokens, 32))

    # ---- rows ---------------------------------------------------------------------------------------------
    def join(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        """Add rows from a prefill: per layer `(keys, values)` `[m, heads, p, head_dim]`, left-padded as `mask`
        `[m, p]` says; they take slots `n .. n+m-1`."""
        m, p = mask.shape
        mask = mask.to(pairs[0][0].device)
        if not self.k:  # the first rows (or the first since the batch ran dry): buffers their size, and room
            self.k = [k.new_zeros(m, k.shape[1], p + 32, k.shape[3]) for k, _ in pairs]
            self.v = [v.new_zeros(m, v.shape[1], p + 32, v.shape[3]) for _, v in pairs]
            self.layers = [_SlotLayer(self, i) for i in range(len(pairs))]
            self.mask = mask.new_zeros(m, p + 32)
            self.positions = mask.new_zeros(m)
            self.n, self.start, self.end = 0, 0, p
        rows = self.mask.shape[0]
        grow_rows = self.n + m > rows
        need_left = p - self.width > self.start
        if grow_rows or need_left:
            self._reallocate(
                max(self.n + m, 2 * rows if grow_rows else rows),
                p - self.width + 8 if need_left else self.start,
                self.mask.shape[1] - self.end,
            )
        if p > self.width:  # the new rows are wider: open columns on the left (zero for the rows there)
            first = self.end - p
            for buffers in (self.k, self.v):
                for buf in buffers:
                    buf[: self.n, :, first : self.start] = 0
            self.mask[: self.n, first : self.start] = 0
            self.start = first
        lo, hi = self.n, self.n + m
        for (k, v), kb, vb in zip(pairs, self.k, self.v):
            kb[lo:hi, :, self.start : self.end - p] = 0
            vb[lo:hi, :, self.start : self.end - p] = 0
            kb[lo:hi, :, self.end - p : self.end] = k
            vb[lo:hi, :, self.end - p : self.end] = v
        self.mask[lo:hi, self.start : self.end - p] = 0
        self.mask[lo:hi, self.end - p : self.end] = mask
        self.positions[lo:hi] = mask.sum(1)
        self.n = hi

    def select(self, keep: list[int]) -> list[int]:
        """Keep only rows `keep` (indices into the current rows); returns the kept rows' old indices in their new
        order. Rows already in place stay; the others move into the holes (only they are copied)."""
        n = len(keep)
        kept = set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in keep if i >= n]
        order = list(range(n))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        if movers:
            device = self.mask.device
            dst = torch.tensor(holes, device=device)
            src = torch.tensor(movers, device=device)
            for buffers in (self.k, self.v):
                for buf in buffers:
                    buf[dst, :, self.start : self.end] = buf[src, :, self.start : self.end]
            self.mask[dst] = self.mask[src]
            self.positions[dst] = self.positions[src]
        self.n = n
        if (
            n == 0
        ):  # the batch ran dry: give the memory back (a burst's buffers can be large); the next join allocates
            self.k, self.v, self.layers, self.mask, self.positions = [], [], [], None, None
            self.start = self.end = 0
        else:  # leading columns no row uses any more are dropped
            used = self.mask[:n, self.start : self.end].any(0)
            self.start += int(used.long().argmax()) if bool(used.any()) else self.width
        return order

    # ---- a decoding step ----------------------------------------------------------------------------------
    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention mask `[n, width + 1]` and positions `[n, 1]` of a one-token step (room reserved)."""
        self.reserve(1)
        self.mask[: self.n, self.end] = 1
        return self.mask[: self.n, self.start : self.end + 1], self.positions[: self.n].view(-1, 1)

    def advance(self) -> None:
        """The step went through: its column is part of the cache now."""
        self.end += 1
        self.positions[: self.n] += 1

    def undo_step(self) -> None:
        """The step failed: its column (written by some layers, perhaps) is masked out again."""
        self.mask[: self.n, self.end] = 0

    def take(self, rows: list[int]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Copies of rows `rows`' keys/values and mask, as `join` takes them back (a paused row's cache): per layer
        `(keys, values)` `[m, heads, p, head_dim]` and `mask` `[m, p]`, `p` the columns these rows use."""
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask[:, self.start : self.end].any(0)
        first = self.start + (int(used.long().argmax()) if bool(used.any()) else self.width)
        pairs = [
            (
                k[:, :, first : self.end].index_select(0, index),
                v[:, :, first : self.end].index_select(0, index),
            )
            for k, v in zip(self.k, self.v)
        ]
        return pairs, mask[:, first : self.end]

    def row(self, i: int) -> DynamicCache:
        """A copy of row `i`'s cache, on its own (to retry a row alone)."""
        return DynamicCache(
            ddp_cache_data=[
                (
                    k[i : i + 1, :, self.start : self.end].clone(),
                    v[i : i + 1, :, self.start : self.end].clone(),
                )
                for k, v in zip(self.k, self.v)
            ]
        )
