"""The Arrow path: tokenized data cached on disk by a fingerprint of data, tokenizer and settings."""

from __future__ import annotations

import json
import os

import pytest
from tiny_models import tokenizer as tiny_tokenizer

from deltatune.data import DataError, load_datasets, read_rows
from deltatune.data import cache as cache_module
from deltatune.data.tokenize import encode_batch


def lines(n: int, start: int = 0) -> str:
    return "".join(
        json.dumps({"text": f"w{3 + i % 80} w{4 + i % 70}", "label": str(i % 2)}) + "\n"
        for i in range(start, n)
    )


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(lines(30))
    return str(path)


def load(path, tok, tmp_path, **kwargs):
    return load_datasets(
        path, tok, task="seq-cls", eval_data=path, cache_dir=str(tmp_path / "cache"), **kwargs
    )


def no_tokenizing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("tokenized although the cache holds this data")

    monkeypatch.setattr(cache_module, "encode_batch", fail)


def test_a_second_load_reads_the_memory_mapped_cache_and_tokenizes_nothing(tmp_path, data, monkeypatch):
    tok = tiny_tokenizer()
    first = load(
        data, tok, tmp_path
    )  # (tokenizing sets the tokenizer's truncation: not part of its identity)
    assert not first.cached and len(first.train) == 30
    assert all(p.startswith(first.cache_path) for p in first.train.paths)  # memory-mapped from the cache
    no_tokenizing(monkeypatch)
    second = load(data, tok, tmp_path)
    assert second.cached and second.cache_path == first.cache_path
    assert list(second.train) == list(first.train) and second.label_map == first.label_map == {"0": 0, "1": 1}


def test_the_cache_is_not_used_for_another_tokenizer_max_length_or_data(tmp_path, data, monkeypatch):
    tok = tiny_tokenizer()
    base = load(data, tok, tmp_path)
    other_tok = tiny_tokenizer()
    other_tok.add_tokens(["zz"])
    changed = [
        load(data, other_tok, tmp_path),
        load(data, tok, tmp_path, max_length=2),
        load(data, tok, tmp_path, labels=["0", "1", "2"]),
    ]
    assert all(not d.cached for d in changed)
    assert len({d.cache_path for d in [base, *changed]}) == 4
    assert max(len(e["input_ids"]) for e in changed[1].train) == 2
    stat = os.stat(data)
    with open(data, "r+") as f:  # same size, same modification time, other words
        text = f.read()
        f.seek(0)
        f.write(text.replace("w3 ", "w9 "))
    assert os.path.getsize(data) == stat.st_size
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    rewritten = load(data, tok, tmp_path)
    assert not rewritten.cached and rewritten.cache_path != base.cache_path
    with open(data, "a") as f:
        f.write(lines(31, 30))
    grown = load(data, tok, tmp_path)
    assert not grown.cached and len(grown.train) == 31


