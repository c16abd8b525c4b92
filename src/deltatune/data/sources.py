"""Reading training data: files or built-in sets -> `(where, record)` rows.

Sources: JSONL (`.jsonl`, `.json` lists), CSV/TSV, Parquet, plain text (`.txt`: one example per line), a
folder written by `datasets`' `save_to_disk`, or `builtin:spam` / `builtin:quotes`. Errors name the file and
the line (or row).
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import random
from collections.abc import Iterator
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
        if _is_saved_dataset(source) or shard_files(source):
            return None
        return (
            f"{source!r} is a folder but neither one written by datasets' save_to_disk nor one holding data "
            f"files ({', '.join(FORMATS)})"
        )
    if os.path.splitext(source)[1].lower() not in FORMATS:
        return f"{source!r}: unknown file type; use one of {', '.join(FORMATS)} or a save_to_disk folder"
    return None


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))


def shard_files(source: str) -> list[str]:
    """The data files of `source`: itself, or for a folder of shards every file of a known type in it
    (sorted by name; a folder must hold one type only)."""
    if not os.path.isdir(source):
        return [source]
    files = sorted(
        os.path.join(source, f)
        for f in os.listdir(source)
        if os.path.splitext(f)[1].lower() in FORMATS and os.path.isfile(os.path.join(source, f))
    )
    kinds = {FORMATS[os.path.splitext(f)[1].lower()] for f in files}
    if len(kinds) > 1:
        raise DataError(
            f"{source}: a folder of shards must hold one file type, it has {', '.join(sorted(kinds))}"
        )
    return files


def read_rows(source: str, fields: Fields | None = None, role: str = "train") -> list[Row]:
    """Every record of `source` with its location; `role` picks the split of a `DatasetDict` folder."""
    rows = list(iter_rows(source, fields, role))
    if not rows:
        raise DataError(f"{source}: no examples in it (is the file empty?)")
    return rows


def iter_rows(source: str, fields: Fields | None = None, role: str = "train") -> Iterator[Row]:
    """Like `read_rows`, one record at a time (nothing is held: for files of any size)."""
    for where, record, _ in iter_positions(source, fields, role):
        yield where, record


Position = tuple[int, int, int]  # (shard, resume offset in it, line or row number): see `iter_positions`


def iter_positions(
    source: str, fields: Fields | None = None, role: str = "train", start: Position | None = None
) -> Iterator[tuple[str, dict[str, Any], Position]]:
    """`(where, record, position after it)` for every record of `source`, from `start` (a position
    yielded before) on. For JSONL and text files the position is a byte offset, so resuming seeks to it; for
    Parquet a row number (whole row groups are skipped); other sources are re-read up to it."""
    problem = check_source(source)
    if problem:
        raise DataError(problem)
    fields = fields or Fields()
    first_shard, offset, number = start or (0, 0, 0)
    if source.startswith("builtin:") or _is_saved_dataset(source):
        if source.startswith("builtin:"):
            records, name = builtin_data.load_builtin(source), source
        else:
            records, name = _read_saved_dataset(source, role)
        for i in range(offset, len(records)):
            yield f"{name} row {i}", records[i], (0, i + 1, i + 1)
        return
    files = shard_files(source)
    for shard in range(first_shard, len(files)):
        path = files[shard]
        kind = FORMATS[os.path.splitext(path)[1].lower()]
        begin = (offset, number) if shard == first_shard else (0, 0)
        try:
            for where, record, (off, num) in _READERS[kind](path, fields, *begin):
                yield where, record, (shard, off, num)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from e


def _lines(path: str, offset: int, number: int) -> Iterator[tuple[int, str, int]]:
    """(line number, text, byte offset after it) of every line from byte `offset` (line `number` + 1) on;
    a UTF-8 byte-order mark at the start of the file is skipped."""
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            offset += len(raw)
            number += 1
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:  # which line: in a big file, the file's name alone won't find it
                raise DataError(
                    f"{path} line {number}: not UTF-8 text (byte {e.start + 1} of the line: {e.reason}); "
                    "save the file as UTF-8"
                ) from e
            yield number, text, offset


def _read_jsonl(path: str, fields: Fields, offset: int = 0, number: int = 0) -> Iterator:
    for n, line, after in _lines(path, offset, number):
        if not line.strip():
            continue
        record = _parse_json(line, f"{path} line {n}")
        if not isinstance(record, dict):
            raise DataError(f"{path} line {n}: expected a JSON object, got {type(record).__name__}")
        yield f"{path} line {n}", record, (after, n)


def _parse_json(text: str, where: str) -> Any:
    """`json.loads(text)`, every way it fails (bad syntax, an integer of thousands of digits, nesting too
    deep, a `\\ud800` escape that is no character) a `DataError` naming `where`."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
    except ValueError as e:  # Python refuses integers of more than 4300 digits
        raise DataError(f"{where}: not usable JSON ({str(e).split(';')[0]})") from e
    except RecursionError as e:
        raise DataError(f"{where}: not usable JSON (it nests too deeply)") from e
    if "\\u" in text:
        _refuse_lone_surrogates(value, where)
    return value


