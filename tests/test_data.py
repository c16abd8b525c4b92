"""Data: every file format, the field mappings, label maps, prompt masking, packing, batching, bad input."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from tiny_models import tokenizer as tiny_tokenizer

from deltatune import builtin_data
from deltatune.data import (
    IGNORE_INDEX,
    DataError,
    Fields,
    collate,
    encode_causal,
    epoch_batches,
    eval_batches,
    load_datasets,
    pack,
    read_rows,
    split_eval,
)

RECORDS = [
    {"text": "w1 w2 w3", "label": "spam"},
    {"text": "w4 w5", "label": "ham"},
    {"text": "w6", "label": "spam"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write(path, records, kind):
    if kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    elif kind == "json":
        path.write_text(json.dumps(records))
    elif kind in ("csv", "tsv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]), delimiter="," if kind == "csv" else "\t")
            writer.writeheader()
            writer.writerows(records)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "tsv", "parquet"])
def test_every_file_format_reads_the_same_records(tmp_path, kind):
    path = write(tmp_path / f"d.{kind}", RECORDS, kind)
    assert [r for _, r in read_rows(path)] == RECORDS


def test_save_to_disk_folders_and_their_splits(tmp_path):
    import datasets

    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "one"))
    assert [r for _, r in read_rows(str(tmp_path / "one"))] == RECORDS
    both = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(RECORDS), "validation": datasets.Dataset.from_list(RECORDS[:1])}
    )
    both.save_to_disk(str(tmp_path / "both"))
    assert len(read_rows(str(tmp_path / "both"), role="train")) == 3
    assert [r for _, r in read_rows(str(tmp_path / "both"), role="eval")] == RECORDS[:1]


def test_plain_text_is_one_example_per_nonblank_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("w1 w2\n\nw3\n")
    rows = read_rows(str(path), Fields(text="body"))
    assert [r for _, r in rows] == [{"body": "w1 w2"}, {"body": "w3"}]
    assert rows[1][0].endswith("line 3")


def test_classification_maps_string_labels_sorted_and_field_names(tmp_path, tok):
    records = [{"body": r["text"], "cat": r["label"]} for r in RECORDS]
    path = write(tmp_path / "d.jsonl", records, "jsonl")
    data = load_datasets(path, tok, task="seq-cls", fields=Fields(text="body", label="cat"), eval_data=path)
    assert data.label_map == {"ham": 0, "spam": 1}
    assert [e["labels"] for e in data.train] == [1, 0, 1]
    assert data.train[0]["input_ids"] == tok("w1 w2 w3")["input_ids"]


def test_integer_labels_are_the_class_ids_also_as_csv_strings(tmp_path, tok):
    records = [{"text": "w1", "label": 1}, {"text": "w2", "label": 0}, {"text": "w3", "label": 2}]
    for kind in ("jsonl", "csv"):
        data = load_datasets(write(tmp_path / f"d.{kind}", records, kind), tok, task="seq-cls")
        assert data.label_map == {"0": 0, "1": 1, "2": 2}
        assert [e["labels"] for e in data.train] == [1, 0, 2]


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_integer_labels_that_are_not_0_to_k_minus_1_are_refused_naming_the_line(tmp_path, tok, kind):
    records = [{"text": "w1", "label": 0}, {"text": "w2", "label": 1}, {"text": "w3", "label": 100000}]
    path = write(tmp_path / f"d.{kind}", records, kind)
    line = 4 if kind == "csv" else 3  # the CSV header is line 1
    with pytest.raises(
        DataError,
        match=rf"d.{kind} line {line}: label 100000 is not a class id: integer labels must be the ids 0..2 of the 3 "
        r"classes seen \(\[0, 1, 100000\]\).*declare the label set in the config \(labels: \[...\]",
    ):
        load_datasets(path, tok, task="seq-cls")
    gap = write(tmp_path / f"g.{kind}", [{"text": "w1", "label": 2}, {"text": "w2", "label": 0}], kind)
    with pytest.raises(DataError, match=rf"g.{kind} line {line - 2}: label 2 is not a class id"):
        load_datasets(gap, tok, task="seq-cls")


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_odd_digit_strings_and_mixed_integer_and_text_labels_are_refused_naming_the_lines(
    tmp_path, tok, kind
):
    """'²' passes str.isdigit() and then int() failed with a ValueError traceback; 0, 1 and 'spam' together
    were silently numbered as sorted names."""
    line = 1 if kind == "jsonl" else 2  # the CSV header is line 1
    for odd in ("\u00b2", "\u0663"):  # superscript two, Arabic-Indic three
        records = [{"text": "w1", "label": odd}, {"text": "w2", "label": "1"}, {"text": "w3", "label": "0"}]
        with pytest.raises(DataError) as e:
            load_datasets(write(tmp_path / f"d.{kind}", records, kind), tok, task="seq-cls")
        assert str(e.value).startswith(
            f"{tmp_path / f'd.{kind}'} line {line}: label {odd!r} is text, but {tmp_path / f'd.{kind}'} line "
            f"{line + 1} has the integer label 1; give every example the same kind of label"
        )
    records = [{"text": "w1", "label": 0}, {"text": "w2", "label": "spam"}, {"text": "w3", "label": 1}]
    with pytest.raises(
        DataError, match=rf"m.{kind} line {line + 1}: label 'spam' is text, but .* line {line} has"
    ):
        load_datasets(write(tmp_path / f"m.{kind}", records, kind), tok, task="seq-cls")
    long = [{"text": "w1", "label": "9" * 5000}, {"text": "w2", "label": "8" * 5000}]  # names, not ids
    assert len(load_datasets(write(tmp_path / f"l.{kind}", long, kind), tok, task="seq-cls").label_map) == 2


@pytest.mark.parametrize("blank", ["", "  "])
def test_an_empty_label_is_refused_naming_the_line(tmp_path, tok, blank):
    """A blank CSV cell (or `"label": ""`) was a class named ''."""
    path = tmp_path / "d.csv"
    path.write_text(f"text,label\nw1,a\nw2,{blank}\nw3,b\n")
    with pytest.raises(
        DataError, match=r"d.csv line 3: field 'label' is empty; every example needs its label"
    ):
        load_datasets(str(path), tok, task="seq-cls")


def test_declared_labels_fix_the_ids_and_refuse_anything_else(tmp_path, tok):
    records = [{"text": "w1", "label": 2}, {"text": "w2", "label": 0}]
    path = write(tmp_path / "d.jsonl", records, "jsonl")
    data = load_datasets(path, tok, task="seq-cls", labels=[0, 1, 2])
    assert data.label_map == {"0": 0, "1": 1, "2": 2} and [e["labels"] for e in data.train] == [2, 0]
    stars = load_datasets(path, tok, task="seq-cls", labels=[2, 0])  # class i is the i-th entry
    assert stars.label_map == {"2": 0, "0": 1} and [e["labels"] for e in stars.train] == [0, 1]
    words = write(tmp_path / "w.jsonl", RECORDS, "jsonl")
    assert load_datasets(words, tok, task="seq-cls", labels=["spam", "ham", "other"]).label_map == {
        "spam": 0,
        "ham": 1,
        "other": 2,
    }
    with pytest.raises(
        DataError, match=r"d.jsonl line 1: label 2 is not one of the declared labels \(0, 1\)"
    ):
        load_datasets(path, tok, task="seq-cls", labels=[0, 1])


def test_a_bad_label_stops_the_run_before_any_model_loads(tmp_path, monkeypatch):
    import importlib

    import tiny_models

    from deltatune.train import config_from_dict, run

    run_module = importlib.import_module("deltatune.train.run")

    folder = tiny_models.save_with_tokenizer(tiny_models.bert_cls(), tmp_path / "bert")
    path = write(tmp_path / "d.jsonl", [{"text": "w1", "label": 0}, {"text": "w2", "label": 7}], "jsonl")
    monkeypatch.setattr(run_module, "build_model", lambda *a, **k: pytest.fail("the model was loaded"))
    config = config_from_dict(
        {"model": folder, "data": path, "eval_data": path, "output_dir": str(tmp_path / "r")}
    )
    with pytest.raises(DataError, match="d.jsonl line 2: label 7 is not a class id"):
        run(config)


def test_labels_option_is_validated():
    from deltatune.errors import ConfigError
    from deltatune.train import config_from_dict

    assert config_from_dict({"labels": [0, 1, 2]}).labels == [0, 1, 2]
    for value, message in [
        ([1], "two or more"),
        (["a", "a", "b"], "a appear more than once"),
        (["00", "0", "1"], r"0 appear more than once \('00', '0': a string of digits is its number\)"),
        ([1, "01", "0"], "1 appear more than once"),  # (both were classes: training failed with IndexError)
        ("a,b", "expected a list"),
        ([[1], 2], "expected a list"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"labels": value})
    with pytest.raises(ConfigError, match="labels: only for task seq-cls"):
        config_from_dict({"labels": [0, 1], "task": "causal-lm", "data": "builtin:quotes"})


@pytest.mark.parametrize("kind", ["jsonl", "csv", "tsv", "json"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, kind):
    path = write(tmp_path / f"d.{kind}", RECORDS, kind)
    with open(path, "rb") as f:
        body = f.read()
    with open(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + body)
    assert [r for _, r in read_rows(path)] == RECORDS
    text = tmp_path / "t.txt"
    text.write_bytes(b"\xef\xbb\xbfw1 w2\n")
    assert [r for _, r in read_rows(str(text))] == [{"text": "w1 w2"}]


@pytest.mark.parametrize("kind", ["jsonl", "txt"])
def test_bytes_that_are_not_utf8_are_named_by_line(tmp_path, kind):
    # was "d.jsonl: not UTF-8 text ('utf-8' codec can't decode byte 0xff in position 10: ...)": no line
    path = tmp_path / f"d.{kind}"
    rows = [json.dumps(r).encode() if kind == "jsonl" else r["text"].encode() for r in RECORDS]
    path.write_bytes(b"\n".join(rows[:2] + [rows[2].replace(b"w6", b"w\xff6")]) + b"\n")
    with pytest.raises(
        DataError, match=rf"^{path} line 3: not UTF-8 text \(byte \d+ of the line: invalid start byte\); save"
    ):
        read_rows(str(path))


def test_truncation_to_max_length(tmp_path, tok):
    path = write(
        tmp_path / "d.jsonl",
        [{"text": " ".join(f"w{i}" for i in range(40)), "label": "a"}] * 2 + [{"text": "w1", "label": "b"}],
        "jsonl",
    )
    data = load_datasets(path, tok, task="seq-cls", max_length=7)
    assert len(data.train[0]["input_ids"]) == 7


def test_prompt_tokens_get_no_labels(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", [{"prompt": "w1 w2 w3", "completion": "w4 w5"}], "jsonl")
    (example,) = load_datasets(path, tok, task="causal-lm").train
    prompt, completion = tok("w1 w2 w3")["input_ids"], tok("w4 w5", add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == prompt + completion + [tok.eos_token_id]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + completion + [tok.eos_token_id]


def test_text_examples_learn_every_token_and_end_with_eos(tmp_path, tok):
    path = tmp_path / "t.txt"
    path.write_text("w1 w2\nw3\n")
    data = load_datasets(str(path), tok, task="causal-lm")
    assert data.format == "text"
    assert data.train[0]["input_ids"] == data.train[0]["labels"] == tok("w1 w2")["input_ids"] + [2]


def test_empty_causal_texts_are_left_out_and_counted_from_the_cache_too(tmp_path, tok, caplog, monkeypatch):
    """An empty text was kept as an example of only EOS: a loss over nothing (NaN when a batch held only such
    rows) and a model taught to end at once."""
    from deltatune.data import encode_causal

    monkeypatch.setenv("DELTATUNE_DATA_CACHE", str(tmp_path / "cache"))
    records = [{"text": "w1 w2"}, {"text": ""}, {"text": "  \n "}, {"text": "w3"}]
    path = write(tmp_path / "d.jsonl", records, "jsonl")
    for cached in (False, True):
        caplog.clear()
        with caplog.at_level("WARNING"):
            data = load_datasets(path, tok, task="causal-lm")
        assert data.cached is cached
        assert [e["input_ids"] for e in data.train] == [
            tok("w1 w2")["input_ids"] + [tok.eos_token_id],
            tok("w3")["input_ids"] + [tok.eos_token_id],
        ]
        assert "2 train example(s) were empty or had nothing to learn" in caplog.text
    rows = [(f"d.jsonl line {i + 1}", r) for i, r in enumerate(records)]
    assert len(encode_causal(rows, tok, Fields(), 32, "text")) == 2
    empty = write(tmp_path / "e.jsonl", [{"text": ""}, {"text": " "}], "jsonl")
    with pytest.raises(DataError, match="no example is left to train on after tokenizing: 2 were empty"):
        load_datasets(empty, tok, task="causal-lm")


def test_messages_use_the_chat_template_and_learn_only_assistant_turns(tmp_path, tok):
    tok.chat_template = "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}{% if add_generation_prompt %}assistant {% endif %}"
    for word in ("user", "assistant", "system"):
        tok.add_tokens([word])
    conversation = [
        {"role": "user", "content": "w1 w2"},
        {"role": "assistant", "content": "w3"},
        {"role": "user", "content": "w4"},
        {"role": "assistant", "content": "w5 w6"},
    ]
    path = write(tmp_path / "d.jsonl", [{"messages": conversation}], "jsonl")
    (example,) = load_datasets(path, tok, task="causal-lm", max_length=64).train
    words = tok.convert_ids_to_tokens(example["input_ids"])
    learned = [w for w, label in zip(words, example["labels"]) if label != IGNORE_INDEX]
    assert words == ["user", "w1", "w2", "assistant", "w3", "user", "w4", "assistant", "w5", "w6"]
    assert learned == ["w3", "w5", "w6"]


def test_odd_conversations_train_or_are_refused_naming_the_line(tmp_path):
    # an empty list and a template's raise_exception were tracebacks (ValueError, jinja2's TemplateError); a
    # conversation opening with the assistant rendered an empty one (ValueError) to find where its turn starts
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tool turns') }}{% endif %}"
        "{{ m.role }} {{ m.content }} {% endfor %}{% if add_generation_prompt %}assistant {% endif %}"
    )
    for word in ("user", "assistant"):
        tok.add_tokens([word])
    opening = [{"role": "assistant", "content": "w3 w4"}, {"role": "user", "content": "w5"}]
    path = write(tmp_path / "a.jsonl", [{"messages": opening}], "jsonl")
    (example,) = load_datasets(path, tok, task="causal-lm", max_length=64).train
    learned = [
        w
        for w, label in zip(tok.convert_ids_to_tokens(example["input_ids"]), example["labels"])
        if label != IGNORE_INDEX
    ]
    assert learned == ["assistant", "w3", "w4"]
    good = {"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}
    tool = {"messages": [{"role": "tool", "content": "w1"}, {"role": "assistant", "content": "w2"}]}
    for bad, message in [
        ({"messages": []}, "d.jsonl line 2: 'messages' must be a non-empty list"),
        # a null or numeric content, or a role that is no text, was rendered as 'None' / '5' and trained on
        ({"messages": [{"role": "user", "content": None}]}, "d.jsonl line 2: 'messages' must be a non-empty"),
        ({"messages": [{"role": "user", "content": 5}]}, "d.jsonl line 2: 'messages' must be a non-empty"),
        ({"messages": [{"role": 1, "content": "w1"}]}, "d.jsonl line 2: 'messages' must be a non-empty"),
        (tool, "d.jsonl line 2: the tokenizer's chat template refuses this conversation .*no tool turns"),
    ]:
        path = write(tmp_path / "d.jsonl", [good, bad], "jsonl")
        with pytest.raises(DataError, match=message):
            load_datasets(path, tok, task="causal-lm", cache_dir=str(tmp_path / "cache"))
        with pytest.raises(DataError, match=message.split(": ", 1)[1]):
            encode_causal(read_rows(path), tok, Fields(), 64, "messages")
    assert not [name for name in os.listdir(tmp_path / "cache") if not name.startswith(".")]


def test_messages_need_a_chat_template(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "w1"}]}], "jsonl")
    with pytest.raises(DataError, match="no chat template"):
        load_datasets(path, tiny_tokenizer(), task="causal-lm")


def test_packing_puts_whole_examples_side_by_side(tmp_path, tok):
    examples = [
        {"input_ids": [5, 6, 2], "labels": [-100, 6, 2]},
        {"input_ids": [7, 8, 9, 2], "labels": [7, 8, 9, 2]},
        {"input_ids": [3], "labels": [3]},
    ]
    rows = pack(examples, 4)  # longest first, each into the row it fills best; file order inside a row
    assert rows == [[examples[1]], [examples[0], examples[2]]]


def test_collate_pads_per_batch(tok):
    batch = collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [-100]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [-100, -100, -100]]
    assert collate([{"input_ids": [1], "labels": 1}], 0)["labels"].dtype == torch.long


def test_eval_fraction_is_deterministic_and_disjoint():
    rows = [(str(i), {"text": str(i)}) for i in range(20)]
    train, held = split_eval(rows, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert {w for w, _ in train}.isdisjoint(w for w, _ in held)
    assert split_eval(rows, 0.25, seed=3) == (train, held)
    assert split_eval(rows, 0.25, seed=4)[1] != held


def test_shards_of_a_distributed_epoch_make_the_single_process_batches():
    single = epoch_batches(21, 8, epoch=1, seed=0)
    shards = [epoch_batches(21, 4, epoch=1, seed=0, rank=r, world=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1])
    for k in range(len(single) - 1):  # the last batch of the padded epoch differs only by the padding
        assert sorted(shards[0][k] + shards[1][k]) == sorted(single[k])
    assert epoch_batches(21, 8, epoch=1, seed=0) != epoch_batches(21, 8, epoch=2, seed=0)
    ranks = [eval_batches(5, 2, r, 2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) and sorted(i for b in ranks[0] + ranks[1] for i in b) == [
        -1,
        0,
        1,
        2,
        3,
        4,
    ]


def test_builtin_spam_is_deterministic_noisy_and_held_out():
    train, held = builtin_data.spam("train"), builtin_data.spam("eval")
    assert len(train) == 50 and len(held) == 300
    assert train == builtin_data.spam("train")
    assert {r["label"] for r in train} == {"spam", "ham"}
    assert not {r["text"] for r in train} & {r["text"] for r in held}
    assert len({r["text"] for r in held}) == 300
    money_ham = [r for r in held if r["label"] == "ham" and "$" in r["text"]]
    assert money_ham, "ham that talks about money is among the hard cases"
    assert read_rows("builtin:spam:eval")[0][1] == held[0]


def test_builtin_quotes_and_default_eval_split(tok):
    assert len(builtin_data.quotes("train")) == 400 and len(builtin_data.quotes("eval")) == 100
    data = load_datasets("builtin:quotes", tok, task="causal-lm", max_length=16)
    assert len(data.eval) > 0 and all(len(b["input_ids"]) <= 16 for b in data.train)


# ---- bad input ------------------------------------------------------------------------------------------
def test_missing_file_is_named():
    with pytest.raises(DataError, match="data file not found: 'nope.jsonl'"):
        read_rows("nope.jsonl")


def test_unreadable_json_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "w1", "label": "a"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"d.jsonl line 3: not valid JSON"):
        read_rows(str(path))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"text": "w1", "label": ' + "9" * 5000 + "}",
            "line 2: not usable JSON (Exceeds the limit (4300 digits)",
        ),
        ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "line 2: not usable JSON (it nests too deeply)"),
        (
            '{"text": "w1\\ud800", "label": "a"}',
            "line 2: a \\u escape stands for half of a UTF-16 surrogate pair",
        ),
    ],
)
def test_json_that_parses_badly_or_not_into_text_is_named(tmp_path, tok, line, message):
    """Each was a traceback: a ValueError from json, a RecursionError, a UnicodeEncodeError from Arrow."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "w0", "label": "b"}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        load_datasets(str(path), tok, task="seq-cls")
    assert str(e.value).startswith(f"{path} {message}")
    listed = tmp_path / "d.json"
    listed.write_text("[" + '{"text": "w0", "label": "b"}, ' + line + "]")
    with pytest.raises(DataError, match=f"^{listed}: "):
        load_datasets(str(listed), tok, task="seq-cls")


