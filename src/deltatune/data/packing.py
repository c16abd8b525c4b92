"""Packing causal-LM examples into rows of `max_length` tokens."""

from __future__ import annotations

from typing import Any

from deltatune.data.sources import IGNORE_INDEX


def pack(examples: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Concatenate examples (each already ends with EOS) and cut them into blocks of `max_length` tokens."""
    ids = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    return [
        {"input_ids": ids[i : i + max_length], "labels": labels[i : i + max_length]}
        for i in range(0, len(ids), max_length)
        if any(t != IGNORE_INDEX for t in labels[i : i + max_length])
    ]
