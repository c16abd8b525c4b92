"""Tokenizing rows: label maps, classification and causal-LM encodings (prompt masking, chat templates), one
row at a time (`encode_classification`, `encode_causal`) or a batch of normalized rows at a time
(`normalize` + `encode_batch`, what `datasets.map` runs in parallel)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from deltatune.data.sources import IGNORE_INDEX, Fields, Row
from deltatune.errors import DataError

logger = logging.getLogger(__name__)


# ---- tokenizing ---------------------------------------------------------------------------------------
def _field(row: Row, name: str, types: tuple[type, ...] = (str,), label: bool = False) -> Any:
    where, record = row
    if name not in record:
        raise DataError(
            f"{where}: no field {name!r} (it has {', '.join(map(repr, record)) or 'no fields'}); "
            f"map another column with fields.<role>=<column>"
            + (", or set task=causal-lm to train a language model on unlabelled text" if label else "")
        )
    value = record[name]
    if not isinstance(value, types) or isinstance(value, bool):
        raise DataError(
            f"{where}: field {name!r} should be {' or '.join(t.__name__ for t in types)}, got {value!r}"
        )
    if label and isinstance(value, str) and not value.strip():  # it was a class named ''
        raise DataError(
            f"{where}: field {name!r} is empty; every example needs its label (a blank CSV cell?)"
        )
    return value


def _is_turn(message: Any) -> bool:
    """A chat turn: `{"role": <text>, "content": <text, or a list of parts as multimodal templates take>}` (a
    null or numeric content was rendered as 'None' or '5' and trained on)."""
    return (
        isinstance(message, dict)
        and isinstance(message.get("role"), str)
        and isinstance(message.get("content"), (str, list))
    )


def _is_int_label(value: Any) -> bool:
    """An integer, or a string of ASCII digits (as CSV gives integers); not '²' or '٣' (str.isdigit says yes,
    `int` fails or reads another script), nor a number too long to be a class id (`int` refuses 4300 digits)."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18
    )


def label_name(value: Any) -> str:
    """A label as a class name: an integer or a string of digits as its number (`"00"`, `"0"` and 0 are "0")."""
    return str(int(value)) if _is_int_label(value) else str(value)


def build_label_map(rows: list[Row], field: str, declared: list[str | int] | None = None) -> dict[str, int]:
    """Label name -> class id for the rows' `field` (see `label_map_of`)."""
    return label_map_of(
        ((r[0], label_name(_field(r, field, (str, int), label=True))) for r in rows), declared
    )


def label_map_of(
    labels: Iterable[tuple[str, str]], declared: list[str | int] | None = None
) -> dict[str, int]:
    """Label name -> class id, from `(where, label name)` pairs (names as `label_name` makes them).

    With `declared` (the config's `labels:`), class `i` is its `i`-th entry and every label must be one of
    them. Otherwise string labels are sorted and numbered, and integer labels (or digit strings, as CSV gives
    them) are the class ids themselves, so they must be exactly `0..K-1` for the K classes seen: a label
    outside that range is refused (naming its file and line) rather than making a head with a class for
    every id up to it.
    """
    if declared is not None:
        label_map = {label_name(v): i for i, v in enumerate(declared)}
        for where, name in labels:
            if name not in label_map:
                raise DataError(
                    f"{where}: label {_show(name)} is not one of the declared labels "
                    f"({', '.join(label_map)}); add it to `labels:` in the config or fix the line"
                )
        return label_map
    first: dict[str, str] = {}  # label name -> where it first appears
    for where, name in labels:
        first.setdefault(name, where)
    if not first:
        raise DataError("no examples to read labels from")
    if len(first) < 2:
        ((name, where),) = first.items()
        raise DataError(f"{where}: every example has the label {_show(name)}; a classifier needs two or more")
    numbers = [name for name in first if _is_int_label(name)]
    if numbers and len(numbers) < len(first):  # 0, 1 and "spam": class ids, or names sorted? Neither is safe
        text = next(name for name in first if not _is_int_label(name))
        raise DataError(
            f"{first[text]}: label {_short(text)} is text, but {first[numbers[0]]} has the integer label "
            f"{numbers[0]}; give every example the same kind of label, or declare the label set in the config "
            "(labels: [...], class i is the i-th entry)"
        )
    if numbers:
        ids = sorted(int(name) for name in first)
        k = len(ids)
        if ids != list(range(k)):
            bad = next(i for i in ids if not 0 <= i < k)
            raise DataError(
                f"{first[str(bad)]}: label {bad} is not a class id: integer labels must be the ids 0..{k - 1} "
                f"of the {k} classes seen ({_short(ids)}); fix the line, or declare the label set in the config "
                f"(labels: [...], class i is the i-th entry)"
            )
        return {str(i): i for i in ids}
    return {name: i for i, name in enumerate(sorted(first))}


def _show(name: str) -> str:
    return name if _is_int_label(name) else _short(name)


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
        value = _field(row, fields.label, (str, int), label=True)
        label = label_name(value)
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
        if (fmt == "text" and not _field(row, fields.text).strip()) or not learnable(labels):
            dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    if dropped:
        logger.warning(
            "%d example(s) were empty or had nothing to learn within max_length=%d tokens; skipped",
            dropped,
            max_length,
        )
    return examples


def learnable(labels: list[int]) -> bool:
    """Whether a causal-LM example trains anything: a label past the first token (the first is never
    predicted: each label is predicted from the tokens before it), so an empty text (only its BOS/EOS)
    or a prompt that fills `max_length` is left out rather than giving a loss over nothing."""
    return any(label != IGNORE_INDEX for label in labels[1:])


