"""Folded prefill: new prompts ride along in the running rows' decoding step (one model call, as vLLM's chunked
prefill does), instead of a model call of their own between two steps.

A decoding step of 16 rows on the OPT-125m shape reads every weight once for 16 tokens; a 20-token prompt's own
prefill reads them all again (on one CPU thread: 114 ms for the step, 86 ms more for the prefill; folded, the two
cost 132 ms). The step is laid out as one batch of single-token rows: first the running rows (their last tokens,
each at its own position), then every token of each new prompt (or of the next chunk of a long one), so the layers
that act token by token (every linear layer, the norms, the embeddings, and the mixed-adapter products, which take
one adapter per row) need nothing new. Only attention differs, and only here: the model's attention layers call
`attention` (registered with transformers' `AttentionInterface` under `NAME`, selected for the call only), which
attends the running rows to their slots of the lane's `RowCache` (the new column written in place, as a decoding
step does) and each prompt's tokens causally to themselves and to what earlier chunks of that prompt left. The
output head sees only the rows whose next token is picked (a running row; a prompt's last token).

Only models whose attention goes through the interface with full (not sliding-window) causal attention are folded
(`supports`); others prefill on their own as before. A DoRA adapter's lane (its rows can't share a mixed batch)
folds its own prompts the same way, with the adapter set for the call.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_utils import AttentionInterface

from deltatune.serve.kvcache import RowCache

NAME = "deltatune_folded"
# Model types checked to route attention through `AttentionInterface`, after the cache update, with causal
# attention over every earlier token (each tested: tests/test_serve_folded.py).
MODEL_TYPES = frozenset({"opt", "gpt2", "llama", "mistral", "qwen2"})

_ACTIVE: contextvars.ContextVar[FoldedStep | None] = contextvars.ContextVar(
    "deltatune_folded_step", default=None
)


def supports(model: torch.nn.Module) -> bool:
    """Whether `model`'s decoding steps can take prompts along (see the module's docstring)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in MODEL_TYPES:
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # The head sees only the picked rows; an adapter on the head would see fewer rows than its batch has.
    return type(head) is torch.nn.Linear


@dataclass(eq=False)
class Segment:
    """New tokens of one prompt: `ids` at positions `start ..`, after `past` (per layer `(keys, values)`
    `[1, heads, start, head_dim]`, an earlier chunk's) or nothing. After the step, `pairs` holds the prompt's keys
    and values so far (`past` and these tokens') and `logits` its last token's."""

    adapter: str
    ids: list[int]
    start: int = 0
    past: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    logits: torch.Tensor | None = None


class _Layer(DynamicLayer):
    """One layer of a folded step: the running rows' new keys/values go to column `end` of their slots; a
    prompt's are kept (with its earlier chunks') for `attention` and for the lane it joins."""

    is_croppable = False

    def __init__(self, step: FoldedStep, index: int):  # noqa: D107 (no super().__init__: nothing of its own)
        self.step, self.index = step, index
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        step, i = self.step, self.index
        cache, n = step.cache, step.decoding
        if n:
            cache.k[i][:n, :, cache.end : cache.end + 1] = key_states[:n]
            cache.v[i][:n, :, cache.end : cache.end + 1] = value_states[:n]
        at = n
        for seg in step.segments:
            width = len(seg.ids)
            # [width, heads, 1, head_dim] -> [1, heads, width, head_dim]
            k = key_states[at : at + width].transpose(0, 2)
            v = value_states[at : at + width].transpose(0, 2)
            if seg.past is not None:
                k = torch.cat([seg.past[i][0], k], dim=2)
                v = torch.cat([seg.past[i][1], v], dim=2)
            seg.pairs.append((k, v))
            at += width
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self) -> int:
        return -1


