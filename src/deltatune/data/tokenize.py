"""Tokenizing rows: label maps, classification and causal-LM encodings (prompt masking, chat templates), and
`load_datasets`, which reads, splits and tokenizes a run's data."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from deltatune.data import builtin as builtin_data
from deltatune.data.sources import IGNORE_INDEX, Fields, Row, read_rows, split_eval
from deltatune.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class Datasets:
    """Tokenized examples ready for `collate`, and what was learned reading them."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    label_map: dict[str, int] | None
    """Label name -> class id (classification only)."""
    format: str
    """`classification`, `text`, `prompt-completion` or `messages`."""


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


def _label_name(value: Any) -> str:
    return str(int(value)) if _is_int_label(value) else str(value)


def build_label_map(rows: list[Row], field: str, declared: list[str | int] | None = None) -> dict[str, int]:
    """Label name -> class id.

    With `declared` (the config's `labels:`), class `i` is its `i`-th entry and every label must be one of
    them. Otherwise string labels are sorted and numbered, and integer labels (or digit strings, as CSV gives
    them) are the class ids themselves, so they must be exactly `0..K-1` for the K classes seen: a label
    outside that range is refused (naming its file and line) rather than making a head with a class for
    every id up to it.
    """
    if declared is not None:
        label_map = {_label_name(v): i for i, v in enumerate(declared)}
        for row in rows:
            value = _field(row, field, (str, int))
            if _label_name(value) not in label_map:
                raise DataError(
                    f"{row[0]}: label {_short(value)} is not one of the declared labels "
                    f"({', '.join(label_map)}); add it to `labels:` in the config or fix the line"
                )
        return label_map
    labels = [_field(r, field, (str, int)) for r in rows]
    if len({_label_name(v) for v in labels}) < 2:
        raise DataError(
            f"{rows[0][0]}: every example has the label {_short(labels[0])}; a classifier needs two or more"
        )
    if all(_is_int_label(v) for v in labels):
        ids = sorted({int(v) for v in labels})
        k = len(ids)
        if ids != list(range(k)):
            bad = next(i for i in ids if not 0 <= i < k)
            where = next(r[0] for r, v in zip(rows, labels) if int(v) == bad)
            raise DataError(
                f"{where}: label {bad} is not a class id: integer labels must be the ids 0..{k - 1} of the {k} "
                f"classes seen ({_short(ids)}); fix the line, or declare the label set in the config "
                f"(labels: [...], class i is the i-th entry)"
            )
        return {str(i): i for i in ids}
    return {name: i for i, name in enumerate(sorted({str(v) for v in labels}))}


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...]"


def encode_classification(
    rows: list[Row], tokenizer: Any, fields: Fields, label_map: dict[str, int], max_length: int
) -> list[dict[str, Any]]:
    """`{"input_ids", "labels": class id}` per row, truncated to `max_length` tokens."""
    examples = []
    for row in rows:
        text = _field(row, fields.text)
        value = _field(row, fields.label, (str, int))
        label = _label_name(value)
        if label not in label_map:
            raise DataError(
                f"{row[0]}: label {_short(value)} never appears in the training data "
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


def load_datasets(
    data: str,
    tokenizer: Any,
    *,
    task: str,
    eval_data: str | None = None,
    eval_fraction: float = 0.0,
    fields: Fields | None = None,
    max_length: int = 128,
    seed: int = 0,
    labels: list[str | int] | None = None,
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
        seed: for the held-out fraction.
        labels: classification: the label set, class `i` being the `i`-th entry (default: the labels seen).
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
        label_map = build_label_map(rows, fields.label, labels)
        train = encode_classification(rows, tokenizer, fields, label_map, max_length)
        evals = encode_classification(eval_rows, tokenizer, fields, label_map, max_length)
        return Datasets(train, evals, label_map, "classification")
    fmt = causal_format(rows[0], fields)
    train = encode_causal(rows, tokenizer, fields, max_length, fmt)
    evals = encode_causal(eval_rows, tokenizer, fields, max_length, fmt)
    if not train:
        raise DataError(f"{data}: no example is left to train on after tokenizing (see the warnings above)")
    return Datasets(train, evals, None, fmt)
