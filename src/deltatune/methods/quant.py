"""QLoRA's frozen base: linear layers stored in 4-bit NF4 or in int8, dequantized on the fly.

`quantize_model(model, "nf4")` swaps the model's linear layers (but the output or classification head) for
`QuantizedLinear`s in place; LoRA then wraps them like any linear layer and trains in fp32 on top.

- `nf4`: 4-bit NormalFloat in blocks of 64 weights, each block's absmax itself quantized to 8 bits in blocks
  of 256 ("double quantization", Dettmers et al., 2023). Backend: bitsandbytes, on CPU and on CUDA.
- `int8`: one absmax scale per output channel, `w ~ q * absmax / 127`. Backend `torch` (plain torch ops, any
  device; the default) or `bitsandbytes` (its LLM.int8 matmul on CUDA, the same storage).

The quantized tensors are buffers, never parameters: nothing can train them, and an optimizer never sees
them. The forward recomputes the dequantized weight in the backward pass instead of saving it, so a layer
holds a full-precision copy of its weight only while it computes (that is QLoRA's memory saving).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from deltatune import inject
from deltatune.errors import BackendError, MissingBackendError

QUANTIZE_TYPES = ("nf4", "int8")
BACKENDS: dict[str, tuple[str, ...]] = {"nf4": ("bitsandbytes",), "int8": ("torch", "bitsandbytes")}
DEFAULT_BACKEND = {"nf4": "bitsandbytes", "int8": "torch"}
NF4_BLOCK = 64
LLM_INT8_THRESHOLD = 6.0  # bitsandbytes' and transformers' default outlier threshold for LLM.int8

# bitsandbytes runs on CPU from 0.46 on (0.45 and older: CUDA only)
INSTALL_HINT = "pip install 'bitsandbytes>=0.46' (or pip install 'deltatune[quant]')"


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantized (`nf4` or `int8`).

    `dequantize()` gives the weight `[out, in]` in `compute_dtype`; `forward(x)` equals
    `F.linear(x, dequantize(), bias)`, passes gradients to `x` and to a bias that requires them, never to the
    quantized storage. `.to(dtype)` changes the compute dtype and leaves the quantized storage as it is.
    """

    is_quantized_linear = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        quantize: str,
        backend: str,
        bias: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quantize, self.backend, self.compute_dtype = quantize, backend, compute_dtype
        empty = functools.partial(torch.zeros, device=device)
        if quantize == "nf4":
            n_blocks = -(-in_features * out_features // NF4_BLOCK)
            self.register_buffer(
                "weight_4bit", empty(((in_features * out_features + 1) // 2, 1), dtype=torch.uint8)
            )
            self.register_buffer("absmax_8bit", empty(n_blocks, dtype=torch.uint8))
            self.register_buffer("absmax_scale", empty(-(-n_blocks // 256)))
            self.register_buffer("absmax_code", empty(256))
            self.register_buffer("absmax_offset", empty(()))
            # the 16 NF4 values, a constant (not saved); bitsandbytes' batch-1 CUDA kernel reads it
            code = _bnb().functional.get_4bit_type("nf4", device="cpu").float()
            self.register_buffer("nf4_code", code.to(device), persistent=False)
        else:
            self.register_buffer("weight_int8", empty((out_features, in_features), dtype=torch.int8))
            self.register_buffer("weight_absmax", empty(out_features))
        self.bias = nn.Parameter(empty(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        quantize: str,
        backend: str,
        compute_dtype: torch.dtype = torch.float32,
    ) -> QuantizedLinear:
        """Quantize `weight` (`[out, in]`) on its own device; `bias` is kept as it is (frozen)."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, quantize, backend, bias is not None, compute_dtype, "meta")
        weight = weight.detach().contiguous()
        if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            weight = weight.float()
        with torch.no_grad():
            storage = _QUANTIZE[quantize](weight)
        for name, tensor in storage.items():
            layer._buffers[name] = tensor
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def dequantize(self) -> torch.Tensor:
        """The weight `[out, in]` in `compute_dtype`, with the quantization's rounding."""
        with torch.no_grad():
            return _DEQUANTIZE[self.quantize](self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        out = _LINEAR[(self.quantize, self.backend)](self, x.to(self.compute_dtype), bias)
        return out.to(x.dtype)

    def _apply(self, fn: Callable, recurse: bool = True):
        # `.to(dtype)`, `.half()` and the like would also cast the float parts of the quantized storage (the
        # scales); keep those in fp32 and let the conversion choose the compute dtype instead.
        probe = fn(torch.zeros(()))
        before = {n: b for n, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quantize={self.quantize}, backend={self.backend}, compute_dtype={self.compute_dtype}"
        )


def quantize_model(
    model: nn.Module,
    quantize: str,
    backend: str | None = None,
    skip: list[str] | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Replace the model's linear layers (`nn.Linear`, transformers' `Conv1D`) by frozen quantized ones, in place.

    The output head (or the classification head) and the modules named in `skip` stay as they are. Call it
    before `get_peft_model`.

    Args:
        model: the base model.
        quantize: `"nf4"` (4-bit NormalFloat, double-quantized scales, block 64) or `"int8"` (per channel).
        backend: `"bitsandbytes"` or, for int8, `"torch"`; `None` picks `DEFAULT_BACKEND[quantize]`.
        skip: module names or name suffixes to keep in full precision.
        compute_dtype: the dtype the quantized layers dequantize to and compute in.

    Returns:
        The same model object.

    Raises:
        ValueError: an unknown `quantize` or `backend`, an already wrapped model, or no linear layer found.
        ImportError: the backend's package isn't installed (the message says what to install).
        RuntimeError: the backend can't run on the model's device (the message says what to use instead).
    """
    if quantize not in QUANTIZE_TYPES:
        raise ValueError(
            f"unknown quantize {quantize!r}; use 'nf4' (4-bit NormalFloat, QLoRA) or 'int8' (8-bit per channel)"
        )
    backend = backend or DEFAULT_BACKEND[quantize]
    if backend not in BACKENDS[quantize]:
        raise ValueError(
            f"unknown backend {backend!r} for quantize={quantize!r}; use one of {', '.join(BACKENDS[quantize])} "
            "(or None for the default)"
        )
    if any(getattr(m, "is_delta_layer", False) for m in model.modules()):
        raise ValueError("this model already holds adapters; quantize the base model before get_peft_model")
    heads = inject.output_head_names(model)
    targets = [
        name
        for name, module in model.named_modules()
        if name
        and (isinstance(module, nn.Linear) or _is_conv1d(module))
        and not any(name == h or name.startswith(f"{h}.") for h in heads)
        and not inject.matches(name, skip)
    ]
    if not targets:
        done = quantized_layers(model)
        if done:
            kinds = sorted({m.quantize for _, m in done})
            raise ValueError(
                f"this model is quantized already ({len(done)} {'/'.join(kinds)} layers); quantize_model is "
                "called once, on the full-precision base"
            )
        raise ValueError(
            f"no linear layer to quantize in this model (output heads {sorted(heads)}, skip={skip})"
        )
    for device in {_weight(inject.get_module(model, n)).device for n in targets}:
        check_backend(quantize, backend, device)
    # One layer at a time, holding no reference to the replaced ones: each fp32 weight is freed as soon as
    # its quantized copy is in place, so the model never holds both in full.
    for name in targets:
        module = inject.get_module(model, name)
        layer = QuantizedLinear.from_weight(_weight(module), module.bias, quantize, backend, compute_dtype)
        inject.replace_module(model, name, layer)
        del module
    return model


def check_backend(quantize: str, backend: str, device: torch.device | str) -> None:
    """Raise a clear error if `backend` can't quantize to `quantize` on `device` here: the package is missing, or
    a tiny layer fails to quantize and run."""
    device = torch.device(device)
    if (quantize, backend) == ("int8", "bitsandbytes") and device.type != "cuda":
        raise BackendError(
            f"quantize='int8' with backend 'bitsandbytes' (LLM.int8) runs on CUDA only, not on {device}; "
            "use backend='torch' (the default for int8), which runs anywhere"
        )
    other = (
        "quantize='int8' (its default backend 'torch' needs nothing more)"
        if quantize == "nf4"
        else "backend='torch'"
    )
    if backend == "bitsandbytes":
        try:
            _bnb()
        except ImportError as e:
            raise MissingBackendError(
                f"quantize={quantize!r} with backend 'bitsandbytes' needs the bitsandbytes package: {INSTALL_HINT}; "
                f"or use {other}"
            ) from e
    error = _smoke_test(quantize, backend, device.type, device.index)
    if error is None:
        return
    if backend != "bitsandbytes":
        raise BackendError(f"backend {backend!r} can't run quantize={quantize!r} on {device}: {error}")
    raise BackendError(
        f"bitsandbytes {_bnb().__version__} can't run quantize={quantize!r} on {device} ({error}). Install a "
        f"build that supports this device: {INSTALL_HINT}; or run on a CUDA device; or use {other}"
    )


@functools.cache
def _smoke_test(quantize: str, backend: str, device_type: str, index: int | None) -> str | None:
    try:
        weight = torch.randn(
            8, 64, device=torch.device(device_type, index) if index is not None else device_type
        )
        layer = QuantizedLinear.from_weight(weight, None, quantize, backend)
        x = torch.randn(2, 64, device=weight.device, requires_grad=True)
        layer(x).sum().backward()
        err = (layer.dequantize() - weight).abs().max().item()
        if not err < 0.5 * weight.abs().max().item():
            return f"its dequantized weight is off by {err:.3g}"
    except Exception as e:  # any failure means the backend can't run here; the caller says what to do
        return f"{type(e).__name__}: {e}"
    return None


def _weight(module: nn.Module) -> torch.Tensor:
    """The weight as `[out, in]` (transformers' Conv1D stores `[in, out]`)."""
    return module.weight.T if _is_conv1d(module) else module.weight


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


@functools.cache
def _bnb():
    # bitsandbytes logs a warning at import when an optional CPU kernel from the Hugging Face hub
    # (the `kernels` package) is missing; its own kernels work without it.
    with _quiet("bitsandbytes"):
        import bitsandbytes

    return bitsandbytes


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---- NF4 (bitsandbytes) ------------------------------------------------------------------------------------


def _quantize_nf4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    bnb = _bnb()
    packed, state = bnb.functional.quantize_4bit(
        weight, blocksize=NF4_BLOCK, compress_statistics=True, quant_type="nf4"
    )
    return {
        "weight_4bit": packed,
        "absmax_8bit": state.absmax,
        "absmax_scale": state.state2.absmax.float(),
        "absmax_code": state.state2.code.float(),
        "absmax_offset": state.offset.float().reshape(()),
        "nf4_code": state.code.float(),
    }


def _nf4_state(layer: QuantizedLinear):
    bf = _bnb().functional
    nested = bf.QuantState(
        absmax=layer.absmax_scale, code=layer.absmax_code, blocksize=256, dtype=torch.float32
    )
    return bf.QuantState(
        absmax=layer.absmax_8bit,
        shape=torch.Size((layer.out_features, layer.in_features)),
        code=layer.nf4_code,
        blocksize=NF4_BLOCK,
        quant_type="nf4",
        dtype=layer.compute_dtype,
        offset=layer.absmax_offset,
        state2=nested,
    )


def _dequantize_nf4(layer: QuantizedLinear) -> torch.Tensor:
    return _bnb().functional.dequantize_4bit(layer.weight_4bit, _nf4_state(layer))


def _linear_nf4_bnb(layer: QuantizedLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # bitsandbytes' autograd function dequantizes again in backward rather than keeping the weight
    return _bnb().matmul_4bit(x, layer.weight_4bit.t(), quant_state=_nf4_state(layer), bias=bias)


# ---- int8, per output channel ------------------------------------------------------------------------------


def _quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    w = weight.float()
    absmax = torch.linalg.vector_norm(w, float("inf"), dim=1)
    inverse = torch.where(absmax > 0, 127 / absmax, torch.zeros_like(absmax))  # an all-zero row stays zero
    q = (w * inverse.unsqueeze(1)).round_().clamp_(-127, 127)
    return {"weight_int8": q.to(torch.int8), "weight_absmax": absmax}


def _dequantize_int8(layer: QuantizedLinear) -> torch.Tensor:
    scale = (layer.weight_absmax / 127).unsqueeze(1)
    return (layer.weight_int8.float() * scale).to(layer.compute_dtype)


class _Int8Matmul(torch.autograd.Function):
    """`x @ (q * s).T` as `(x @ q.T) * s`: the int8 values are exact in any float dtype and the scale is applied
    to the (smaller) output; backward recomputes from the int8 weight instead of saving a float copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, scale)
        return F.linear(x, q.to(x.dtype)) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, scale = ctx.saved_tensors
        return (grad * scale) @ q.to(grad.dtype), None, None


def _linear_int8_torch(layer: QuantizedLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = _Int8Matmul.apply(x, layer.weight_int8, (layer.weight_absmax / 127).to(x.dtype))
    return out + bias if bias is not None else out


def _linear_int8_bnb(layer: QuantizedLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    bnb = _bnb()
    state = bnb.MatmulLtState()
    state.CB, state.SCB = layer.weight_int8, layer.weight_absmax
    state.has_fp16_weights, state.threshold, state.is_training = False, LLM_INT8_THRESHOLD, layer.training
    # LLM.int8 quantizes the activations from fp16 (bitsandbytes casts them, warning on every call, otherwise)
    half = bias.half() if bias is not None else None
    return bnb.matmul(x.half(), layer.weight_int8, state=state, bias=half).to(x.dtype)


_QUANTIZE: dict[str, Callable[[torch.Tensor], dict[str, torch.Tensor]]] = {
    "nf4": _quantize_nf4,
    "int8": _quantize_int8,
}
_DEQUANTIZE: dict[str, Callable[[QuantizedLinear], torch.Tensor]] = {
    "nf4": _dequantize_nf4,
    "int8": _dequantize_int8,
}
_LINEAR: dict[tuple[str, str], Callable] = {
    ("nf4", "bitsandbytes"): _linear_nf4_bnb,
    ("int8", "torch"): _linear_int8_torch,
    ("int8", "bitsandbytes"): _linear_int8_bnb,
}


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLinear]]:
    """The model's quantized linear layers, by name."""
    return [(n, m) for n, m in model.named_modules() if getattr(m, "is_quantized_linear", False)]
