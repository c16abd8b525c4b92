"""The validation split of memory-mapped data is two index views: no row is read or copied to split it."""

from __future__ import annotations

import tracemalloc
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from deltatune.data.cache import ArrowExamples, _to_ipc_file
from deltatune.split import Subset, split_validation


def arrow_examples(tmp_path, lengths, labels) -> ArrowExamples:
    """A memory-mapped set as the cache writes it: example `i` is tokens `[i, i+1, ...]` of `lengths[i]`."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    tokens = np.concatenate([np.arange(i, i + k) for i, k in enumerate(lengths)]).astype(np.int32)
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens))
    if labels is None:  # causal LM: labels are the tokens
        labels = ids
    table = pa.table({"input_ids": ids, "labels": labels, "length": pa.array(lengths, pa.int32())})
    stream = str(tmp_path / "rows.arrow")
    with pa.OSFile(stream, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=10_000)
    path, lengths_path = str(tmp_path / "train.arrow"), str(tmp_path / "train.length.npy")
    _to_ipc_file([stream], path, lengths_path)
    return ArrowExamples(path, lengths_path)


@pytest.fixture
def reads(monkeypatch):
    """Every row index read from a memory map (`ArrowExamples._rows` is the only way rows are read)."""
    seen: list[int] = []
    original = ArrowExamples._rows

    def counting(self, ids):
        seen.extend(int(i) for i in ids)
        return original(self, ids)

    monkeypatch.setattr(ArrowExamples, "_rows", counting)
    return seen


def test_a_split_of_100k_mapped_rows_reads_one_row_and_allocates_index_arrays_only(tmp_path, reads):
    n = 100_000
    rng = np.random.default_rng(0)
    labels = rng.choice(3, size=n, p=[0.7, 0.25, 0.05])
    examples = arrow_examples(tmp_path, rng.integers(4, 40, size=n), pa.array(labels, pa.int64()))
    tracemalloc.start()
    try:
        train, val, info = split_validation(examples, 0.2, seed=5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # views over the memory map, not rows: one row was read (is `labels` a class id?), and Python allocated
    # about the index arrays (8 bytes a row), where 20,000 rows as dicts of lists would take tens of MB
    assert isinstance(train, Subset) and isinstance(val, Subset)
    assert train.base is examples and val.base is examples
    assert reads == [0]
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MB allocated to split"
    # stratified, disjoint, complete, in input order
    assert info.stratified and info.rows == len(val) and info.train_rows == len(train)
    shares = Counter(labels[val.indices].tolist())
    assert {k: round(v / len(val), 2) for k, v in shares.items()} == {
        k: round(v / n, 2) for k, v in Counter(labels.tolist()).items()
    }
    assert len(val) == round(0.2 * (labels == 0).sum()) + round(0.2 * (labels == 1).sum()) + round(
        0.2 * (labels == 2).sum()
    )
    everything = np.sort(np.concatenate([train.indices, val.indices]))
    assert (everything == np.arange(n)).all() and (np.diff(val.indices) > 0).all()
    # reading through a view gives the mapped rows, one read per batch
    i = int(val.indices[7])
    assert val[7] == examples[i] and val[7]["input_ids"] == list(range(i, i + val[7]["length"]))
    assert val[[0, 7]]["labels"] == [int(labels[val.indices[0]]), int(labels[i])]
    assert (val.column("labels") == labels[val.indices]).all()
    # the same seed picks the same rows; another seed others
    assert (split_validation(examples, 0.2, seed=5)[1].indices == val.indices).all()
    assert not (split_validation(examples, 0.2, seed=6)[1].indices == val.indices).all()


def test_duplicates_of_eval_rows_stay_in_training_reading_only_rows_of_their_lengths(tmp_path, reads):
    n = 5000
    lengths = np.arange(n) % 30 + 3
    examples = arrow_examples(tmp_path, lengths, None)  # causal LM: split at random, not stratified
    evals = [examples[i] for i in range(0, 300, 30)]  # ten training rows repeated in the eval data, length 3
    reads.clear()
    train, val, info = split_validation(examples, 0.5, seed=1, exclude=evals)
    assert not info.stratified and isinstance(val, Subset)
    assert 0 < info.dropped_duplicates <= 10 and len(train) + len(val) == n
    assert not set(val.indices.tolist()) & set(range(0, 300, 30))
    assert set(range(0, 300, 30)) <= set(train.indices.tolist())
    # the label probe, then only held rows as long as an eval row (1 in 30 of them) were compared
    assert reads[0] == 0 and len(reads) - 1 <= (lengths[val.indices] == 3).sum() + 10
    assert all(lengths[i] == 3 for i in reads[1:])


def test_a_view_of_a_view_reads_the_memory_map():
    base = type("Mapped", (), {"column_names": ["x"], "__getitem__": lambda self, k: k})()
    outer = Subset(Subset(base, [5, 6, 7, 8]), [1, 3])
    assert outer.base is base and outer.indices.tolist() == [6, 8] and outer[[0, 1]] == [6, 8]