class FoldedStep(Cache):
    """The cache a folded step's model call gets; `run` makes the call."""

    def __init__(self, cache: RowCache | None, decoding: int, segments: list[Segment], layers: int):
        self.cache, self.decoding, self.segments = cache, decoding, segments
        super().__init__(layers=[_Layer(self, i) for i in range(layers)])

    def inputs(self, last: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_ids` and `position_ids` `[rows + prompt tokens, 1]`: the running rows' last tokens, then each
        segment's tokens."""
        ids = list(last)
        positions = [] if not self.decoding else self.cache.positions[: self.decoding].tolist()
        for seg in self.segments:
            ids += seg.ids
            positions += range(seg.start, seg.start + len(seg.ids))
        return (
            torch.tensor(ids, dtype=torch.long).view(-1, 1),
            torch.tensor(positions, dtype=torch.long).view(-1, 1),
        )

    def picked(self) -> list[int]:
        """Rows of the call whose logits are wanted: every running row, each segment's last token."""
        rows = list(range(self.decoding))
        at = self.decoding
        for seg in self.segments:
            at += len(seg.ids)
            rows.append(at - 1)
        return rows


def _attend(query, key, value, mask, scaling, is_causal=False):
    gqa = (
        key.shape[1] != query.shape[1]
    )  # grouped-query attention: each key/value head serves several queries
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=gqa
    )


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention of a folded step (see the module's docstring); `query` `[rows, heads, 1, head_dim]`.
    Returns `[rows, 1, heads, head_dim]`, as transformers' attention functions do."""
    step = _ACTIVE.get()
    if step is None:
        raise RuntimeError(f"the {NAME!r} attention runs only inside a folded decoding step")
    layer, n = module.layer_idx, step.decoding
    out = []
    if n:
        cache = step.cache
        columns = slice(cache.start, cache.end + 1)
        mask = cache.mask[:n, columns].bool()[:, None, None, :]
        out.append(
            _attend(query[:n], cache.k[layer][:n, :, columns], cache.v[layer][:n, :, columns], mask, scaling)
        )
    at = n
    for seg in step.segments:
        width = len(seg.ids)
        q = query[at : at + width].transpose(0, 2)  # [1, heads, width, head_dim]
        k, v = seg.pairs[layer]
        if seg.start:  # token i (at position start + i) sees the earlier chunks and tokens 0..i of this one
            mask = torch.ones(width, seg.start + width, dtype=torch.bool, device=q.device).tril(seg.start)
            o = _attend(q, k, v, mask, scaling)
        else:
            o = _attend(q, k, v, None, scaling, is_causal=True)
        out.append(o.transpose(0, 2))  # [width, heads, 1, head_dim]
        at += width
    return torch.cat(out, dim=0).transpose(1, 2), None


AttentionInterface.register(NAME, attention)


@contextlib.contextmanager
def _folded(model: torch.nn.Module, step: FoldedStep, picked: torch.Tensor):
    """Select the folded attention and a head that sees only the `picked` rows, for one call."""
    config = model.config
    before = config._attn_implementation
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _module, args: (args[0].index_select(0, picked), *args[1:]))
    token = _ACTIVE.set(step)
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
        _ACTIVE.reset(token)
        hook.remove()


def run(
    module: torch.nn.Module,
    base: torch.nn.Module,
    extra: dict[str, Any],
    cache: RowCache | None,
    last: list[int],
    segments: list[Segment],
    device: torch.device,
    cache_kwarg: str,
) -> torch.Tensor:
    """One folded step: `module` (the base or the adapters' wrapper around `base`) called with `extra` (its
    `adapter_names`: one per row of the call, see `adapter_names`). The running rows' new keys/values are written
    into `cache` (whose column `end` must be reserved, the step's mask column set); the caller advances it.
    Returns the running rows' logits `[rows, vocab]` (float); each segment gets its `pairs` and `logits`."""
    step = FoldedStep(cache, len(last), segments, base.config.num_hidden_layers)
    ids, positions = step.inputs(last)
    picked = torch.tensor(step.picked(), device=device)
    with _folded(base, step, picked), torch.inference_mode():
        out = module(
            input_ids=ids.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            **{cache_kwarg: step},
            **extra,
        )
    logits = out.logits[:, -1].float()
    for seg, row in zip(segments, logits[len(last) :]):
        seg.logits = row.unsqueeze(0)
    return logits[: len(last)]


def adapter_names(rows_adapters: list[str], segments: list[Segment]) -> list[str]:
    """The adapter of each row of a folded call: the running rows', then each prompt token's."""
    names = list(rows_adapters)
    for seg in segments:
        names += [seg.adapter] * len(seg.ids)
    return names
