"""LoRA: a low-rank update `(alpha / r) * B @ A` beside a frozen layer (Hu et al., 2021), and DoRA.

One wrapper per layer type (the dict at the bottom is the whole dispatch). A wrapper owns its frozen
`base_layer` next to `lora_A`/`lora_B` dicts keyed by adapter name, so several adapters share one base,
and the parameter names are PEFT's (`<layer>.lora_A.<adapter>.weight`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from deltatune import inject
from deltatune.config import LoraConfig
from deltatune.methods.mixed import MIXED, MixedBatch, rows_view
from deltatune.vocab import is_conv1d, shape_of

PREFIX = "lora_"


def _device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


_is_conv1d = is_conv1d

# PEFT's per-architecture LoRA defaults (config.model_type -> target names).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "albert": ["query", "value"],
    "mpnet": ["q", "v"],
}


# The fused LoRA linear (below) can be turned off, e.g. to compare against the plain path:
# `deltatune.methods.lora.FUSED = False` or DELTATUNE_FUSED_LORA=0.
FUSED = os.environ.get("DELTATUNE_FUSED_LORA", "1") != "0"
# DoRA's row norms by expansion on the CPU (see `_FusedLoraLinear`); False computes them from `W + sBA` directly,
# as other devices do (`benchmarks/dora_norms.py` times both)
DORA_NORMS_BY_EXPANSION = True
# quantized bases the fused path dequantizes itself (bitsandbytes' LLM.int8 matmul is not a dequantize + matmul)
_FUSED_QUANT = {("nf4", "bitsandbytes"), ("int8", "torch")}


class _FusedLoraLinear(torch.autograd.Function):
    """`y = x W^T + s (x A^T) B^T + b` with a frozen W, in one pass; with a DoRA magnitude `m`,
    `y = m / ||W + s B A||_row * (x W^T + s (x A^T) B^T) + b` (the norm detached, as in PEFT and the paper).

    Saves `x` (which the LoRA gradient needs anyway) and the rank-r `x A^T` (`[tokens, r]`: r / in of `x`'s
    size; recomputing it in backward cost one more pass over `x` per layer, ~4% of an all-linear step),
    instead of keeping the separate branch outputs; the LoRA product is added into the base output in
    place (`addmm_`), and the input gradient's LoRA term into `g W` in place, with no `[tokens, out]`
    temporaries (DoRA scales the output in place and saves it: its magnitude's gradient recovers the unscaled
    product from it).

    DoRA's row norms `||W + s B A||` are, on the CPU, not computed from the `[out, in]` sum (which wrote and
    read a weight-sized tensor per layer: ~3% of a Llama-125m all-linear step) but expanded:
    `||W_i||² + 2s B_i·(A W_iᵀ) + s² B_i (A Aᵀ) B_iᵀ`, with `||W_i||²` of the frozen weight passed in (cached by
    the layer) and `A Wᵀ` taken from the base matmul itself, whose input gets A's r rows appended
    (`[x; A] Wᵀ`: r more rows in a GEMM of `tokens` rows). Where the sum cancels (a row of `W + sBA` under
    1/10 of `W`'s in norm) the norms are computed directly, as on other devices.

    `source` is a frozen quantized linear (`QuantizedLinear`) or None. With a quantized base, `weight` is
    None: the weight is dequantized inside forward, used and freed at once, and dequantized again in backward
    only if the input needs a gradient, so at most one layer's full-precision weight is alive at any time
    (QLoRA's memory saving, kept in the fused path).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, magnitude, scale: float, source, weight_sq):
        x2 = x.reshape(-1, x.shape[-1])
        w = source.dequantize() if source is not None else weight
        ctx.dora = magnitude is not None
        expand = ctx.dora and x2.device.type == "cpu" and DORA_NORMS_BY_EXPANSION
        if expand:  # DoRA's `A Wᵀ` from the same GEMM (see above); `out`: a contiguous view of its first rows
            both = F.linear(torch.cat([x2, lora_a]), w)
            out, a_w = both[: x2.shape[0]], both[x2.shape[0] :]
        else:
            out = F.linear(x2, w)
        xa = x2 @ lora_a.T  # [tokens, r]
        out.addmm_(xa, lora_b.T, alpha=scale)
        # DoRA's magnitude gradient needs the unscaled product `x Wᵀ + s x Aᵀ Bᵀ`. On the CPU it is recovered in
        # backward from the output (`(y - b) / factor`), so the scaling is done in place and no second
        # `[tokens, out]` tensor is made or kept. The product itself is kept when a magnitude is 0 (factor 0: the
        # output lost it), and on other devices, where checking for that would wait for the device at every layer.
        product = None
        if ctx.dora:
            with torch.no_grad():
                norm = _dora_row_norms(w, lora_a, lora_b, scale, a_w if expand else None, weight_sq)
            factor = magnitude.detach() / norm
            if out.device.type == "cpu" and bool((factor != 0).all()):
                out.mul_(factor)
            else:
                product, out = out, out * factor
        del w  # a dequantized weight is freed here, before the next layer dequantizes its own
        if bias is not None:
            out.add_(bias)
        result = out.view(*x.shape[:-1], out.shape[-1])
        saved = (x2, weight, lora_a, lora_b, xa)
        if ctx.dora:
            ctx.save_for_backward(*saved, norm, factor, result if product is None else product, bias)
        else:
            ctx.save_for_backward(*saved)
        ctx.scale, ctx.source, ctx.x_shape, ctx.from_output = scale, source, x.shape, product is None
        return result

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, lora_a, lora_b, xa, *dora = ctx.saved_tensors
        scale = ctx.scale
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_bias = grad_a = grad_b = grad_m = None
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        if ctx.dora:
            norm, factor, kept, bias = dora
            if ctx.needs_input_grad[5]:
                if ctx.from_output:  # sum_t g * (y - b) / factor (no `[tokens, out]` temporary for y - b)
                    grad_m = (g * kept.reshape(g.shape)).sum(0)
                    if bias is not None:
                        grad_m.sub_((grad_bias if grad_bias is not None else g.sum(0)) * bias)
                    grad_m.div_(factor)
                else:
                    grad_m = (g * kept).sum(0)
                grad_m.div_(norm)
            g = g * factor
        # The rank-r products are laid out so that the wide operand is read row by row: `g B` as `g (Bᵀ)ᵀ`
        # with `Bᵀ` made contiguous (`[r, out]`, tiny), and `gᵀ xa` as `(xaᵀ g)ᵀ`. With `B` as stored
        # (`[out, r]`) and `gᵀ` as a transposed view, the CPU's GEMM takes 2.5–6× longer on the same
        # numbers (768→2048 at 512 tokens: 0.60 → 0.24 ms and 1.56 → 0.25 ms), ~0.1 s of an all-linear
        # Llama-125m step.
        g_b = (g @ lora_b.T.contiguous().T).mul_(scale)  # [tokens, r], scaled once for both uses
        if ctx.needs_input_grad[0]:
            w = ctx.source.dequantize() if ctx.source is not None else weight
            grad_x = (g @ w).addmm_(g_b, lora_a).view(ctx.x_shape)
            del w
        if ctx.needs_input_grad[3]:
            grad_a = g_b.T @ x2
        if ctx.needs_input_grad[4]:
            grad_b = (xa.T @ g).mul_(scale).T
        return grad_x, None, grad_bias, grad_a, grad_b, grad_m, None, None, None


def _dora_row_norms(w, lora_a, lora_b, scale: float, a_w, weight_sq) -> torch.Tensor:
    """`||W + s B A||` per output row. Given `a_w = A Wᵀ` (`[r, out]`), by the expansion
    `||W_i||² + s B_i·(2 (A Wᵀ)ᵀ_i + s (A Aᵀ) B_iᵀ)`, in fp32 and without an `[out, in]` temporary (`weight_sq`, the
    `||W_i||²`, is computed here when not given); directly when `a_w` is None or where the expansion cancels."""
    if a_w is not None:
        a, b = lora_a.float(), lora_b.float()
        if weight_sq is None:
            weight_sq = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square_()
        # 2 (A Wᵀ)ᵀ + s B (A Aᵀ): [out, r]; then sum_k B_ik * that_ik
        inner = torch.addmm(a_w.T.float(), b, a @ a.T, beta=2, alpha=scale)
        sq = torch.linalg.vecdot(b, inner, dim=1).mul_(scale).add_(weight_sq)
        # under (1/10)² of ||W_i||², fp32 rounding of the two sums would show in the norm: compute it directly
        if not bool((sq < weight_sq * 0.01).any()):
            return sq.sqrt_().to(w.dtype)
    return torch.linalg.norm(torch.addmm(w, lora_b, lora_a, alpha=scale), dim=1)


class _LoraLayer(nn.Module):
    """Bookkeeping shared by the LoRA wrappers: adapters by name, which are active, which are merged."""

    is_delta_layer = True
    supports_merge = True
    supports_mixed_batch = True  # DoRA adapters are refused with a clear message (`_check_mixable`)
    merges_into_weight = True

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._stack_key: tuple | None = None
        self._stack: tuple[torch.Tensor, torch.Tensor] | None = None
        # the stack as two matrices, for decoding steps (`_flat_stack`)
        self._flat: tuple[torch.Tensor, torch.Tensor] | tuple[None, None] | None = None

    @property
    def adapters(self) -> list[str]:
        return list(self.r)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def reset_cache(self) -> None:
        """Forget the stacked adapters of mixed batches (their weights were replaced)."""
        self._stack_key = None

    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = [n for n in names if n in self.r]

    def _register(self, name: str, r: int, alpha: float, use_rslora: bool, use_dora: bool) -> None:
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.use_dora[name] = use_dora

    def delete(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base; unmerge it before deleting it")
        for holder in (
            "lora_A",
            "lora_B",
            "lora_dropout",
            "lora_embedding_A",
            "lora_embedding_B",
            "lora_magnitude_vector",
        ):
            d = getattr(self, holder, None)
            if d is not None and name in d:
                del d[name]
        for d in (
            self.r,
            self.lora_alpha,
            self.scaling,
            self.use_dora,
            self.__dict__.get("_dora_factors", {}),
        ):
            d.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def merge(self, adapter_names: Iterable[str] | None = None) -> None:
        """Add the adapters' deltas into the base weight (idempotent per adapter)."""
        if getattr(self.base_layer, "is_quantized_linear", False):
            raise ValueError("cannot merge into a quantized base in place; use merge_and_unload(dtype=...)")
        weight = self.base_layer.weight
        for name in list(adapter_names) if adapter_names is not None else list(self.active_adapters):
            if name not in self.r or name in self.merged_adapters:
                continue
            with torch.no_grad():
                merged = self._merged_weight(name, weight.float())
                weight.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract merged deltas again, last merged first (exact up to the base dtype's rounding)."""
        if not self.merged_adapters:  # nothing to do; a quantized base has no `weight` (and never merges)
            return
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                weight.copy_(self._unmerged_weight(name, weight.float()).to(weight.dtype))

    def _merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight(name)

    def _unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.delta_weight(name)

    def _stacked(self, slots: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapters of this layer stacked for a mixed batch: `A [n+1, r_max, in]`, `B*scale [n+1, out, r_max]`,
        slot 0 all zero (the base). Rebuilt only when a weight changed (tracked by tensor versions)."""
        a_params, b_params = self._ab_params()
        key = tuple(
            (n, a_params[n].data_ptr(), a_params[n]._version, b_params[n]._version, self.scaling[n])
            for n in slots
        )
        if key != self._stack_key:
            r_max = max(self.r[n] for n in slots)
            a0, b0 = self._ab_matrix(slots[0])
            with torch.no_grad():
                a_stack = a0.new_zeros(len(slots) + 1, r_max, a0.shape[1])
                b_stack = b0.new_zeros(len(slots) + 1, b0.shape[0], r_max)
                for i, n in enumerate(slots, start=1):
                    a, b = self._ab_matrix(n)
                    a_stack[i, : self.r[n]] = a
                    b_stack[i, :, : self.r[n]] = b * self.scaling[n]
            self._stack_key, self._stack, self._flat = key, (a_stack, b_stack), None
        return self._stack  # type: ignore[return-value]

    def _flat_stack(
        self, a_stack: torch.Tensor, b_stack: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The current stack (`_stacked`'s, just returned: a rebuild clears this one) as two matrices,
        `A [(n+1)·r_max, in]` and `B*scale [(n+1)·r_max, out]`, for decoding steps; None when a stacked weight is
        not finite (see `_forward_mixed`)."""
        if self._flat is None:
            with torch.no_grad():
                finite = bool(torch.isfinite(a_stack).all()) and bool(torch.isfinite(b_stack).all())
                a_flat = a_stack.reshape(-1, a_stack.shape[-1])
                b_flat = b_stack.transpose(1, 2).reshape(-1, b_stack.shape[1])
            self._flat = (a_flat, b_flat) if finite else (None, None)
        return None if self._flat[0] is None else self._flat

    def delta_oi(self, name: str) -> torch.Tensor:
        """`scale * B @ A` as `[out, in]` (`[dim, vocab]` for an embedding), fp32."""
        a, b = self._ab_matrix(name)
        return (b.float() @ a.float()) * self.scaling[name]

    def combine(self, new: str, adapters: list[str], weights: list[float], how: str) -> None:
        """Set adapter `new` (scaling 1) to a weighted combination of `adapters`, with PEFT's meanings:
        `cat` stacks the weighted ranks (exactly `sum w_i dW_i`), `linear` mixes A's and B's with
        `sqrt(w_i * scale_i)` weights (same ranks), `svd` takes the top singular directions of `sum w_i dW_i`."""
        present = [(a, w) for a, w in zip(adapters, weights) if a in self.r]
        new_a, new_b = self._ab_matrix(new)
        with torch.no_grad():
            new_a.zero_()
            new_b.zero_()
            if not present:
                return
            if how == "cat":
                a_cat = torch.cat([self._ab_matrix(a)[0] * w * self.scaling[a] for a, w in present], dim=0)
                b_cat = torch.cat([self._ab_matrix(a)[1] for a, _ in present], dim=1)
                new_a[: a_cat.shape[0]] = a_cat
                new_b[:, : b_cat.shape[1]] = b_cat
            elif how == "linear":
                for a, w in present:
                    ws = w * self.scaling[a]
                    new_a += math.copysign(math.sqrt(abs(ws)), ws) * self._ab_matrix(a)[0]
                    new_b += math.sqrt(abs(ws)) * self._ab_matrix(a)[1]
            else:
                delta = sum(w * self.delta_oi(a) for a, w in present)
                u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
                r = min(self.r[new], sv.shape[0])
                new_b[:, :r] = u[:, :r] * sv[:r]
                new_a[:r] = vh[:r]

    def _check_mixable(self, mix: MixedBatch) -> tuple[str, ...]:
        """The slots of a mixed batch's stack: every (non-DoRA) adapter of this layer in a fixed order, or () when
        no row of `mix` uses one of them. Stacking all of them, not only those the batch names, keeps the stack
        when the running batch's set of adapters changes, as it does at many steps of continuous batching (rows
        join and leave): 16 clients over 8 adapters rebuilt it in 38% of the layer calls (an allocation and a
        copy of every stacked weight each time), and now only when an adapter is loaded, evicted or changed."""
        wanted = [n for n in self.r if n in mix.name_set]
        if any(self.use_dora[n] for n in wanted):
            raise ValueError(
                "mixed-adapter batches do not support DoRA adapters; run them one adapter at a time"
            )
        return tuple(n for n in self.r if not self.use_dora[n]) if wanted else ()


class LoraLinear(_LoraLayer):
    """LoRA beside `nn.Linear`, transformers' `Conv1D` (weight stored `[in, out]`) or a frozen quantized linear."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = _is_conv1d(base_layer)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self._dora_norms: dict[str, torch.Tensor] = {}

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as `[out, in]` (dequantized if the base is quantized)."""
        if getattr(self.base_layer, "is_quantized_linear", False):
            return self.base_layer.dequantize()
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def add(self, name: str, r: int, alpha: float, config: LoraConfig) -> None:
        self._register(name, r, alpha, config.use_rslora, config.use_dora)
        device = _device(self.base_layer)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout[name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self._init_weights(name, config.init_lora_weights)
        if config.use_dora:
            with torch.no_grad():
                norm = self._weight_norm(self.base_weight().float(), name)
            self.lora_magnitude_vector[name] = nn.Parameter(norm)
        self.set_active([*self.active_adapters, name] if not self.active_adapters else self.active_adapters)

    def _init_weights(self, name: str, init: bool | str) -> None:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            if init is False:
                return
            if init == "pissa":
                self._pissa_init(name)
                return
            if init == "gaussian":
                nn.init.normal_(a, std=1 / self.r[name])
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    def _pissa_init(self, name: str) -> None:
        if getattr(self.base_layer, "is_quantized_linear", False):
            raise ValueError(
                "init_lora_weights='pissa' needs a float base; it can't rewrite a quantized weight"
            )
        weight = self.base_weight().float()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        r, scale = self.r[name], self.scaling[name]
        sr = s[:r] / scale
        self.lora_A[name].weight.copy_(torch.diag(sr.sqrt()) @ vh[:r])
        self.lora_B[name].weight.copy_(u[:, :r] @ torch.diag(sr.sqrt()))
        residual = weight - scale * self.lora_B[name].weight @ self.lora_A[name].weight
        base = self.base_layer.weight
        base.copy_((residual.T if self.fan_in_fan_out else residual).to(base.dtype))

    def _ab_params(self) -> tuple[dict, dict]:
        return ({n: m.weight for n, m in self.lora_A.items()}, {n: m.weight for n, m in self.lora_B.items()})

    def _ab_matrix(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def delta_weight(self, name: str) -> torch.Tensor:
        """`scale * B @ A` in the base weight's own layout, fp32."""
        delta = (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def _weight_norm(self, weight_oi: torch.Tensor, name: str) -> torch.Tensor:
        lora = self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()
        return torch.linalg.norm(weight_oi + self.scaling[name] * lora, dim=1)

    def _merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        merged = weight + self.delta_weight(name)
        if not self.use_dora[name]:
            return merged
        # DoRA: W' = m * (W + dW) / ||W + dW||, row norms over the input dimension; the norms are kept so
        # that unmerging can invert it exactly.
        merged_oi = merged.T if self.fan_in_fan_out else merged
        norm = torch.linalg.norm(merged_oi, dim=1, keepdim=True)
        self._dora_norms[name] = norm
        out = merged_oi * (self.lora_magnitude_vector[name].float().unsqueeze(1) / norm)
        return out.T if self.fan_in_fan_out else out

    def merged_weight(self, adapter_names: Iterable[str]) -> torch.Tensor:
        """The base weight (dequantized if quantized) with the adapters merged, fp32 `[out, in]`, computed
        without touching the base: what a quantized base, which can't take a merge in place, becomes."""
        weight = self.base_weight().float()
        for name in adapter_names:
            if name in self.r:
                weight = self._merged_weight(name, weight.T if self.fan_in_fan_out else weight)
                weight = weight.T if self.fan_in_fan_out else weight
        return weight

    def _unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if not self.use_dora[name]:
            return weight - self.delta_weight(name)
        w_oi = weight.T if self.fan_in_fan_out else weight
        delta = self.delta_weight(name)
        delta_oi = delta.T if self.fan_in_fan_out else delta
        orig = (
            w_oi * (self._dora_norms.pop(name) / self.lora_magnitude_vector[name].float().unsqueeze(1))
            - delta_oi
        )
        return orig.T if self.fan_in_fan_out else orig

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        mix = MIXED.get()
        if self.disabled or self.merged_adapters or not self.active_adapters and mix is None:
            return self.base_layer(x, *args, **kwargs)
        if mix is not None:
            return self._forward_mixed(x, mix)
        if FUSED and self._fusable(x):
            return self._forward_fused(x, self.active_adapters[0])
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            xd = self.lora_dropout[name](x.to(lora_a.weight.dtype))
            if self.use_dora[name]:
                result = result + self._dora_delta(
                    xd,
                    result,
                    name,
                    dropped=not isinstance(self.lora_dropout[name], nn.Identity) and self.training,
                ).to(result.dtype)
            else:
                result = result + (lora_b(lora_a(xd)) * self.scaling[name]).to(result.dtype)
        return result

    def _fusable(self, x: torch.Tensor) -> bool:
        """The fused path covers the common training cases: one adapter (LoRA or DoRA) on a float or a quantized
        (NF4, or int8 with the torch backend) base, no dropout while training, no autocast."""
        if len(self.active_adapters) != 1 or torch.is_autocast_enabled(x.device.type):
            return False
        name = self.active_adapters[0]
        base = self.base_layer
        if getattr(base, "is_quantized_linear", False):
            base_ok = (base.quantize, base.backend) in _FUSED_QUANT and x.dtype == base.compute_dtype
        else:
            base_ok = (
                isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward or _is_conv1d(base)
            ) and x.dtype == base.weight.dtype
        return (
            base_ok
            and (isinstance(self.lora_dropout[name], nn.Identity) or not self.training)
            and x.dtype == self.lora_A[name].weight.dtype
        )

    def _forward_fused(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        quantized = getattr(base, "is_quantized_linear", False)
        bias = base.bias
        if quantized and bias is not None:
            bias = bias.to(base.compute_dtype)
        magnitude = self.lora_magnitude_vector[name] if self.use_dora[name] else None
        a, b, scale = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        if not quantized:
            weight = base.weight.T if self.fan_in_fan_out else base.weight
        # inference: no autograd bookkeeping at all; DoRA's `m / ||W + sBA||` is made once and kept (`_dora_factor`)
        factor = None if magnitude is None or torch.is_grad_enabled() else self._dora_factor(name)
        if not torch.is_grad_enabled():
            x2 = x.reshape(-1, x.shape[-1])
            w = base.dequantize() if quantized else weight
            out = F.linear(x2, w, None if factor is not None else bias)
            del w
            out.addmm_(x2 @ a.T, b.T, alpha=scale)
            if factor is not None:
                out.mul_(factor.to(out.dtype))
                if bias is not None:
                    out.add_(bias)
            return out.view(*x.shape[:-1], out.shape[-1])
        weight_sq = None
        if magnitude is not None and not quantized and x.device.type == "cpu":
            weight_sq = self._weight_sq_norms(weight)
        source = base if quantized else None
        return _FusedLoraLinear.apply(
            x, None if quantized else weight, bias, a, b, magnitude, scale, source, weight_sq
        )

    def _weight_sq_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """`||W_i||²` per output row of the frozen float weight (`[out, in]`), fp32, for the fused DoRA's norms;
        kept while the weight's storage and version stay the same (an in-place change, a merge, a reload or a
        move makes them again; a change through `weight.data`, which autograd's version counter doesn't see, is
        not seen here either: change a weight under `torch.no_grad()`)."""
        if weight.is_inference():  # no version counter (made under `torch.inference_mode()`): nothing kept
            return torch.linalg.vector_norm(weight.detach(), dim=1, dtype=torch.float32).square_()
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        cached = self.__dict__.get("_weight_sq")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square_())
            self.__dict__["_weight_sq"] = cached
        return cached[1]

    def _dora_factor(self, name: str) -> torch.Tensor:
        """DoRA's `m / ||W + sBA||` per output row, fp32, for inference (no autograd): made once and kept while the
        base layer's tensors, the adapter's A, B and magnitude and its scaling stay the same (storage and version:
        training steps, `load_state_dict`, a merge, a reload or a move make it again; a change through `.data`,
        which autograd's version counter doesn't see, is not seen either: change weights under `torch.no_grad()`,
        or call `reset_cache()`). Without it an unmerged DoRA layer recomputed the norms of its `[out, in]` weight
        at every call (OPT/Llama-125m shapes, one thread, one token: ~1.5× the base's forward against LoRA's ~1.1×).
        Made at every call where it can't be kept (tensors made under `torch.inference_mode()` have no version
        counter)."""
        tensors = [
            *self.base_layer.parameters(),
            *self.base_layer.buffers(),
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.lora_magnitude_vector[name],
        ]
        if any(t.is_inference() for t in tensors):
            with torch.no_grad():
                return self.lora_magnitude_vector[name].float() / self._weight_norm(
                    self.base_weight().float(), name
                )
        key = (self.scaling[name], *((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))
        cache = self.__dict__.setdefault("_dora_factors", {})
        hit = cache.get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                norm = self._weight_norm(self.base_weight().float(), name)
                hit = (key, self.lora_magnitude_vector[name].float() / norm)
            cache[name] = hit
        return hit[1]

    def reset_cache(self) -> None:
        """Forget what is kept between calls: the stacked adapters of mixed batches and DoRA's inference factors
        (call it after changing weights through `.data`)."""
        super().reset_cache()
        self.__dict__.pop("_dora_factors", None)
        self.__dict__.pop("_weight_sq", None)

    def _dora_delta(
        self, x: torch.Tensor, base_result: torch.Tensor, name: str, dropped: bool
    ) -> torch.Tensor:
        """PEFT's DoRA forward: `(m/||W+sBA|| - 1) * W x + m/||W+sBA|| * s * B A x` (norm detached)."""
        if not torch.is_grad_enabled():
            scale = self._dora_factor(name).to(x.dtype).view(*([1] * (x.dim() - 1)), -1)
        else:
            with torch.no_grad():
                norm = self._weight_norm(self.base_weight().float(), name).to(x.dtype)
            scale = (self.lora_magnitude_vector[name] / norm).view(*([1] * (x.dim() - 1)), -1)
        lora = self.lora_B[name](self.lora_A[name](x))
        if dropped:
            base = F.linear(x, self.base_weight().to(x.dtype))
        else:
            bias = getattr(self.base_layer, "bias", None)
            base = base_result.to(x.dtype) - (bias.to(x.dtype) if bias is not None else 0)
        return (scale - 1) * base + scale * lora * self.scaling[name]

    def _forward_mixed(self, x: torch.Tensor, mix: MixedBatch) -> torch.Tensor:
        result = self.base_layer(x)
        slots = self._check_mixable(mix)
        if not slots:
            return result
        a_stack, b_stack = self._stacked(slots)
        x3 = rows_view(x, len(mix)).to(a_stack.dtype)
        if (
            x3.shape[1] == 1
            and not torch.is_grad_enabled()
            and result.dtype == x3.dtype
            and result.is_contiguous()
        ):
            # A decoding step (one token per row): every row through every stacked adapter's A in one product,
            # each row's own block kept, then one product with every B: two reads of the (small) stacks instead of
            # copying one A and one B per row (OPT-125m shape, 8 adapters on q/v, one thread: a 16-row step
            # 1.074× -> 1.049× the base's, 42 rows 1.039× -> 1.027×). The other blocks are zeroed, not multiplied
            # by 0, so an overflow in a row's product with another adapter can't reach it; and only finite stacks
            # take this path, since 0 × NaN in the B product would reach every row (a broken adapter's rows fail
            # alone on the gather path).
            flat = self._flat_stack(a_stack, b_stack)
            if flat is not None:
                a_flat, b_flat = flat
                h = x3.view(len(mix), -1) @ a_flat.T  # [rows, (n+1)·r_max]
                h.masked_fill_(mix.other_blocks(slots, a_stack.shape[1], x.device), 0)
                result.view(len(mix), -1).addmm_(h, b_flat)
                return result
        rows = mix.rows(slots, x.device)
        # index_select, not a_stack[rows]: the same gather, several times faster for a decoding step's small batch
        h = torch.bmm(x3, a_stack.index_select(0, rows).transpose(1, 2))
        b_rows = b_stack.index_select(0, rows).transpose(1, 2)
        if not torch.is_grad_enabled() and result.dtype == h.dtype and result.is_contiguous():
            result.view(len(mix), -1, result.shape[-1]).baddbmm_(h, b_rows)
            return result
        delta = torch.bmm(h, b_rows)
        return result + delta.reshape(result.shape).to(result.dtype)

    def extra_repr(self) -> str:
        return f"adapters={self.adapters}, r={self.r}, fan_in_fan_out={self.fan_in_fan_out}"


class LoraEmbedding(_LoraLayer):
    """LoRA beside `nn.Embedding`: `lora_embedding_A [r, vocab]`, `lora_embedding_B [dim, r]` (PEFT's names)."""

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def add(self, name: str, r: int, alpha: float, config: LoraConfig) -> None:
        if config.use_dora:
            raise ValueError(
                "use_dora is supported on linear layers only, not on nn.Embedding; exclude the embedding"
            )
        if config.init_lora_weights == "pissa":
            raise ValueError(
                "init_lora_weights='pissa' is supported on linear layers only, not on nn.Embedding"
            )
        self._register(name, r, alpha, config.use_rslora, False)
        weight = self.base_layer.weight
        a = torch.empty(r, weight.shape[0], device=weight.device, dtype=torch.float32)
        b = torch.empty(weight.shape[1], r, device=weight.device, dtype=torch.float32)
        if config.init_lora_weights is False:
            nn.init.normal_(a)
            nn.init.normal_(b)
        else:
            nn.init.zeros_(a)
            nn.init.normal_(b)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)
        self.set_active(self.active_adapters or [name])

    def _ab_params(self) -> tuple[dict, dict]:
        return dict(self.lora_embedding_A.items()), dict(self.lora_embedding_B.items())

    def _ab_matrix(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        # As a linear map from one-hot rows: A is [r, vocab], B is [dim, r].
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        b, a = self.lora_embedding_B[name].float(), self.lora_embedding_A[name].float()
        return (b @ a).T * self.scaling[name]

    def _embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(
            ids, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        mix = MIXED.get()
        if self.disabled or self.merged_adapters or not self.active_adapters and mix is None:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if mix is not None:
            slots = self._check_mixable(mix)
            if not slots:
                return result
            a_stack, b_stack = self._stacked(slots)  # [n+1, r, vocab], [n+1, dim, r]
            rows = mix.rows(slots, x.device)
            ids = x.reshape(len(mix), -1)
            after_a = a_stack[rows[:, None], :, ids]  # [B, S, r]
            delta = torch.bmm(after_a, b_stack[rows].transpose(1, 2))
            return result + delta.reshape(result.shape).to(result.dtype)
        for name in self.active_adapters:
            after_a = self._embed(x, self.lora_embedding_A[name].T)
            result = result + (after_a @ self.lora_embedding_B[name].T * self.scaling[name]).to(result.dtype)
        return result

    def extra_repr(self) -> str:
        return f"adapters={self.adapters}, r={self.r}"


def wrapper_for(module: nn.Module) -> type[_LoraLayer] | None:
    """The LoRA wrapper class for a layer type, or None if LoRA can't adapt it."""
    if isinstance(module, _LoraLayer):
        return type(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if inject.is_linear_like(module):
        return LoraLinear
    return None


def is_adaptable(module: nn.Module) -> bool:
    return wrapper_for(module) is not None


def inject_adapter(
    model: nn.Module, config: LoraConfig, adapter_name: str, skip: Iterable[str] = ()
) -> list[str]:
    """Wrap every target of `config` with LoRA (or add `adapter_name` to an existing wrapper).

    Returns:
        The names of the adapted modules.
    """
    targets = inject.find_targets(
        model,
        config.target_modules,
        adaptable=is_adaptable,
        exclude_modules=config.exclude_modules,
        skip=list(skip),
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
    )
    # Targets inside an existing wrapper (`x.base_layer`) mean the wrapper itself.
    targets = [t[: -len(".base_layer")] if t.endswith(".base_layer") else t for t in targets]
    if any(_is_conv1d(inject.get_module(model, t)) for t in targets):
        config.fan_in_fan_out = True  # GPT-2's Conv1D stores [in, out]; recorded as PEFT records it
    for name in dict.fromkeys(targets):
        module = inject.get_module(model, name)
        key = inject.pattern_key(config.rank_pattern, name)
        r = config.rank_pattern[key] if key is not None else config.r
        key = inject.pattern_key(config.alpha_pattern, name)
        alpha = config.alpha_pattern[key] if key is not None else config.lora_alpha
        if not isinstance(module, _LoraLayer):
            module = wrapper_for(module)(module)  # type: ignore[misc]
            inject.replace_module(model, name, module)
        if adapter_name in module.r:
            raise ValueError(f"module {name!r} already has an adapter named {adapter_name!r}")
        module.add(adapter_name, r, alpha, config)
    return list(dict.fromkeys(targets))


def layers(model: nn.Module) -> list[tuple[str, _LoraLayer]]:
    """The LoRA layers of `model` and their names, in model order (from `inject.delta_layers`' cached walk)."""
    return [(n, m) for n, m in inject.delta_layers(model) if isinstance(m, _LoraLayer)]


# PEFT's saved names drop the adapter name: `q_proj.lora_A.default.weight` <-> `q_proj.lora_A.weight`.
_HOLDERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def is_adapter_param(name: str, adapter_name: str) -> bool:
    """Whether a parameter name (relative to the model) belongs to LoRA adapter `adapter_name`: the name right
    after a LoRA holder (`...lora_A.<adapter>.weight`, `...lora_magnitude_vector.<adapter>`), not anywhere in the
    path, so that an adapter named `weight`, `q_proj` or `0` is not taken for every adapter's parameters."""
    padded = f".{name}."
    return any(f".{holder}.{adapter_name}." in padded for holder in _HOLDERS)


def saved_key(name: str, adapter_name: str) -> str:
    for holder in _HOLDERS:
        name = name.replace(f".{holder}.{adapter_name}", f".{holder}")
    return name


def internal_key(key: str, adapter_name: str) -> str:
    if key.endswith(".lora_magnitude_vector.weight"):  # older PEFT releases
        key = key[: -len(".weight")]
    for holder in _HOLDERS:
        key = key.replace(f".{holder}.", f".{holder}.{adapter_name}.")
        if key.endswith(f".{holder}"):
            key = f"{key}.{adapter_name}"
    return key


def adapter_param_names(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """LoRA's parameters of `adapter_name`, plus the biases that `config.bias` trains."""
    names = inject.params_in(layers(model), lambda n: is_adapter_param(n, adapter_name))
    if config.bias == "all":
        names += [
            n
            for n, _ in model.named_parameters()
            if n.endswith(".bias")
            and PREFIX not in n
            and ".original_module." not in n
            and ".modules_to_save." not in n
        ]
    elif config.bias == "lora_only":
        for layer_name, layer in layers(model):
            if adapter_name in layer.r and getattr(layer.base_layer, "bias", None) is not None:
                names.append(f"{layer_name}.base_layer.bias")
    return list(dict.fromkeys(names))


def check_file_shapes(config: LoraConfig, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Before any layer is built: the ranks `config` would create must be the ranks of the saved tensors
    (`shapes`, read from the file's header), so that a config claiming `r=300000` is refused without
    allocating it.

    Raises:
        CheckpointError: naming the module, the rank in the config and the rank in the file.
    """
    from deltatune.errors import CheckpointError

    found: dict[str, int] = {}
    for key, shape in shapes.items():
        for suffix, axis in ((".lora_A.weight", 0), (".lora_embedding_A", 0), (".lora_B.weight", 1)):
            if key.endswith(suffix) and len(shape) == 2:
                module = key.removeprefix("base_model.model.")[: -len(suffix)]
                found.setdefault(module, shape[axis])
    problems = []
    for module, rank in sorted(found.items()):
        key = inject.pattern_key(config.rank_pattern, module)
        expected = config.rank_pattern[key] if key is not None else config.r
        if expected != rank:
            field_name = f"rank_pattern[{key!r}]" if key is not None else "r"
            problems.append(
                f"{module}: the config's {field_name} is {expected}, the saved tensors have rank {rank}"
            )
    largest = max([config.r, *config.rank_pattern.values()])
    if found and largest > max(found.values()) and largest > 1024:
        problems.append(
            f"the config asks for rank {largest}, larger than any saved tensor's ({max(found.values())})"
        )
    if problems:
        raise CheckpointError(
            f"the adapter config and the weights in {where} don't belong together "
            f"({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems[:20])
            + ("\n  ..." if len(problems) > 20 else "")
        )


def prepare_config(config: LoraConfig, model: nn.Module) -> None:
    """`target_modules=None`: PEFT's default for the architecture (`q_proj`/`v_proj` for OPT/Llama, ...).

    Raises:
        ValueError: the architecture has no default; lists the model's adaptable modules.
    """
    inject.fill_default(config, "target_modules", DEFAULT_TARGETS, model, is_adaptable)


def after_load(model: nn.Module, adapter_name: str) -> None:
    for _, layer in layers(model):
        layer.reset_cache()


def summarize(tensors: dict[str, torch.Tensor]) -> dict:
    """The adapted modules and ranks of a saved LoRA adapter (from its keys and `lora_A` shapes; values are
    tensors or shapes)."""
    modules = sorted({k.split(".lora_")[0] for k in tensors if ".lora_" in k})
    ranks = sorted(
        {
            shape_of(t)[0]
            for k, t in tensors.items()
            if (k.endswith("lora_A.weight") or k.endswith("lora_embedding_A")) and shape_of(t)
        }
    )
    return {"adapted_modules": modules, "ranks": ranks}


def weighted_config(configs: list[LoraConfig], combination_type: str, svd_rank: int | None) -> LoraConfig:
    """The config of `add_weighted_adapter`'s new adapter from the combined adapters' configs (PEFT's rules):
    `linear` keeps the (common) rank, `cat` sums the ranks, `svd` takes `svd_rank` (default: the largest).

    Raises:
        ValueError: DoRA adapters, ranks that `linear` can't mix, an unknown combination, or target_modules that
            mix regex strings and lists.
    """
    if any(c.use_dora for c in configs):
        raise ValueError("add_weighted_adapter combines plain LoRA adapters (not DoRA or other methods)")
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(
                f"combination_type='linear' needs adapters of one rank, got ranks {ranks}; use 'cat' or 'svd'"
            )
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type == "svd":
        new_rank = svd_rank or max(ranks)
    else:
        raise ValueError(f"unknown combination_type {combination_type!r}; use 'linear', 'cat' or 'svd'")
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, str) for t in targets):
        new_targets: str | list[str] = "|".join(f"({t})" for t in targets)
    elif all(isinstance(t, list) for t in targets):
        new_targets = sorted(set().union(*targets))
    else:
        raise ValueError("can't combine adapters whose target_modules mix regex strings and lists")
    return dataclasses.replace(
        configs[0],
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=new_targets,
        rank_pattern={},
        alpha_pattern={},
        use_rslora=False,
        layers_to_transform=None,
        init_lora_weights=True,
    )