def _encode_messages(row: Row, tokenizer: Any, fields: Fields) -> tuple[list[int], list[int]]:
    messages = _field(row, fields.messages, (list,))
    if not messages or not all(_is_turn(m) for m in messages):
        raise DataError(
            f"{row[0]}: {fields.messages!r} must be a non-empty list of {{'role': <text>, 'content': <text>}}"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{row[0]}: the tokenizer has no chat template, so 'messages' can't be rendered; "
            "use a chat model's tokenizer or the text / prompt+completion fields"
        )

    def encode(turns: list[dict], generation_prompt: bool = False) -> list[int]:
        try:
            text = tokenizer.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # the template's own checks (`raise_exception`: roles must alternate, ...)
            raise DataError(
                f"{row[0]}: the tokenizer's chat template refuses this conversation ({type(e).__name__}: "
                f"{str(e)[:200]}); fix the line"
            ) from e
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = encode(messages)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # a conversation may open with the assistant: nothing before it (no empty one to render; its role
        # header, if the template writes one, is learned with it)
        start, end = len(encode(messages[:i], True)) if i else 0, len(encode(messages[: i + 1]))
        if encode(messages[: i + 1]) != ids[:end]:
            logger.warning(
                "%s: the chat template renders a conversation's start differently from the whole, so the "
                "assistant turns can't be told apart; this example trains on every token",
                row[0],
            )
            return ids, list(ids)
        labels[start:end] = ids[start:end]
    return ids, labels


# ---- batches of normalized rows (the Arrow path) --------------------------------------------------------
COLUMNS = {
    "classification": ("text", "label"),
    "text": ("text",),
    "prompt-completion": ("prompt", "completion"),
    "messages": ("messages",),
}
"""The columns of a normalized row of each format (besides `_where`, its location)."""


class Where:
    """A row's location ("file line N"), worked out only if a message needs it: the Arrow path stores row
    numbers, not these strings (they would cost more than the text of short rows)."""

    def __init__(self, locate: Callable[[int], str], index: int):
        self.locate, self.index = locate, index

    def __str__(self) -> str:
        return self.locate(self.index)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def normalize(row: Row, fmt: str, fields: Fields) -> dict[str, str]:
    """The row's fields under their canonical names, type-checked (errors name the line and the field):
    what `encode_batch` reads. Labels become strings (`7`, `"7"` -> `"7"`), messages a JSON string."""
    out = {"_where": row[0]}
    if fmt == "classification":
        out["text"] = _field(row, fields.text)
        out["label"] = label_name(_field(row, fields.label, (str, int), label=True))
    elif fmt == "text":
        out["text"] = _field(row, fields.text)
    elif fmt == "prompt-completion":
        out["prompt"], out["completion"] = _field(row, fields.prompt), _field(row, fields.completion)
    else:
        messages = _field(row, fields.messages, (list,))
        if not messages or not all(_is_turn(m) for m in messages):
            raise DataError(
                f"{row[0]}: {fields.messages!r} must be a non-empty list of {{'role': <text>, 'content': <text>}}"
            )
        out["messages"] = json.dumps(messages, ensure_ascii=False)
    return out


def _tokenize(tokenizer: Any, texts: list[str], wheres: list[str], **kwargs: Any) -> list[list[int]]:
    try:
        return tokenizer(texts, **kwargs)["input_ids"]
    except Exception:  # find the row and say which it is
        for text, where in zip(texts, wheres):
            try:
                tokenizer(text, **kwargs)
            except Exception as e:
                raise DataError(f"{where}: the tokenizer fails on this row ({type(e).__name__}: {e})") from e
        raise


def encode_batch(
    batch: dict[str, list],
    *,
    tokenizer: Any,
    fmt: str,
    max_length: int,
    label_map: dict[str, int] | None = None,
    locate: Callable[[int], str] | None = None,
) -> dict[str, list]:
    """Tokenize a batch of normalized rows (columns as `normalize` makes them) into `input_ids`, `labels`
    and `length`; causal-LM rows that are empty (a text of only whitespace) or have nothing to learn within
    `max_length` are left out. Rows are named by
    their `_where` column, or by `locate(_row)` when a message needs it."""
    if "_where" in batch:
        wheres = batch["_where"]
    else:
        wheres = [Where(locate or str, i) for i in batch["_row"]]
    if fmt == "classification":
        ids = _tokenize(tokenizer, batch["text"], wheres, truncation=True, max_length=max_length)
        labels = [label_map[name] for name in batch["label"]]
        return {"input_ids": ids, "labels": labels, "length": [len(x) for x in ids]}
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pairs = []
    if fmt == "text":
        for text, ids in zip(batch["text"], _tokenize(tokenizer, batch["text"], wheres)):
            pairs.append((ids + eos, ids + eos) if text.strip() else ([], []))  # empty: left out below
    elif fmt == "prompt-completion":
        prompts = _tokenize(tokenizer, batch["prompt"], wheres)
        completions = _tokenize(tokenizer, batch["completion"], wheres, add_special_tokens=False)
        for prompt, completion in zip(prompts, completions):
            completion = completion + eos
            pairs.append((prompt + completion, [IGNORE_INDEX] * len(prompt) + completion))
    else:
        for where, messages in zip(wheres, batch["messages"]):
            pairs.append(_encode_messages((where, {"messages": json.loads(messages)}), tokenizer, Fields()))
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    for ids, labels in pairs:
        ids, labels = ids[:max_length], labels[:max_length]
        if not learnable(labels):
            continue  # empty, or nothing to learn (counted by the caller)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
    return out
