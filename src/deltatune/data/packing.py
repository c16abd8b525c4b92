"""Packing causal-LM examples into rows of at most `max_length` tokens, without cross-talk.

A packed row holds whole examples side by side. Each example keeps its own position ids (0, 1, 2, ... from
its first token), its first token gets no label (nothing before it in *its* example predicts it), and the
model is made to attend only within an example, one of three ways, picked by `packed_attention` with a probe
on the real model:

- `varlen`: without flash-attention (CPU, or CUDA without `flash_attn`), for models on SDPA/eager: causal SDPA
  on each example separately (`deltatune.data.varlen`), set on the model only around each training step, so
  no dense `T x T` mask and no attention across the whole row is computed;
- `positions`: only `position_ids` and no attention mask: transformers (>= 4.54) then builds the
  block-diagonal causal mask itself (SDPA/eager) or uses flash-attention's variable-length kernel;
- `mask4d`: a block-diagonal causal 4-D mask passed as `attention_mask` (for models whose mask code
  ignores position ids, e.g. OPT), in the format of the model's attention implementation.

So every example's loss in a packed row equals its loss alone. Padding at the end of a row is a segment
of its own (position ids from 0, no labels), so it never mixes with an example either.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from deltatune.data import varlen
from deltatune.data.sources import IGNORE_INDEX

logger = logging.getLogger(__name__)


def pack_bins(lengths: Sequence[int] | np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Group examples into rows of at most `max_length` tokens: best-fit decreasing (longest first, each
    into the row it fills best), deterministic. Returns `(members, offsets)`: row `r` holds the examples
    `members[offsets[r]:offsets[r + 1]]`, in their original order."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > max_length or lengths.min() < 1):
        raise ValueError(f"example lengths must be in 1..{max_length}")
    order = np.argsort(-lengths, kind="stable")
    smallest = int(lengths.min()) if len(lengths) else 1
    bin_of = np.empty(len(lengths), dtype=np.int64)
    open_bins: dict[int, list[int]] = {}  # remaining capacity -> rows with exactly that much room
    capacities: list[int] = []  # the sorted keys of open_bins
    n_bins = 0
    for idx, length in zip(order.tolist(), lengths[order].tolist()):
        j = bisect.bisect_left(capacities, length)
        if j == len(capacities):
            b, room = n_bins, max_length - length
            n_bins += 1
        else:
            c = capacities[j]
            b, room = open_bins[c].pop(), c - length
            if not open_bins[c]:
                del open_bins[c]
                capacities.pop(j)
        bin_of[idx] = b
        if room >= smallest:
            if room not in open_bins:
                open_bins[room] = []
                bisect.insort(capacities, room)
            open_bins[room].append(b)
    members = np.lexsort((np.arange(len(lengths)), bin_of))  # by row, then by position in the file
    offsets = np.searchsorted(bin_of[members], np.arange(n_bins + 1))
    return members, offsets


def pack(examples: list[dict[str, Any]], max_length: int) -> list[list[dict[str, Any]]]:
    """The examples grouped into packed rows (see `pack_bins`); `collate_packed` makes the tensors."""
    members, offsets = pack_bins([len(e["input_ids"]) for e in examples], max_length)
    return [[examples[i] for i in members[a:b]] for a, b in zip(offsets[:-1], offsets[1:])]


def collate_packed(rows: list[list[dict[str, Any]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """`input_ids`, `labels` and `position_ids` of packed rows (each a list of causal-LM examples), padded to
    the longest row; position ids restart at every example (and at the padding), the first token of every
    example is unlabelled, so no label and no position crosses an example boundary. No attention mask: see
    `packed_attention` / `block_causal_mask`."""
    width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            n = len(e["input_ids"])
            input_ids[r, start : start + n] = torch.as_tensor(e["input_ids"])
            labels[r, start + 1 : start + n] = torch.as_tensor(e["labels"][1:], dtype=torch.long)
            position_ids[r, start : start + n] = torch.arange(n)
            start += n
        position_ids[r, start:] = torch.arange(width - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`[batch, 1, T, T]` causal mask confined to each segment (a segment starts where the position id
    does not go up by one): boolean (True: attend), or additive in `dtype` (0 or its minimum) for eager
    attention."""
    first = position_ids[:, :1] - 1
    segment = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    t = position_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & causal
    mask = mask[:, None]
    if dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def packed_inputs(batch: dict[str, torch.Tensor], mode: str, model: Any) -> dict[str, torch.Tensor]:
    """The model inputs for a packed batch in `mode` (`varlen`, `positions` or `mask4d`); `varlen` and
    `positions` take position ids alone (run `varlen` inside `packed_context`)."""
    inner = model.module if hasattr(model, "module") else model  # under DDP/FSDP
    implementation = str(getattr(getattr(inner, "config", None), "_attn_implementation", "sdpa"))
    if mode == "positions" and implementation.startswith("flash") and batch["input_ids"].shape[0] > 1:
        # flash-attention finds example boundaries in position ids only in a batch of one row (transformers'
        # `_is_packed_sequence`); otherwise each row would be attended causally as a whole. So the rows become
        # one row, as `DataCollatorWithFlattening` makes them (a row's first token is never a target).
        return {k: v.reshape(1, -1) for k, v in batch.items()}
    if mode == "mask4d":
        eager = implementation == "eager"
        dtype = next(p.dtype for p in inner.parameters()) if eager else None
        batch = batch | {"attention_mask": block_causal_mask(batch["position_ids"], dtype)}
    return batch


