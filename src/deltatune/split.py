"""The validation split: examples held out of the *training* data for every automatic choice (the learning
rate of `lr: auto`, the step of early stopping) and, when no eval data is given, for the evaluation.

It is carved from the tokenized training examples after any eval split, so it can never contain an eval
example; an example whose tokens equal an eval example's (a duplicate row in the user's files) is moved back
to training rather than validated on. For classification the split is stratified: every label keeps its share
(at least one example of each label with two or more examples), so a small set does not lose a class.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from deltatune.errors import DataError


@dataclass
class ValidationSplit:
    """What was held out, for the screen, the summary and the report."""

    rows: int
    """Validation examples."""
    train_rows: int
    """Training examples left."""
    fraction: float
    """The fraction asked for."""
    stratified: bool
    """Whether every label kept its share."""
    seed: int
    dropped_duplicates: int = 0
    """Examples equal to an eval example, kept out of the validation split (they train instead)."""

    def describe(self) -> str:
        how = "stratified by label" if self.stratified else "at random"
        text = (
            f"validation split: {self.rows} of {self.rows + self.train_rows} training examples "
            f"({self.fraction:.0%}, {how}, seed {self.seed}), held out of training"
        )
        if self.dropped_duplicates:
            text += f"; {self.dropped_duplicates} equal to eval examples were left in training"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "train_rows": self.train_rows,
            "fraction": self.fraction,
            "stratified": self.stratified,
            "seed": self.seed,
            "dropped_duplicates": self.dropped_duplicates,
        }


class Subset:
    """Rows `indices` of memory-mapped examples (`deltatune.data.ArrowExamples`), read through the same
    interface (`len`, `[i]`, `[[i, j]]` as columns, `column`, `column_names`), so training reads only its rows."""

    def __init__(self, base: Any, indices: list[int]):
        self.base, self.indices = base, list(indices)
        self.column_names = base.column_names

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            return self.base[[self.indices[i] for i in range(*key.indices(len(self)))]]
        if isinstance(key, (list, tuple)) or hasattr(key, "__array__"):
            return self.base[[self.indices[int(i)] for i in key]]
        return self.base[self.indices[key]]

    def __iter__(self):
        for i in self.indices:
            yield self.base[i]

    def column(self, name: str) -> Any:
        import numpy as np

        return np.asarray(self.base.column(name))[np.asarray(self.indices, dtype=np.int64)]

    def __repr__(self) -> str:
        return f"Subset({len(self)} of {self.base!r})"


def _rows(examples: Any, ids: list[int]) -> list[dict[str, Any]]:
    if isinstance(examples, list):
        return [examples[i] for i in ids]
    if not ids:
        return []
    columns = examples[list(ids)]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _class_ids(examples: Any) -> list[int] | None:
    """Each example's class id (classification: an int `labels`), else None; reads only the labels column of
    memory-mapped examples."""
    if not len(examples):
        return None
    if isinstance(examples, list):
        labels = [e["labels"] for e in examples]
    elif hasattr(examples, "column"):
        first = examples[0]["labels"]
        if not isinstance(first, int):
            return None
        labels = [int(v) for v in examples.column("labels")]
    else:
        return None
    return labels if all(isinstance(v, int) and not isinstance(v, bool) for v in labels) else None


def split_validation(
    examples: Any,
    fraction: float,
    seed: int,
    *,
    exclude: Any = None,
) -> tuple[Any, list[dict[str, Any]], ValidationSplit]:
    """(train, validation, description): hold out `fraction` of `examples`, chosen with `seed`.

    `examples` is a list of tokenized examples or memory-mapped `ArrowExamples`; the validation part is a
    list, the training part the same kind as the input (a `Subset` of memory-mapped examples). Classification
    examples (an int `labels`) are split per label; each label with at least two examples gives at least one
    to validation and keeps at least one for training. Both parts keep the input order. Examples whose
    `input_ids` equal one in `exclude` (the eval data) never go to validation (they train instead).

    Raises:
        DataError: the fraction is outside (0, 1), or it would leave nothing to train or validate on.
    """
    if not 0 < fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {fraction}")
    if not hasattr(examples, "__getitem__") or not hasattr(examples, "__len__"):
        raise DataError(
            "a validation split needs the training data in memory or cached, not streamed; give eval_data "
            "and a fixed lr and max_steps (no lr: auto, no early_stopping), or val_fraction=0"
        )
    n = len(examples)
    labels = _class_ids(examples)
    stratified = labels is not None
    rng = random.Random(seed)
    held: set[int] = set()
    if stratified:
        by_label: dict[int, list[int]] = defaultdict(list)
        for i, label in enumerate(labels):
            by_label[label].append(i)
        for label in sorted(by_label):
            pool = by_label[label]
            if len(pool) < 2:
                continue  # a single example must train
            k = min(max(1, round(fraction * len(pool))), len(pool) - 1)
            held.update(rng.sample(pool, k))
    elif n > 1:
        held.update(rng.sample(range(n), min(max(1, round(fraction * n)), n - 1)))
    dropped = 0
    if exclude is not None and len(exclude) and held:
        banned = {tuple(e["input_ids"]) for e in (exclude if isinstance(exclude, list) else iter(exclude))}
        order = sorted(held)
        for i, row in zip(order, _rows(examples, order)):
            if tuple(row["input_ids"]) in banned:
                held.discard(i)
                dropped += 1
    if not held or len(held) >= n:
        raise DataError(
            f"val_fraction={fraction} of {n} training examples leaves "
            + ("no validation examples" if not held else "nothing to train on")
            + "; give more data, another val_fraction, or val_fraction=0 with a fixed lr and steps"
        )
    kept = [i for i in range(n) if i not in held]
    val = _rows(examples, sorted(held))
    train = [examples[i] for i in kept] if isinstance(examples, list) else Subset(examples, kept)
    info = ValidationSplit(
        rows=len(val),
        train_rows=len(kept),
        fraction=fraction,
        stratified=stratified,
        seed=seed,
        dropped_duplicates=dropped,
    )
    return train, val, info
