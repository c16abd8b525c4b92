"""The validation split: examples held out of the *training* data for every automatic choice (the learning
rate of `lr: auto`, the step of early stopping) and, when no eval data is given, for the evaluation.

It is carved from the tokenized training examples after any eval split, so it can never contain an eval
example; an example whose tokens equal an eval example's (a duplicate row in the user's files) is moved back
to training rather than validated on. For classification the split is stratified: every label keeps its share
(at least one example of each label with two or more examples), so a small set does not lose a class.
"""

from __future__ import annotations

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
    interface (`len`, `[i]`, `[[i, j]]` as columns, `column`, `column_names`), so a reader reads only its rows.
    The indices are one NumPy array (8 bytes a row); no row is read until asked for."""

    def __init__(self, base: Any, indices: Any):
        import numpy as np

        if isinstance(base, Subset):  # a view of a view reads the memory map directly
            base, indices = base.base, base.indices[np.asarray(indices, dtype=np.int64)]
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.column_names = base.column_names

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            return self.base[self.indices[key].tolist()]
        if isinstance(key, (list, tuple)) or hasattr(key, "__array__"):
            return self.base[self.indices[list(key) if isinstance(key, tuple) else key].tolist()]
        return self.base[int(self.indices[key])]

    def __iter__(self):
        for i in self.indices.tolist():
            yield self.base[i]

    def column(self, name: str) -> Any:
        import numpy as np

        return np.asarray(self.base.column(name))[self.indices]

    def __repr__(self) -> str:
        return f"Subset({len(self)} of {self.base!r})"


def _class_ids(examples: Any) -> Any:
    """Each example's class id as a NumPy array (classification: an int `labels`), else None. Of
    memory-mapped examples only the first row and the labels column are read (no row becomes a dict)."""
    import numpy as np

    if not len(examples):
        return None
    if isinstance(examples, list):
        labels = [e["labels"] for e in examples]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            return None
        return np.asarray(labels, dtype=np.int64)
    if not hasattr(examples, "column"):
        return None
    first = examples[0]["labels"]
    if not isinstance(first, int) or isinstance(first, bool):
        return None  # causal LM: a list of token labels per example
    labels = np.asarray(examples.column("labels"))
    return labels.astype(np.int64) if labels.ndim == 1 and labels.dtype.kind in "iu" else None


def _lengths(examples: Any) -> Any:
    """Every example's token count: the `length` column of memory-mapped examples (no row is read)."""
    import numpy as np

    if hasattr(examples, "column") and "length" in examples.column_names:
        return np.asarray(examples.column("length"), dtype=np.int64)
    return np.fromiter((len(e["input_ids"]) for e in examples), dtype=np.int64, count=len(examples))


def _equal_to_excluded(examples: Any, candidates: Any, exclude: Any, chunk: int = 4096) -> list[int]:
    """Those of `candidates` (indices) whose `input_ids` equal an example of `exclude`. Only candidates of a
    length some excluded example has are read, `chunk` rows at a time."""
    import numpy as np

    banned = {tuple(e["input_ids"]) for e in (exclude if isinstance(exclude, list) else iter(exclude))}
    sizes = np.fromiter({len(t) for t in banned}, dtype=np.int64)
    candidates = candidates[np.isin(_lengths(examples)[candidates], sizes)]
    found = []
    for start in range(0, len(candidates), chunk):
        ids = candidates[start : start + chunk].tolist()
        rows = [examples[i] for i in ids] if isinstance(examples, list) else None
        ids_column = [r["input_ids"] for r in rows] if rows is not None else examples[ids]["input_ids"]
        found += [i for i, tokens in zip(ids, ids_column) if tuple(tokens) in banned]
    return found


def split_validation(
    examples: Any,
    fraction: float,
    seed: int,
    *,
    exclude: Any = None,
) -> tuple[Any, Any, ValidationSplit]:
    """(train, validation, description): hold out `fraction` of `examples`, chosen with `seed`.

    `examples` is a list of tokenized examples or memory-mapped `ArrowExamples`. Both parts are the same kind
    as the input: lists of the same example objects, or `Subset` views (index arrays) over the memory map, so
    no row is read or copied however many there are; of memory-mapped examples only the `labels` column
    (classification) and the `length` column are read. Classification examples (an int `labels`) are split
    per label; each label with at least two examples gives at least one to validation and keeps at least one
    for training. Both parts keep the input order. Examples whose `input_ids` equal one in `exclude` (the eval
    data) never go to validation (they train instead).

    Raises:
        DataError: the fraction is outside (0, 1), or it would leave nothing to train or validate on.
    """
    import numpy as np

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
    rng = np.random.default_rng(seed)
    held = np.zeros(n, dtype=bool)
    if stratified:
        for label in np.unique(labels):
            pool = np.flatnonzero(labels == label)
            if len(pool) < 2:
                continue  # a single example must train
            k = min(max(1, round(fraction * len(pool))), len(pool) - 1)
            held[rng.choice(pool, size=k, replace=False)] = True
    elif n > 1:
        held[rng.choice(n, size=min(max(1, round(fraction * n)), n - 1), replace=False)] = True
    dropped = 0
    if exclude is not None and len(exclude) and held.any():
        equal = _equal_to_excluded(examples, np.flatnonzero(held), exclude)
        held[equal] = False
        dropped = len(equal)
    count = int(held.sum())
    if not count or count >= n:
        raise DataError(
            f"val_fraction={fraction} of {n} training examples leaves "
            + ("no validation examples" if not count else "nothing to train on")
            + "; give more data, another val_fraction, or val_fraction=0 with a fixed lr and steps"
        )
    kept, chosen = np.flatnonzero(~held), np.flatnonzero(held)
    del held
    if isinstance(examples, list):
        train, val = [examples[i] for i in kept.tolist()], [examples[i] for i in chosen.tolist()]
    else:
        train, val = Subset(examples, kept), Subset(examples, chosen)
    info = ValidationSplit(
        rows=count,
        train_rows=n - count,
        fraction=fraction,
        stratified=stratified,
        seed=seed,
        dropped_duplicates=dropped,
    )
    return train, val, info
