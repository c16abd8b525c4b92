"""Batches: collating examples into tensors, and which examples each batch (and each rank) gets."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from deltatune.data.packing import collate_packed, pack_bins
from deltatune.data.sources import IGNORE_INDEX


def collate(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example (right padding); padded label positions get -100."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        attention_mask[i, : len(e["input_ids"])] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if isinstance(examples[0]["labels"], int):
        batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
    else:
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
        batch["labels"] = labels
    return batch


class Batches(Sequence):
    """An epoch's batches of one rank: consecutive `batch_size` slices of an index array, made into lists
    only when asked for (a list of lists for 10^6 examples would cost ~50 MB)."""

    def __init__(self, order: np.ndarray, batch_size: int):
        self.order, self.batch_size = np.asarray(order, dtype=np.int64), batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.order[i * self.batch_size : (i + 1) * self.batch_size].tolist()

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Sequence)
            and len(self) == len(other)
            and all(a == b for a, b in zip(self, other))
        )

    def __repr__(self) -> str:
        return f"Batches({len(self)} of {self.batch_size})"


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1) -> Batches:
    """This rank's batches (example indices) for one epoch: a seeded shuffle, padded to a multiple of the
    world size by repeating its start (as `DistributedSampler` does), then every `world`-th index."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).numpy()
    order = np.concatenate([order, order[: (-n) % world]])
    return Batches(order[rank::world], batch_size)


def eval_batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This rank's eval batches in order; every rank gets the same number, padded with -1 (no example)."""
    order = list(range(n)) + [-1] * ((-n) % world)
    mine = order[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def batches_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """How many batches each rank gets per epoch."""
    return math.ceil(math.ceil(n / world) / batch_size)


# ---- the batches of a training run ----------------------------------------------------------------------
MODES = ("padded", "group_by_length", "packed", "padding_free")


def take(examples: Any, ids: list[int]) -> list[dict[str, Any]]:
    """The examples `ids` as dicts, from a list or (one read per batch) memory-mapped `ArrowExamples`."""
    if isinstance(examples, list):
        return [examples[i] for i in ids]
    columns = examples[list(ids)]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def example_lengths(examples: Any) -> np.ndarray:
    """Token count of every example (the `length` column of an Arrow-backed set: no row is read)."""
    if hasattr(examples, "column") and "length" in examples.column_names:
        return examples.column("length").astype(np.int64)
    return np.fromiter((len(e["input_ids"]) for e in examples), dtype=np.int64, count=len(examples))


def grouped_order(lengths: np.ndarray, group: int, epoch: int, seed: int) -> np.ndarray:
    """An epoch's order in which every run of `group` consecutive examples has similar lengths, yet random:
    a seeded shuffle, cut into chunks of 50 groups, each chunk sorted by length and cut into groups, and the
    groups shuffled (as transformers' `LengthGroupedSampler`, with the order of groups random too)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).numpy()
    chunk = group * 50
    groups = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        groups += [part[i : i + group] for i in range(0, len(part), group)]
    shuffled = torch.randperm(len(groups), generator=g).tolist()
    return np.concatenate([groups[i] for i in shuffled]) if groups else np.zeros(0, dtype=np.int64)


class Batcher:
    """The training batches of every epoch, for one rank, in one of `MODES`:

    - `padded`: a seeded shuffle, each batch padded to its longest example;
    - `group_by_length`: batches of similar lengths (`grouped_order`), so little padding;
    - `packed` (causal LM): examples packed into rows of `max_length` tokens (`packing.pack_bins`), a batch
      being `batch_size` rows; examples never see each other;
    - `padding_free` (causal LM): each batch of `batch_size` examples is one row, no padding at all.

    Every order is a function of `(seed, epoch)`, so a resumed run skips exactly the batches already seen.
    """

    def __init__(
        self,
        examples: Any,
        *,
        batch_size: int,
        mode: str = "padded",
        max_length: int = 0,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        pad_token_id: int = 0,
    ):
        if mode not in MODES:
            raise ValueError(f"batching mode {mode!r} is not one of {MODES}")
        self.examples, self.mode, self.batch_size = examples, mode, batch_size
        self.seed, self.rank, self.world, self.pad_token_id = seed, rank, world, pad_token_id
        self.lengths = example_lengths(examples) if mode != "padded" else None
        if mode == "packed":
            self.members, self.offsets = pack_bins(self.lengths, max_length)
            self.units = len(self.offsets) - 1
        else:
            self.units = len(examples)

    def __len__(self) -> int:
        """Batches per epoch on each rank."""
        return batches_per_epoch(self.units, self.batch_size, self.world)

    def epoch(self, epoch: int) -> Batches:
        """This rank's batches of `epoch` (indices of examples, or of packed rows)."""
        if self.mode != "group_by_length":
            return epoch_batches(self.units, self.batch_size, epoch, self.seed, self.rank, self.world)
        order = grouped_order(self.lengths, self.batch_size * self.world, epoch, self.seed)
        order = np.concatenate([order, order[: (-len(order)) % self.world]])
        return Batches(order[self.rank :: self.world], self.batch_size)

    def stream(self, state: dict) -> Iterator[tuple[dict[str, torch.Tensor], int, dict[str, int]]]:
        """`(tensors, real tokens, position)` from the position in `state` (`epoch`, `batch`) on; a resumed
        run skips exactly the batches the checkpointed run consumed."""
        epoch, start = state.get("epoch", 0), state.get("batch", 0)
        while True:
            batches = self.epoch(epoch)
            for i in range(start, len(batches)):
                yield *self.collate(batches[i]), {"epoch": epoch, "batch": i + 1}
            epoch, start = epoch + 1, 0

    def collate(self, ids: list[int]) -> tuple[dict[str, torch.Tensor], int]:
        """The tensors of one batch and its number of real (not padding) tokens."""
        if self.mode == "packed":
            rows = [self.members[self.offsets[r] : self.offsets[r + 1]].tolist() for r in ids]
            examples = take(self.examples, [i for row in rows for i in row])
            grouped, start = [], 0
            for row in rows:
                grouped.append(examples[start : start + len(row)])
                start += len(row)
            return collate_packed(grouped, self.pad_token_id), sum(len(e["input_ids"]) for e in examples)
        examples = take(self.examples, ids)
        real = sum(len(e["input_ids"]) for e in examples)
        if self.mode == "padding_free":
            return collate_packed([examples], self.pad_token_id), real
        return collate(examples, self.pad_token_id), real
