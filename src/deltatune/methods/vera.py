"""VeRA (Kopiczko et al., 2024): Vector-based Random Matrix Adaptation.

One pair of frozen random matrices `A [r, in_max]`, `B [out_max, r]` is shared by every adapted layer (each
layer uses the top-left `[r, in]`/`[out, r]` slices), and each layer trains only two vectors:
`y = W x + lambda_b * (B (lambda_d * (A x)))`, i.e. `dW = diag(lambda_b) B diag(lambda_d) A`. `lambda_b`
starts at 0 (the model starts unchanged), `lambda_d` at `d_initial`. Mergeable: `W' = W + dW`.

PEFT's format: `<layer>.vera_lambda_b`/`vera_lambda_d` per layer and, with `save_projection`, the shared
`base_model.vera_A`/`base_model.vera_B` once; without it they are drawn again from `projection_prng_key`
exactly as PEFT draws them (Kaiming-uniform with a seeded CPU generator, A then B).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from deltatune import inject
from deltatune.config import VeraConfig
from deltatune.errors import CheckpointError
from deltatune.methods._bookkeeping import AdapterBookkeeping
from deltatune.methods.lora import DEFAULT_TARGETS as LORA_TARGETS
from deltatune.vocab import is_conv1d, linear_features, shape_of

HOLDERS = ("vera_lambda_b", "vera_lambda_d")
SHARED_KEYS = ("base_model.vera_A", "base_model.vera_B")

# PEFT's VeRA defaults are LoRA's, except phi.
DEFAULT_TARGETS = {**LORA_TARGETS, "phi": ["q_proj", "v_proj"]}


def _kaiming(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's `_kaiming_init`: uniform in +-sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class Projections(nn.Module):
    """The frozen shared matrices of one adapter (one module object referenced by every adapted layer)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.register_buffer("vera_A", a, persistent=False)
        self.register_buffer("vera_B", b, persistent=False)


