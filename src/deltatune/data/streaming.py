"""Streaming: train on a file or a folder of shards without materializing it.

Rows are read one at a time (JSONL/text by byte offset, Parquet by row group), checked, tokenized and batched
as they come; nothing is written and only the current batch is held. The stream is read in file order (shard
after shard, in name order; shuffle the data beforehand if it is sorted), every epoch the same. Each batch
comes with the position just after its last example (shard, byte offset or row, line number), which a
checkpoint stores, so `--resume` seeks there and continues at the exact example.

Classification needs its label set up front (`labels:` in the config), since the stream is never read whole.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from deltatune.data import builtin as builtin_data
from deltatune.data.batching import Batcher, collate
from deltatune.data.cache import Datasets, load_datasets
from deltatune.data.packing import collate_packed
from deltatune.data.sources import Fields, iter_positions
from deltatune.data.tokenize import causal_format, encode_batch, label_map_of, normalize
from deltatune.errors import DataError

STREAM_MODES = ("padded", "packed", "padding_free")
logger = logging.getLogger(__name__)


@dataclass
class TrainStream:
    """Training data read as it is used (`Datasets.train` when `streaming: true`)."""

    source: str
    tokenizer: Any
    format: str
    """`classification`, `text`, `prompt-completion` or `messages`."""
    fields: Fields
    max_length: int
    label_map: dict[str, int] | None = None


def open_stream(
    source: str,
    tokenizer: Any,
    *,
    task: str,
    fields: Fields | None = None,
    max_length: int = 128,
    labels: list[str | int] | None = None,
) -> TrainStream:
    """A `TrainStream` of `source` (its first row is read, to tell its format)."""
    fields = fields or Fields()
    if task == "seq-cls":
        if not labels:
            raise DataError("streaming classification data needs the label set up front: set labels: [...]")
        return TrainStream(source, tokenizer, "classification", fields, max_length, label_map_of([], labels))
    first = next(iter_positions(source, fields), None)
    if first is None:
        raise DataError(f"{source}: no examples in it (is the file empty?)")
    fmt = causal_format(first[:2], fields)
    if fmt == "messages" and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source}: the tokenizer has no chat template, so 'messages' can't be rendered")
    return TrainStream(source, tokenizer, fmt, fields, max_length)


def load_stream(
    data: str,
    tokenizer: Any,
    *,
    task: str,
    eval_data: str | None = None,
    fields: Fields | None = None,
    max_length: int = 128,
    labels: list[str | int] | None = None,
    num_proc: int = 1,
) -> Datasets:
    """`Datasets` whose training data is a `TrainStream` of `data`; the eval data (small) is loaded and
    cached as usual."""
    train = open_stream(data, tokenizer, task=task, fields=fields, max_length=max_length, labels=labels)
    eval_data = eval_data or builtin_data.default_eval(data)
    evals: Any = []
    if eval_data is not None:
        evals = load_datasets(
            eval_data,
            tokenizer,
            task=task,
            fields=fields,
            max_length=max_length,
            labels=labels,
            num_proc=num_proc,
        ).train
    return Datasets(train, evals, train.label_map, train.format)


class StreamBatcher:
    """Batches straight from a `TrainStream` for one rank (see the module docs); `stream(state)` yields
    `(tensors, real tokens, position)` where `position` is what to merge into the training state."""

    def __init__(
        self,
        data: TrainStream,
        *,
        batch_size: int,
        mode: str = "padded",
        rank: int = 0,
        world: int = 1,
        pad_token_id: int = 0,
    ):
        if mode not in STREAM_MODES:
            raise ValueError(f"streaming batches are one of {STREAM_MODES}, not {mode!r}")
        self.data, self.mode, self.batch_size = data, mode, batch_size
        self.rank, self.world, self.pad_token_id = rank, world, pad_token_id
        self.skipped = 0  # examples left out in the pass being read (empty, or nothing to learn)
        self._told = False

    def __len__(self) -> int:
        return 0  # not known without reading the whole stream

    def _examples(self, start: list[int] | None) -> Iterator[tuple[dict[str, Any], list[int]]]:
        """(tokenized example, position after it) from `start` on, to the end of the stream."""
        d = self.data
        for where, record, position in iter_positions(d.source, d.fields, "train", start and tuple(start)):
            row = normalize((where, record), d.format, d.fields)
            if d.format == "classification" and row["label"] not in d.label_map:
                raise DataError(
                    f"{where}: label {row['label']!r} is not one of the declared labels ({', '.join(d.label_map)})"
                )
            encoded = encode_batch(
                {k: [v] for k, v in row.items()},
                tokenizer=d.tokenizer,
                fmt=d.format,
                max_length=d.max_length,
                label_map=d.label_map,
            )
            if encoded["input_ids"]:
                yield {"input_ids": encoded["input_ids"][0], "labels": encoded["labels"][0]}, list(position)
            else:  # empty, or nothing to learn within max_length: left out, counted
                self.skipped += 1

    def _units(self, start: list[int] | None) -> Iterator[tuple[Any, list[int]]]:
        """Examples, or for `packed` rows of examples (filled in stream order until the next one doesn't fit),
        each with the position after its last example."""
        if self.mode != "packed":
            yield from self._examples(start)
            return
        row: list[dict[str, Any]] = []
        used, last = 0, start
        for example, position in self._examples(start):
            n = len(example["input_ids"])
            if row and used + n > self.data.max_length:
                yield row, last
                row, used = [], 0
            row.append(example)
            used, last = used + n, position
        if row:
            yield row, last

    def stream(self, state: dict) -> Iterator[tuple[dict[str, torch.Tensor], int, dict[str, Any]]]:
        """This rank's batches from the position in `state` (`epoch`, `stream`) on, epoch after epoch."""
        epoch, start, index = state.get("epoch", 0), state.get("stream"), state.get("batch", 0)
        group = self.batch_size * self.world  # a global batch: every rank reads all of it, takes its share
        while True:
            units, seen, whole = [], 0, start is None
            self.skipped = 0
            for unit, position in self._units(start):
                units.append(unit)
                if len(units) == group:
                    index += 1
                    yield *self._collate(units), {"epoch": epoch, "batch": index, "stream": position}
                    units = []
                seen += 1
            if whole and self.skipped and not self._told and self.rank == 0:  # once, after a whole pass
                self._told = True
                logger.warning(
                    "%d example(s) of %s were empty or had nothing to learn within max_length=%d tokens; skipped",
                    self.skipped,
                    self.data.source,
                    self.data.max_length,
                )
            if units:  # the epoch's short last batch: after it, the next epoch starts
                yield *self._collate(units), {"epoch": epoch + 1, "batch": 0, "stream": None}
            elif seen == 0 and start is None:
                raise DataError(
                    f"{self.data.source}: no example to train on (all empty or too long to learn from)"
                )
            epoch, start, index = epoch + 1, None, 0

    def _collate(self, units: list[Any]) -> tuple[dict[str, torch.Tensor], int]:
        mine = units[self.rank :: self.world] or units[:1]  # a short last batch: no rank goes empty-handed
        if self.mode == "packed":
            return collate_packed(mine, self.pad_token_id), sum(len(e["input_ids"]) for r in mine for e in r)
        real = sum(len(e["input_ids"]) for e in mine)
        if self.mode == "padding_free":
            return collate_packed([mine], self.pad_token_id), real
        return collate(mine, self.pad_token_id), real


def make_batcher(
    train: Any,
    *,
    mode: str,
    batch_size: int,
    max_length: int,
    seed: int,
    rank: int,
    world: int,
    pad_token_id: int,
) -> Any:
    """A `StreamBatcher` for a `TrainStream`, else a `Batcher`: either way `.stream(state)` gives the batches."""
    if isinstance(train, TrainStream):
        return StreamBatcher(
            train, batch_size=batch_size, mode=mode, rank=rank, world=world, pad_token_id=pad_token_id
        )
    return Batcher(
        train,
        batch_size=batch_size,
        mode=mode,
        max_length=max_length,
        seed=seed,
        rank=rank,
        world=world,
        pad_token_id=pad_token_id,
    )
