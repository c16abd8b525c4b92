"""Training data: files or built-in sets -> tokenized examples -> padded batches.

Sources: JSONL (`.jsonl`, `.json` lists), CSV/TSV, Parquet, plain text (`.txt`: one example per
line), a folder written by `datasets`' `save_to_disk`, or `builtin:spam` / `builtin:quotes`.

Field mapping (`Fields`): `text` + `label` for classification; `text`, `prompt` + `completion` (loss on
the completion only) or `messages` (the tokenizer's chat template, loss on the assistant turns) for
causal LM, chosen by which fields the first row has. Errors name the file, the line (or row) and the field.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Any

import torch

from deltatune import builtin_data
from deltatune.errors import DataError  # noqa: F401  (re-exported: deltatune.data.DataError)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
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


@dataclass
class Datasets:
    """Tokenized examples ready for `collate`, and what was learned reading them."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    label_map: dict[str, int] | None
    """Label name -> class id (classification only)."""
    format: str
    """`classification`, `text`, `prompt-completion` or `messages`."""


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
    with open(path, encoding="utf-8") as f:
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
    with open(path, encoding="utf-8") as f:
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
    with open(path, encoding="utf-8", newline="") as f:
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
    with open(path, encoding="utf-8") as f:
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


# ---- tokenizing ---------------------------------------------------------------------------------------
def _field(row: Row, name: str, types: tuple[type, ...] = (str,)) -> Any:
    where, record = row
    if name not in record:
        raise DataError(
            f"{where}: no field {name!r} (it has {', '.join(map(repr, record)) or 'no fields'}); "
            f"map another column with fields.<role>=<column>"
        )
    value = record[name]
    if not isinstance(value, types) or isinstance(value, bool):
        raise DataError(
            f"{where}: field {name!r} should be {' or '.join(t.__name__ for t in types)}, got {value!r}"
        )
    return value


def _is_int_label(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and value.isdigit()
    )


def build_label_map(rows: list[Row], field: str) -> dict[str, int]:
    """Label name -> id: integer labels (or digit strings, as CSV gives them) keep their value; other
    strings are sorted and numbered."""
    labels = [_field(r, field, (str, int)) for r in rows]
    if all(_is_int_label(v) for v in labels):
        ids = sorted({int(v) for v in labels})
        label_map = {str(i): i for i in range(ids[-1] + 1)}
    else:
        label_map = {name: i for i, name in enumerate(sorted({str(v) for v in labels}))}
    if len(set(map(str, labels))) < 2:
        raise DataError(
            f"{rows[0][0]}: every example has the label {labels[0]!r}; a classifier needs two or more"
        )
    return label_map


def encode_classification(
    rows: list[Row], tokenizer: Any, fields: Fields, label_map: dict[str, int], max_length: int
) -> list[dict[str, Any]]:
    """`{"input_ids", "labels": class id}` per row, truncated to `max_length` tokens."""
    examples = []
    for row in rows:
        text = _field(row, fields.text)
        value = _field(row, fields.label, (str, int))
        label = str(int(value)) if _is_int_label(value) else str(value)
        if label not in label_map:
            raise DataError(
                f"{row[0]}: label {value!r} never appears in the training data "
                f"(known labels: {', '.join(label_map)})"
            )
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        examples.append({"input_ids": ids, "labels": label_map[label]})
    return examples


def causal_format(row: Row, fields: Fields) -> str:
    """Which causal-LM format a row has: `messages`, `prompt-completion` or `text`."""
    record = row[1]
    if fields.messages in record:
        return "messages"
    if fields.prompt in record or fields.completion in record:
        return "prompt-completion"
    if fields.text in record:
        return "text"
    raise DataError(
        f"{row[0]}: no {fields.text!r}, {fields.prompt!r}/{fields.completion!r} or {fields.messages!r} field "
        f"(it has {', '.join(map(repr, record))}); map a column with fields.text=<column>"
    )