def test_a_damaged_or_half_written_cache_is_rebuilt_never_read(tmp_path, data, caplog):
    tok = tiny_tokenizer()
    first = load(data, tok, tmp_path)
    arrow = first.train.path
    size = os.path.getsize(arrow)
    del first
    with open(arrow, "r+b") as f:
        f.truncate(size // 2)
    again = load(data, tok, tmp_path)
    assert not again.cached and len(again.train) == 30 and "incomplete or damaged" in caplog.text
    os.unlink(os.path.join(again.cache_path, "meta.json"))
    rebuilt = load(data, tok, tmp_path)
    assert not rebuilt.cached
    # a damaged lengths file (read only by group_by_length and the validation split) was read as cached,
    # then failed with numpy's ValueError in every later run
    for damage in (lambda f: f.truncate(100), lambda f: f.truncate(os.path.getsize(f.name) - 8)):
        with open(rebuilt.train.lengths_path, "r+b") as f:
            damage(f)
        rebuilt = load(data, tok, tmp_path)
        assert not rebuilt.cached and len(rebuilt.train.column("length")) == 30
    # a run killed while building leaves only its temporary folder: removed by the next build
    abandoned = tmp_path / "cache" / "0123.tmp-999999999-abcd"
    abandoned.mkdir()
    (abandoned / "train.arrow").write_bytes(b"half")
    # names that only look like a process id are no live process: '²' passes str.isdigit, int() refuses it;
    # a 40-digit id overflowed os.kill
    strays = [tmp_path / "cache" / f"0123.tmp-{pid}-abcd" for pid in ("²", "9" * 40)]
    for stray in strays:
        stray.mkdir()
    load(data, tok, tmp_path, max_length=5)
    assert not abandoned.exists() and not any(stray.exists() for stray in strays)


def test_a_cache_folder_that_cant_be_written_is_a_data_error_saying_how_to_move_it(tmp_path, data):
    (tmp_path / "cache").write_text("a file where the cache goes")  # was OSError "File exists" (no hint)
    with pytest.raises(
        DataError, match=r"the data cache .*/cache can't be written in .*DELTATUNE_DATA_CACHE"
    ):
        load(data, tiny_tokenizer(), tmp_path)


def test_tokenizing_in_processes_gives_the_same_examples(tmp_path, data):
    tok = tiny_tokenizer()
    one = load(data, tok, tmp_path)
    two = load_datasets(data, tok, task="seq-cls", eval_data=data, cache_dir=str(tmp_path / "c2"), num_proc=2)
    assert list(one.train) == list(two.train)


def test_num_proc_beyond_four_per_core_is_lowered_with_a_warning(tmp_path, data, monkeypatch, caplog):
    """`num_proc=1000` started a thousand tokenizing processes."""
    import datasets

    seen = []
    real = datasets.Dataset.map

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("num_proc"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", spy)
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    tok = tiny_tokenizer()
    with caplog.at_level("WARNING", logger="deltatune.data.cache"):
        lowered = load_datasets(data, tok, task="seq-cls", cache_dir=str(tmp_path / "c"), num_proc=1000)
    assert "num_proc=1000 on 1 CPU cores: tokenizing in 4 processes" in caplog.text
    assert 1000 not in seen and set(seen) <= {4, None}
    assert list(lowered.train) == list(load(data, tok, tmp_path).train)


def test_a_row_the_tokenizer_fails_on_is_named():
    def tokenizer(texts, **kwargs):
        if isinstance(texts, str):
            texts = [texts]
        if any("boom" in t for t in texts):
            raise ValueError("cannot encode")
        return {"input_ids": [[1] for _ in texts]}

    tokenizer.eos_token_id = 2
    batch = {"_where": ["d.jsonl line 1", "d.jsonl line 2"], "text": ["w1", "a boom"]}
    with pytest.raises(
        DataError, match=r"d.jsonl line 2: the tokenizer fails on this row \(ValueError: cannot"
    ):
        encode_batch(batch, tokenizer=tokenizer, fmt="text", max_length=8)


def test_a_folder_of_shards_and_a_corrupt_shard(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        pq.write_table(
            pa.Table.from_pylist([{"text": f"w{i} w5"}, {"text": f"w{i} w6"}]), shards / f"{i}.parquet"
        )
    rows = read_rows(str(shards))
    assert [r["text"] for _, r in rows] == ["w0 w5", "w0 w6", "w1 w5", "w1 w6"]
    assert rows[2][0].endswith("1.parquet row 0")
    data = load_datasets(str(shards), tiny_tokenizer(), task="causal-lm", cache_dir=str(tmp_path / "c"))
    assert len(data.train) == 4
    (shards / "2.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"shards/2.parquet: not a readable Parquet file"):
        load_datasets(str(shards), tiny_tokenizer(), task="causal-lm", cache_dir=str(tmp_path / "c"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssFile from /proc (Linux)")
def test_reading_every_row_of_a_mapped_file_does_not_keep_it_in_memory(tmp_path):
    """Pages of the memory map that reads touched are released as reading goes on: an epoch (or an
    evaluation over rows spread through the file) doesn't leave the whole file counted in the RSS."""
    import numpy as np
    from test_split import arrow_examples

    def resident_file_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("RssFile:"))

    n = 100_000
    examples = arrow_examples(tmp_path, np.full(n, 40), None)  # ~32 MB of input_ids and labels
    size_mb = os.path.getsize(examples.path) / 2**20
    assert size_mb > 30
    before = resident_file_mb()
    for start in range(0, n, 1000):
        ids = list(range(start, min(n, start + 1000), 7))  # rows spread through the file: every page
        assert examples[ids]["input_ids"][-1] == list(range(ids[-1], ids[-1] + 40))
    grown = resident_file_mb() - before
    assert grown < size_mb / 3, f"{grown:.0f} MB of the {size_mb:.0f} MB file stayed resident"
