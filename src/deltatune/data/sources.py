"""Reading training data: files or built-in sets -> `(where, record)` rows.

Sources: JSONL (`.jsonl`, `.json` lists), CSV/TSV, Parquet, plain text (`.txt`: one example per line), a
folder written by `datasets`' `save_to_disk`, or `builtin:spam` / `builtin:quotes`. Errors name the file and
the line (or row).
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass
from typing import Any

from deltatune.data import builtin as builtin_data
from deltatune.errors import DataError
from deltatune.vocab import IGNORE_INDEX  # noqa: F401  (defined once, in vocab; re-exported for data)

FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
FORMATS |= {".txt": "text", ".text": "text"}

Row = tuple[str, dict[str, Any]]  # (where it came from, e.g. "emails.jsonl line 7", the record)


@dataclass
class Fields:
    """Which column holds what (rename them to fit your files, e.g. `fields.text=body`)."""

    text: str = "text"
    """The input text (classification), or the whole training text (causal LM)."""
    label: str = "label"
    """The class of each example (classification): strings are mapped to ids, sorted; integers are ids."""
    prompt: str = "prompt"
    """Causal LM: the prompt, which gets no loss (its tokens are labelled -100)."""
    completion: str = "completion"
    """Causal LM: the completion after the prompt, which the model learns to write."""
    messages: str = "messages"
    """Causal LM: a list of `{"role", "content"}` turns, rendered with the tokenizer's chat template."""


# ---- reading ------------------------------------------------------------------------------------------
def check_source(source: str) -> str | None:
    """Why `source` can't be read (a message), or None; cheap: used to validate a config before loading."""
    if source.startswith("builtin:"):
        name, _, split = source.removeprefix("builtin:").partition(":")
        if name not in builtin_data.BUILTIN:
            return f"unknown built-in data set {source!r}; deltatune has " + ", ".join(
                f"builtin:{n}" for n in builtin_data.BUILTIN
            )
        if split not in ("", "train", "eval"):
            return f"{source!r}: built-in sets have the splits 'train' and 'eval'"
        return None
    if not os.path.exists(source):
        return f"data file not found: {source!r}"
    if os.path.isdir(source):
        if not any(os.path.isfile(os.path.join(source, f)) for f in ("dataset_dict.json", "state.json")):
            return f"{source!r} is a folder but not one written by datasets' save_to_disk"
        return None
    if os.path.splitext(source)[1].lower() not in FORMATS:
        return f"{source!r}: unknown file type; use one of {', '.join(FORMATS)} or a save_to_disk folder"
    return None


def read_rows(source: str, fields: Fields | None = None, role: str = "train") -> list[Row]:
    """Every record of `source` with its location; `role` picks the split of a `DatasetDict` folder."""
    problem = check_source(source)
    if problem:
        raise DataError(problem)
    fields = fields or Fields()
    if source.startswith("builtin:"):
        rows = [(f"{source} row {i}", r) for i, r in enumerate(builtin_data.load_builtin(source))]
    elif os.path.isdir(source):
        rows = _read_saved_dataset(source, role)
    else:
        kind = FORMATS[os.path.splitext(source)[1].lower()]
        try:
            rows = _READERS[kind](source, fields)
        except UnicodeDecodeError as e:
            raise DataError(f"{source}: not UTF-8 text ({e})") from e
    if not rows:
        raise DataError(f"{source}: no examples in it (is the file empty?)")
    return rows


def _read_jsonl(path: str, fields: Fields) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:  # -sig: a UTF-8 byte-order mark is skipped
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(record, dict):
                raise DataError(f"{path} line {n}: expected a JSON object, got {type(record).__name__}")
            rows.append((f"{path} line {n}", record))
    return rows


def _read_json(path: str, fields: Fields) -> list[Row]:
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path, fields)  # a JSON-lines file named .json
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects (or one object per line)")
    return [(f"{path} item {i}", r) for i, r in enumerate(data)]


def _read_csv(path: str, fields: Fields, delimiter: str = ",") -> list[Row]:
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            for record in reader:
                where = f"{path} line {reader.line_num}"
                if None in record or None in record.values():
                    raise DataError(
                        f"{where}: has a different number of columns than the header ({len(reader.fieldnames or [])})"
                    )
                rows.append((where, record))
        except csv.Error as e:
            raise DataError(f"{path} line {reader.line_num}: unreadable CSV ({e})") from e
    return rows


def _read_parquet(path: str, fields: Fields) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    return [(f"{path} row {i}", r) for i, r in enumerate(records)]


def _read_text(path: str, fields: Fields) -> list[Row]:
    with open(path, encoding="utf-8-sig") as f:
        return [
            (f"{path} line {n}", {fields.text: line.rstrip("\n")})
            for n, line in enumerate(f, 1)
            if line.strip()
        ]


_READERS = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "tsv": lambda path, fields: _read_csv(path, fields, "\t"),
    "parquet": _read_parquet,
    "text": _read_text,
}


def _read_saved_dataset(path: str, role: str) -> list[Row]:
    import datasets

    try:
        data = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, ... for broken folders
        raise DataError(f"{path}: could not be loaded with datasets.load_from_disk ({e})") from e
    if isinstance(data, datasets.DatasetDict):
        wanted = ["train"] if role == "train" else ["validation", "eval", "test"]
        split = next((s for s in wanted if s in data), None)
        if split is None:
            raise DataError(f"{path} has the splits {list(data)}; none is named {' or '.join(wanted)}")
        data = data[split]
        path = f"{path}[{split}]"
    return [(f"{path} row {i}", r) for i, r in enumerate(data)]


def split_eval(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Hold out `fraction` of `rows` (at least one), chosen by `seed`; both parts keep the file order."""
    if not 0 < fraction < 1:
        raise DataError(f"eval_fraction must be between 0 and 1, got {fraction}")
    k = max(1, round(fraction * len(rows)))
    if k >= len(rows):
        raise DataError(f"eval_fraction={fraction} leaves no training examples out of {len(rows)}")
    held = set(random.Random(seed).sample(range(len(rows)), k))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