class VeraLinear(AdapterBookkeeping, nn.Module):
    """A frozen linear layer (`nn.Linear` or `Conv1D`) with VeRA adapters by name."""

    is_delta_layer = True
    supports_merge = True
    supports_mixed_batch = False
    merges_into_weight = True
    _adapter_holders = ("vera_lambda_b", "vera_lambda_d", "vera_dropout", "vera_projections")

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if getattr(base_layer, "is_quantized_linear", False):
            raise ValueError("VeRA on a quantized base is not supported; use LoRA (qlora-nf4/qlora-int8)")
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.vera_projections = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    def add(self, name: str, config: VeraConfig, projections: Projections) -> None:
        if name in self.vera_lambda_b:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        device = self.base_layer.weight.device
        if config.init_weights:
            lambda_b = torch.zeros(self.out_features, device=device)
            lambda_d = torch.full((config.r,), float(config.d_initial), device=device)
        else:
            lambda_b = torch.ones(self.out_features, device=device)
            lambda_d = torch.randn(config.r, device=device)
        self.vera_lambda_b[name] = nn.Parameter(lambda_b)
        self.vera_lambda_d[name] = nn.Parameter(lambda_d)
        self.vera_dropout[name] = (
            nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()
        )
        self.vera_projections[name] = projections
        self.set_active(self.active_adapters or [name])

    def _ab(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        proj = self.vera_projections[name]
        return proj.vera_A[:, : self.in_features], proj.vera_B[: self.out_features, :]

    def delta_weight(self, name: str) -> torch.Tensor:
        """`diag(lambda_b) B diag(lambda_d) A` as the base weight is stored (`[in, out]` for `Conv1D`), fp32."""
        a, b = self._ab(name)
        lambda_b = self.vera_lambda_b[name].float().unsqueeze(-1)
        lambda_d = self.vera_lambda_d[name].float().unsqueeze(-1)
        delta = (lambda_b * b.float()) @ (lambda_d * a.float())
        return delta.T if self.fan_in_fan_out else delta

    def merge(self, adapter_names: Iterable[str] | None = None) -> None:
        weight = self.base_layer.weight
        for name in list(adapter_names) if adapter_names is not None else list(self.active_adapters):
            if name not in self.vera_lambda_b or name in self.merged_adapters:
                continue
            with torch.no_grad():
                weight.copy_((weight.float() + self.delta_weight(name)).to(weight.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        weight = self.base_layer.weight if self.merged_adapters else None
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                weight.copy_((weight.float() - self.delta_weight(name)).to(weight.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged_adapters:
            return result
        from deltatune.methods.mixed import MIXED

        if MIXED.get() is not None:
            raise ValueError(
                "VeRA adapters don't support mixed-adapter batches yet; run one adapter at a time"
            )
        dtype = result.dtype
        for name in self.active_adapters:
            a, b = self._ab(name)
            lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
            h = self.vera_dropout[name](x).to(lambda_d.dtype)
            result = result + lambda_b * F.linear(lambda_d * F.linear(h, a.to(h.dtype)), b.to(h.dtype))
        return result.to(dtype)

    def extra_repr(self) -> str:
        return f"adapters={self.adapters}, in={self.in_features}, out={self.out_features}"


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, (VeraLinear, nn.Linear)) or is_conv1d(module)


def layers(model: nn.Module) -> list[tuple[str, VeraLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, VeraLinear)]


def prepare_config(config: VeraConfig, model: nn.Module) -> None:
    """`target_modules=None`: PEFT's per-architecture default."""
    inject.fill_default(config, "target_modules", DEFAULT_TARGETS, model, is_adaptable, "VeRA")


def draw_projections(config: VeraConfig, out_max: int, in_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared `A [r, in_max]`, `B [out_max, r]` from `projection_prng_key`, as PEFT draws them."""
    generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    a = _kaiming((config.r, in_max), generator)
    b = _kaiming((out_max, config.r), generator)
    return a, b


def inject_adapter(
    model: nn.Module, config: VeraConfig, adapter_name: str, skip: Iterable[str] = ()
) -> list[str]:
    """Wrap every target with VeRA; the shared matrices cover the largest input and output sizes among them."""
    existing = [m for _, m in layers(model) if m.vera_projections]
    for m in existing:
        key = next(iter(m.vera_projections.values())).projection_prng_key
        if key != config.projection_prng_key:
            raise ValueError(
                f"VeRA adapters of one model share their random matrices' seed: projection_prng_key={key} already, "
                f"got {config.projection_prng_key}"
            )
    targets = inject.find_targets(
        model,
        config.target_modules,
        adaptable=is_adaptable,
        skip=list(skip),
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
    )
    targets = list(
        dict.fromkeys(t[: -len(".base_layer")] if t.endswith(".base_layer") else t for t in targets)
    )
    bases = {t: _base(inject.get_module(model, t)) for t in targets}
    config.fan_in_fan_out = any(is_conv1d(b) for b in bases.values())
    in_max = max(linear_features(b)[0] for b in bases.values())
    out_max = max(linear_features(b)[1] for b in bases.values())
    a, b = draw_projections(config, out_max, in_max)
    device = next(iter(bases.values())).weight.device
    projections = Projections(a.to(device), b.to(device))
    projections.projection_prng_key = config.projection_prng_key
    for name in targets:
        module = inject.get_module(model, name)
        if not isinstance(module, VeraLinear):
            module = VeraLinear(module)
            inject.replace_module(model, name, module)
        module.add(adapter_name, config, projections)
    return targets


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, VeraLinear) else module


def adapter_param_names(model: nn.Module, config: VeraConfig, adapter_name: str) -> list[str]:
    """The two vectors per layer, plus the biases `config.bias` trains."""
    marks = tuple(f".{h}.{adapter_name}" for h in HOLDERS)
    names = [n for n, _ in model.named_parameters() if n.endswith(marks)]
    if config.bias == "all":
        names += [
            n
            for n, _ in model.named_parameters()
            if n.endswith(".bias") and ".original_module." not in n and ".modules_to_save." not in n
        ]
    elif config.bias == "vera_only":
        for layer_name, layer in layers(model):
            if adapter_name in layer.adapters and getattr(layer.base_layer, "bias", None) is not None:
                names.append(f"{layer_name}.base_layer.bias")
    return list(dict.fromkeys(names))


def saved_key(name: str, adapter_name: str) -> str:
    for holder in HOLDERS:
        name = name.replace(f".{holder}.{adapter_name}", f".{holder}")
    return name


def internal_key(key: str, adapter_name: str) -> str:
    for holder in HOLDERS:
        if key.endswith(f".{holder}"):
            return f"{key}.{adapter_name}"
    return key


def _projections(model: nn.Module, adapter_name: str) -> Projections:
    for _, layer in layers(model):
        if adapter_name in layer.vera_projections:
            return layer.vera_projections[adapter_name]
    raise ValueError(f"no VeRA adapter named {adapter_name!r} in the model")


def shared_tensors(model: nn.Module, config: VeraConfig, adapter_name: str) -> dict[str, torch.Tensor]:
    """`base_model.vera_A`/`vera_B` when `save_projection` (PEFT's keys), else nothing."""
    if not config.save_projection:
        return {}
    proj = _projections(model, adapter_name)
    return {SHARED_KEYS[0]: proj.vera_A, SHARED_KEYS[1]: proj.vera_B}


def load_shared(
    model: nn.Module, config: VeraConfig, adapter_name: str, tensors: dict[str, torch.Tensor], where: str
) -> None:
    """Copy the file's shared matrices into the adapter's (they must be there when `save_projection`)."""
    if not tensors:
        if config.save_projection:
            raise CheckpointError(
                f"the VeRA adapter in {where} says save_projection=true but its file has no {' / '.join(SHARED_KEYS)}"
            )
        return  # drawn again from projection_prng_key at injection
    proj = _projections(model, adapter_name)
    expected = {SHARED_KEYS[0]: tuple(proj.vera_A.shape), SHARED_KEYS[1]: tuple(proj.vera_B.shape)}
    found = {k: tuple(t.shape) for k, t in tensors.items()}
    if found != expected:
        raise CheckpointError(
            f"the VeRA adapter in {where} does not fit this model: its shared matrices are {found}, this model's "
            f"targets need {expected}; was it trained on another architecture or size?"
        )
    with torch.no_grad():
        proj.vera_A.copy_(tensors[SHARED_KEYS[0]])
        proj.vera_B.copy_(tensors[SHARED_KEYS[1]])


def after_load(model: nn.Module, adapter_name: str) -> None:
    """Nothing to refresh."""


def summarize(tensors: dict[str, torch.Tensor]) -> dict:
    modules = sorted({k[: -len(".vera_lambda_b")] for k in tensors if k.endswith(".vera_lambda_b")})
    ranks = sorted({shape_of(t)[0] for k, t in tensors.items() if k.endswith(".vera_lambda_d")})
    return {"adapted_modules": modules, "ranks": ranks}