def test_csv_row_with_wrong_column_count_is_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nw1,a\nw2,b,extra\n")
    with pytest.raises(DataError, match="d.csv line 3"):
        read_rows(str(path))


def test_csv_header_naming_a_column_twice_is_refused(tmp_path):
    """`text,text,label` read the second text column and dropped the first without a word."""
    path = tmp_path / "d.csv"
    path.write_text("text,text,label\nw1,w2,a\n")
    with pytest.raises(DataError, match=r"d.csv line 1: the header names 'text' more than once"):
        read_rows(str(path))


def test_missing_field_names_the_line_and_field(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", [{"text": "w1", "label": "a"}, {"txt": "w2", "label": "b"}], "jsonl")
    with pytest.raises(DataError, match=r"line 2: no field 'text' \(it has 'txt', 'label'\)"):
        load_datasets(path, tok, task="seq-cls")


def test_text_without_labels_for_classification_also_points_at_causal_lm(tmp_path, tok):
    """`deltatune train --config configs/lora.yaml data=corpus/` (the README's corpus command without
    task=causal-lm) trains a classifier, so the missing label says how to train a language model instead."""
    path = write(tmp_path / "d.jsonl", [{"text": "w1 w2"}, {"text": "w3"}], "jsonl")
    with pytest.raises(DataError) as e:
        load_datasets(path, tok, task="seq-cls")
    assert str(e.value).endswith(
        "line 1: no field 'label' (it has 'text'); map another column with fields.<role>=<column>, or set "
        "task=causal-lm to train a language model on unlabelled text"
    )


def test_eval_label_never_seen_in_training(tmp_path, tok):
    train = write(tmp_path / "t.jsonl", RECORDS, "jsonl")
    held = write(
        tmp_path / "e.jsonl", [{"text": "w1", "label": "ham"}, {"text": "w2", "label": "phishing"}], "jsonl"
    )
    with pytest.raises(
        DataError, match=r"e.jsonl line 2: label 'phishing' never appears .*known labels: ham, spam"
    ):
        load_datasets(train, tok, task="seq-cls", eval_data=held)


def test_empty_dataset(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        load_datasets(str(path), tok, task="seq-cls")


def test_one_class_only_and_wrong_label_type(tmp_path, tok):
    with pytest.raises(DataError, match="needs two or more"):
        load_datasets(
            write(tmp_path / "a.jsonl", [{"text": "w1", "label": "a"}] * 2, "jsonl"), tok, task="seq-cls"
        )
    with pytest.raises(DataError, match=r"line 1: field 'label' should be str or int"):
        load_datasets(
            write(tmp_path / "b.jsonl", [{"text": "w1", "label": [1]}], "jsonl"), tok, task="seq-cls"
        )


def test_unknown_builtin_and_file_type(tmp_path):
    with pytest.raises(DataError, match="builtin:spam, builtin:quotes"):
        read_rows("builtin:hams")
    (tmp_path / "d.xml").write_text("<x/>")
    with pytest.raises(DataError, match="unknown file type"):
        read_rows(str(tmp_path / "d.xml"))