def packed_context(model: Any, mode: str | None) -> Any:
    """What a training step (forward and backward) on a packed batch of `mode` runs inside: `varlen.active`
    for `varlen`, nothing for the others."""
    return varlen.active(model) if mode == "varlen" else contextlib.nullcontext()


def packed_attention(model: Any, modes: Sequence[str] = ("varlen", "positions", "mask4d")) -> str:
    """How `model` keeps packed examples apart: the first of `modes` (`varlen`, `positions`, `mask4d`; see the
    module docs) that passes a probe: the logits of an example packed after another must equal its logits
    alone (and `varlen` must be what the model's attention layers actually ran). `varlen` is tried only where
    it applies (`varlen.applies`: no flash/flex attention, no sliding window).

    Raises:
        ValueError: neither works for this model (its attention can't be confined to an example).
    """
    inner = model.module if hasattr(model, "module") else model
    config = getattr(inner, "config", None)
    vocab = int(getattr(config, "vocab_size", 32) or 32)
    g = torch.Generator().manual_seed(0)
    first, second = torch.randint(1, vocab, (5,), generator=g), torch.randint(1, vocab, (4,), generator=g)
    dtype = next(p.dtype for p in inner.parameters())
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    device = next(p.device for p in inner.parameters())
    row = [
        [
            {"input_ids": first.tolist(), "labels": first.tolist()},
            {"input_ids": second.tolist(), "labels": second.tolist()},
        ]
    ]
    batch = {k: v.to(device) for k, v in collate_packed(row, 0).items() if k != "labels"}
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            alone = inner(input_ids=second[None].to(device), use_cache=False).logits[0].float()
            scale = tolerance * (1 + float(alone.abs().max()))
            for mode in modes:
                if mode == "varlen" and not varlen.applies(inner):
                    continue
                before = varlen.calls[0]
                try:
                    with packed_context(inner, mode):
                        out = (
                            inner(**packed_inputs(batch, mode, inner), use_cache=False).logits[0, 5:].float()
                        )
                except Exception as e:  # a model that can't take the inputs of this mode
                    logger.debug("packing mode %s fails on this model: %s", mode, e)
                    continue
                if mode == "varlen" and varlen.calls[0] == before:
                    logger.debug("packing mode varlen: this model's attention doesn't reach it")
                    continue
                if float((out - alone).abs().max()) <= scale:
                    return mode
    finally:
        inner.train(was_training)
    model_type = getattr(config, "model_type", type(inner).__name__)
    raise ValueError(
        f"the attention of this model ({model_type}, {getattr(config, '_attn_implementation', '?')}) can't be "
        "confined to each packed example (neither by position ids nor by a 4-D mask), so packing would let "
        "examples see each other; set packing=false and padding_free=false (group_by_length=true also cuts "
        "padding)"
    )