def encode_causal(
    rows: list[Row], tokenizer: Any, fields: Fields, max_length: int, fmt: str
) -> list[dict[str, Any]]:
    """`{"input_ids", "labels": token ids or -100}` per row; an EOS token ends every example."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples, dropped = [], 0
    for row in rows:
        if fmt == "text":
            ids = tokenizer(_field(row, fields.text))["input_ids"] + eos
            labels = list(ids)
        elif fmt == "prompt-completion":
            prompt = tokenizer(_field(row, fields.prompt))["input_ids"]
            completion = (
                tokenizer(_field(row, fields.completion), add_special_tokens=False)["input_ids"] + eos
            )
            ids, labels = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
        else:
            ids, labels = _encode_messages(row, tokenizer, fields)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    if dropped:
        logger.warning(
            "%d example(s) had nothing to learn within max_length=%d tokens; skipped", dropped, max_length
        )
    return examples


def _encode_messages(row: Row, tokenizer: Any, fields: Fields) -> tuple[list[int], list[int]]:
    messages = _field(row, fields.messages, (list,))
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise DataError(f"{row[0]}: {fields.messages!r} must be a list of {{'role': ..., 'content': ...}}")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{row[0]}: the tokenizer has no chat template, so 'messages' can't be rendered; "
            "use a chat model's tokenizer or the text / prompt+completion fields"
        )

    def encode(turns: list[dict], generation_prompt: bool = False) -> list[int]:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = encode(messages)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = len(encode(messages[:i], True)), len(encode(messages[: i + 1]))
        if encode(messages[: i + 1]) != ids[:end]:
            logger.warning(
                "%s: the chat template renders a conversation's start differently from the whole, so the "
                "assistant turns can't be told apart; this example trains on every token",
                row[0],
            )
            return ids, list(ids)
        labels[start:end] = ids[start:end]
    return ids, labels


def pack(examples: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Concatenate examples (each already ends with EOS) and cut them into blocks of `max_length` tokens."""
    ids = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    return [
        {"input_ids": ids[i : i + max_length], "labels": labels[i : i + max_length]}
        for i in range(0, len(ids), max_length)
        if any(t != IGNORE_INDEX for t in labels[i : i + max_length])
    ]


def load_datasets(
    data: str,
    tokenizer: Any,
    *,
    task: str,
    eval_data: str | None = None,
    eval_fraction: float = 0.0,
    fields: Fields | None = None,
    max_length: int = 128,
    packing: bool = False,
    seed: int = 0,
) -> Datasets:
    """Read, split and tokenize the training and eval data.

    Args:
        data: a file, a `save_to_disk` folder or `builtin:<name>`.
        tokenizer: a Hugging Face tokenizer.
        task: `seq-cls` or `causal-lm`.
        eval_data: a held-out file; if None and `eval_fraction` is 0, a built-in set's own eval split.
        eval_fraction: hold out this fraction of `data` instead (chosen with `seed`).
        fields: column names.
        max_length: longer examples are truncated to this many tokens.
        packing: causal LM: concatenate examples into full `max_length` blocks (no padding).
        seed: for the held-out fraction.
    """
    fields = fields or Fields()
    rows = read_rows(data, fields, "train")
    if eval_data is not None and eval_fraction:
        raise DataError("set either eval_data or eval_fraction, not both")
    eval_data = eval_data or (None if eval_fraction else builtin_data.default_eval(data))
    if eval_data is not None:
        eval_rows = read_rows(eval_data, fields, "eval")
    elif eval_fraction:
        rows, eval_rows = split_eval(rows, eval_fraction, seed)
    else:
        eval_rows = []
    if task == "seq-cls":
        label_map = build_label_map(rows, fields.label)
        train = encode_classification(rows, tokenizer, fields, label_map, max_length)
        evals = encode_classification(eval_rows, tokenizer, fields, label_map, max_length)
        return Datasets(train, evals, label_map, "classification")
    fmt = causal_format(rows[0], fields)
    train = encode_causal(rows, tokenizer, fields, max_length, fmt)
    evals = encode_causal(eval_rows, tokenizer, fields, max_length, fmt)
    if packing:
        train, evals = pack(train, max_length), pack(evals, max_length)
    if not train:
        raise DataError(f"{data}: no example is left to train on after tokenizing (see the warnings above)")
    return Datasets(train, evals, None, fmt)


# ---- batching -----------------------------------------------------------------------------------------
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


def epoch_batches(
    n: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """This rank's batches (example indices) for one epoch: a seeded shuffle, padded to a multiple of the
    world size by repeating its start (as `DistributedSampler` does), then every `world`-th index."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    order += order[: (-n) % world]
    mine = order[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def eval_batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This rank's eval batches in order; every rank gets the same number, padded with -1 (no example)."""
    order = list(range(n)) + [-1] * ((-n) % world)
    mine = order[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def batches_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """How many batches each rank gets per epoch."""
    return math.ceil(math.ceil(n / world) / batch_size)
