"""Variable-length causal attention for packed rows without flash-attention (CPU, or CUDA without `flash_attn`).

transformers' SDPA path confines a packed row's examples to themselves with a dense block-diagonal mask: every
layer computes all `T x T` scores of the row (and the CPU kernels can't skip masked blocks), so packing ten
100-token examples into a 1,024-token row costs ~10x the attention of the examples alone. Here each example
(a *segment*: a run of position ids going up by one, restarting at every example) gets its own causal SDPA
call, `sum(L_i^2)` instead of `T^2`, as flash-attention's variable-length kernel does on CUDA.

It is a transformers attention function, registered under `NAME` in `AttentionInterface`. It is not a mask
implementation, so with it set `create_causal_mask` builds no mask at all (it returns None for implementations
it has no mask function for); the segments come from the `position_ids` every decoder layer passes to its
attention (Llama, GPT-2, OPT and most 5.x models), or from flash-style `cu_seq_lens_q/k` kwargs. `active`
sets it on a model only around a training step (forward and backward, so gradient-checkpoint recomputation
sees it too) and puts the model's own implementation back, so it never reaches a saved config, an evaluation
or generation. `data.packing.packed_attention` uses it only where a probe on the real model shows that packed
examples stay apart with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

NAME = "deltatune_varlen"
_cache: list[Any] = [None, -1, None]  # position ids, their version, their segments: every layer asks again
calls = [0]
"""How many attention calls took the per-segment path (the probe checks that the model's layers reach it)."""


def segments(position_ids: torch.Tensor, batch: int) -> list[list[tuple[int, int]]]:
    """`[(start, end), ...]` of every row: a segment starts where the position id does not go up by one."""
    if position_ids.shape[0] != batch:
        position_ids = position_ids.expand(batch, -1)
    t = position_ids.shape[1]
    starts = torch.diff(position_ids, dim=-1) != 1  # token c + 1 starts a segment
    rows: list[list[int]] = [[0] for _ in range(batch)]
    for r, c in starts.nonzero().tolist():  # one device->host copy for the whole batch
        rows[r].append(c + 1)
    return [[(a, b) for a, b in zip(cuts, cuts[1:] + [t])] for cuts in rows]


def _segments_cached(position_ids: torch.Tensor, batch: int) -> list[list[tuple[int, int]]]:
    if _cache[0] is position_ids and _cache[1] == position_ids._version and len(_cache[2]) == batch:
        return _cache[2]
    found = segments(position_ids, batch)
    _cache[:] = [position_ids, position_ids._version, found]
    return found


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA on each segment of each row (`query`: `[batch, heads, T, head_dim]`); anything else (a mask,
    a cache, a non-causal module, one segment per row) goes to transformers' own SDPA function."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward, use_gqa_in_sdpa

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    batch, _, t, _ = query.shape
    position_ids = kwargs.get("position_ids")
    found = None
    if attention_mask is None and causal and t > 1 and key.shape[2] == t and kwargs.get("softcap") is None:
        if position_ids is not None and position_ids.shape[-1] == t:
            found = _segments_cached(position_ids, batch)
        elif kwargs.get("cu_seq_lens_q") is not None and batch == 1:  # flash-style kwargs: one flattened row
            cuts = kwargs["cu_seq_lens_q"].tolist()
            if (
                cuts[-1] == t
                and kwargs.get("cu_seq_lens_k") is not None
                and kwargs["cu_seq_lens_k"].tolist() == cuts
            ):
                found = [list(zip(cuts[:-1], cuts[1:]))]
    if found is None or all(len(row) == 1 for row in found):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    extra = {}
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        if use_gqa_in_sdpa(None, key, value):
            extra["enable_gqa"] = True
        else:
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    calls[0] += 1
    rows = []
    for r, row in enumerate(found):
        parts = [
            torch.nn.functional.scaled_dot_product_attention(
                query[r : r + 1, :, a:b],
                key[r : r + 1, :, a:b],
                value[r : r + 1, :, a:b],
                dropout_p=dropout,
                is_causal=b - a > 1,
                scale=scaling,
                **extra,
            )
            for a, b in row
        ]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if batch > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `NAME` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, varlen_attention_forward)


def _configs(model: Any) -> list[Any]:
    inner = model.module if hasattr(model, "module") else model  # under DDP/FSDP
    seen: dict[int, Any] = {}
    for m in inner.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextlib.contextmanager
def active(model: Any) -> Iterator[None]:
    """`model` (every config inside it) attends with `NAME` inside the block, with its own implementation
    again after it, whatever happens."""
    register()
    configs = _configs(model)
    saved = [c._attn_implementation_internal for c in configs]
    try:
        for c in configs:
            c._attn_implementation_internal = NAME
        yield
    finally:
        for c, value in zip(configs, saved):
            c._attn_implementation_internal = value


def applies(model: Any) -> bool:
    """Whether to try variable-length SDPA on `model`: a causal LM whose implementation is SDPA or eager (not
    flash/flex, which have their own variable-length paths), with full attention in every layer (a sliding
    window or chunked layers would need their own mask)."""
    inner = model.module if hasattr(model, "module") else model
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None):
        return False
    return all(kind == "full_attention" for kind in (getattr(config, "layer_types", None) or []))
