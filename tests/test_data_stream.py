"""Streaming: batches straight from files or shards, resumed at the exact example."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny_models import tokenizer as tiny_tokenizer

from deltatune.data import DataError, StreamBatcher, open_stream
from deltatune.data.sources import iter_positions


def write_shards(folder, n_shards=2, rows=7, seed=0, kind="jsonl"):
    rng = random.Random(seed)
    folder.mkdir(exist_ok=True)
    for s in range(n_shards):
        records = [
            {"text": " ".join(f"w{rng.randrange(3, 90)}" for _ in range(rng.randrange(1, 12)))}
            for _ in range(rows)
        ]
        if kind == "jsonl":
            (folder / f"part-{s}.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(records), folder / f"part-{s}.parquet", row_group_size=3)
    return str(folder)


def batches(batcher, state, n):
    out, stream = [], batcher.stream(state)
    for _ in range(n):
        tensors, real, position = next(stream)
        out.append(({k: v.tolist() for k, v in tensors.items()}, real, position))
    return out


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
@pytest.mark.parametrize("mode", ["padded", "packed", "padding_free"])
@pytest.mark.parametrize("world", [1, 2])
def test_a_stream_resumed_at_any_batch_continues_with_exactly_the_same_batches(tmp_path, kind, mode, world):
    source = write_shards(tmp_path / "shards", kind=kind)
    stream = open_stream(source, tiny_tokenizer(), task="causal-lm", max_length=16)
    for rank in range(world):
        batcher = StreamBatcher(stream, batch_size=2, mode=mode, rank=rank, world=world)
        run = batches(batcher, {}, 14)  # more than one epoch of 14 rows
        assert run[-1][2]["epoch"] >= 1
        for k in range(1, 14):
            state = {key: run[k - 1][2][key] for key in ("epoch", "batch", "stream")}
            state = json.loads(json.dumps(state))  # as a checkpoint stores it
            assert batches(batcher, state, 14 - k) == run[k:], f"resumed after batch {k}"


def test_stream_positions_seek_into_jsonl_lines_and_skip_parquet_row_groups(tmp_path):
    source = write_shards(tmp_path / "p", kind="parquet")
    every = list(iter_positions(source))
    assert [w for w, _, _ in every][6:8] == [
        f"{source}/part-0.parquet row 6",
        f"{source}/part-1.parquet row 0",
    ]
    for k in range(len(every)):
        assert [r for _, r, _ in iter_positions(source, start=every[k][2])] == [
            r for _, r, _ in every[k + 1 :]
        ]
    text = tmp_path / "t.jsonl"
    text.write_bytes(b'\xef\xbb\xbf{"text": "w1"}\n\n{"text": "w2"}\n{"text": "w3"}\n')
    rows = list(iter_positions(str(text)))
    assert [w.rsplit(" ", 1)[1] for w, _, _ in rows] == ["1", "3", "4"]
    assert [(w, r) for w, r, _ in iter_positions(str(text), start=rows[0][2])] == [
        (w, r) for w, r, _ in rows[1:]
    ]


def test_a_bad_row_in_a_stream_names_its_shard_and_line(tmp_path):
    folder = tmp_path / "s"
    write_shards(folder)
    with open(folder / "part-1.jsonl", "a") as f:
        f.write('{"text": 5}\n')
    stream = open_stream(str(folder), tiny_tokenizer(), task="causal-lm")
    with pytest.raises(DataError, match=r"part-1.jsonl line 8: field 'text' should be str, got 5"):
        batches(StreamBatcher(stream, batch_size=4), {}, 10)


def test_a_stream_leaves_out_empty_rows_and_says_how_many(tmp_path, caplog):
    """As the cached data does: empty texts (an EOS-only example, a loss over nothing) are left out, counted."""
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["w1 w2", "", "w3", "   ", "w4 w5"]) + "\n")
    stream = open_stream(str(path), tiny_tokenizer(), task="causal-lm", max_length=16)
    with caplog.at_level("WARNING", logger="deltatune.data.streaming"):
        got = batches(StreamBatcher(stream, batch_size=1), {}, 6)  # two passes of the three real rows
    want = [tiny_tokenizer()(t)["input_ids"] for t in ["w1 w2", "w3", "w4 w5"]]
    assert [b[0]["input_ids"][0][: len(w)] for b, w in zip(got, want * 2, strict=True)] == want * 2
    assert caplog.text.count("2 example(s) of") == 1 and "were empty or had nothing to learn" in caplog.text


def test_streaming_classification_needs_declared_labels(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "w1", "label": "a"}\n{"text": "w2", "label": "c"}\n')
    with pytest.raises(DataError, match="needs the label set up front"):
        open_stream(str(path), tiny_tokenizer(), task="seq-cls")
    stream = open_stream(str(path), tiny_tokenizer(), task="seq-cls", labels=["a", "b"])
    with pytest.raises(
        DataError, match=r"c.jsonl line 2: label 'c' is not one of the declared labels \(a, b\)"
    ):
        batches(StreamBatcher(stream, batch_size=1), {}, 2)


@pytest.mark.slow
def test_streaming_resume_ends_bit_identical_to_an_uninterrupted_run(tmp_path):
    from train_helpers import tiny_opt_folder, trainable_weights

    from deltatune.train import config_from_dict, run

    folder = tiny_opt_folder(tmp_path / "opt")
    shards = write_shards(tmp_path / "shards")
    base = {
        "model": folder,
        "task": "causal-lm",
        "data": shards,
        "streaming": True,
        "packing": True,
        "max_length": 16,
        "batch_size": 2,
        "max_steps": 8,
        "schedule": "constant",
        "save_every": 4,
        "log_every": 1,
        "eval_at_start": False,
        "progress": False,
        "method_args": {"r": 2, "lora_alpha": 4},
    }
    full = run(config_from_dict(base | {"output_dir": str(tmp_path / "full")}))
    assert full["status"] == "completed" and full["tokens_per_s"] > 0
    run(config_from_dict(base | {"output_dir": str(tmp_path / "half"), "max_steps": 4}))
    resumed = run(config_from_dict(base | {"output_dir": str(tmp_path / "half")}), resume=True)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 8
    state = json.loads((tmp_path / "half" / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["stream"] is not None or state["batch"] == 0
    a, b = trainable_weights(tmp_path / "full"), trainable_weights(tmp_path / "half")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_streaming_settings_are_validated():
    from deltatune.errors import ConfigError
    from deltatune.train import config_from_dict

    with pytest.raises(ConfigError) as e:
        config_from_dict({"streaming": True, "group_by_length": True, "eval_fraction": 0.1})
    for message in ("set max_steps", "eval_fraction can't hold rows", "group_by_length needs", "set labels"):
        assert message in str(e.value)
    # the automatic choices need a validation split, which a stream can't give (the README: "refused")
    with pytest.raises(ConfigError) as e:
        config_from_dict({"streaming": True, "max_steps": 5, "lr": "auto", "early_stopping": True})
    assert "lr: auto and early_stopping need a validation split, which streamed data can't give" in str(
        e.value
    )
    for automatic in ({"lr": "auto"}, {"early_stopping": True}):
        with pytest.raises(ConfigError, match="need a validation split, which streamed data can't give"):
            config_from_dict({"streaming": True, "max_steps": 5, **automatic})


def test_a_stream_without_eval_data_says_why_nothing_is_evaluated(tmp_path):
    """A streamed run without eval_data warned "no eval data and val_fraction=0" though val_fraction was left at
    its default: a stream can't be split, which the warning now says, with what to do."""
    from deltatune.train import config_from_dict
    from deltatune.train.config import needs_validation, why_no_evaluation

    shards = write_shards(tmp_path / "shards")
    stream = config_from_dict({"task": "causal-lm", "data": shards, "streaming": True, "max_steps": 2})
    assert stream.val_fraction > 0 and not needs_validation(stream, has_eval=False)
    assert why_no_evaluation(stream) == (
        "no eval data, and streamed data can't be split for a validation set; give eval_data to evaluate"
    )
    off = config_from_dict({"task": "causal-lm", "data": shards, "val_fraction": 0})
    assert why_no_evaluation(off) == "no eval data and val_fraction=0"