def _refuse_lone_surrogates(value: Any, where: str) -> None:
    """An escaped lone surrogate (`\\ud800`) parses, but is no character: Arrow and tokenizers fail on it."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{where}: a \\u escape stands for half of a UTF-16 surrogate pair ({e.object[e.start]!r}), "
            "which is not a character; fix the line"
        ) from e


def _read_json(path: str, fields: Fields, offset: int = 0, number: int = 0) -> Iterator:
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        yield from _read_jsonl(path, fields, offset, number)  # a JSON-lines file named .json
        return
    except (ValueError, RecursionError):
        data = _parse_json(text, path)  # raises, naming the file
    if "\\u" in text:
        _refuse_lone_surrogates(data, path)  # anywhere in the file (it is parsed once)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects (or one object per line)")
    for i in range(offset, len(data)):
        yield f"{path} item {i}", data[i], (i + 1, i + 1)


def _read_csv(path: str, fields: Fields, offset: int = 0, number: int = 0, delimiter: str = ",") -> Iterator:
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a UTF-8 byte-order mark is skipped
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            header = reader.fieldnames or []
            if twice := sorted({name for name in header if header.count(name) > 1}):
                # DictReader keeps the last column of a name: the others would be dropped without a word
                raise DataError(
                    f"{path} line 1: the header names {', '.join(map(repr, twice))[:200]} more than once; "
                    "give each column its own name"
                )
            for i, record in enumerate(reader):
                if i < offset:
                    continue
                where = f"{path} line {reader.line_num}"
                if None in record or None in record.values():
                    raise DataError(
                        f"{where}: has a different number of columns than the header ({len(reader.fieldnames or [])})"
                    )
                yield where, record, (i + 1, reader.line_num)
        except csv.Error as e:
            raise DataError(f"{path} line {reader.line_num}: unreadable CSV ({e})") from e


def _read_parquet(path: str, fields: Fields, offset: int = 0, number: int = 0) -> Iterator:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        row = 0
        for group in range(file.num_row_groups):
            size = file.metadata.row_group(group).num_rows
            if row + size <= offset:  # resuming: whole row groups before the position are never read
                row += size
                continue
            for record in file.read_row_group(group).to_pylist():
                if row >= offset:
                    yield f"{path} row {row}", record, (row + 1, row + 1)
                row += 1
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e


def _read_text(path: str, fields: Fields, offset: int = 0, number: int = 0) -> Iterator:
    for n, line, after in _lines(path, offset, number):
        if line.strip():
            yield f"{path} line {n}", {fields.text: line.rstrip("\r\n")}, (after, n)


_READERS = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "tsv": lambda path, fields, offset=0, number=0: _read_csv(path, fields, offset, number, "\t"),
    "parquet": _read_parquet,
    "text": _read_text,
}


def _read_saved_dataset(path: str, role: str) -> tuple[Any, str]:
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
    return data, path


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """The indices of `n` rows kept for training and held out (`fraction` of them, at least one, chosen by
    `seed`), each in file order."""
    if not 0 < fraction < 1:
        raise DataError(f"eval_fraction must be between 0 and 1, got {fraction}")
    k = max(1, round(fraction * n))
    if k >= n:
        raise DataError(f"eval_fraction={fraction} leaves no training examples out of {n}")
    held = set(random.Random(seed).sample(range(n), k))
    return [i for i in range(n) if i not in held], sorted(held)


def split_eval(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Hold out `fraction` of `rows` (at least one), chosen by `seed`; both parts keep the file order."""
    kept, held = split_indices(len(rows), fraction, seed)
    return [rows[i] for i in kept], [rows[i] for i in held]
