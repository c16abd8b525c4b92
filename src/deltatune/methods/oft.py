"""OFT (Qiu et al., 2023): Orthogonal Fine-Tuning, in PEFT's current (>= 0.14) formulation.

Each adapted `nn.Linear` rotates its input with a block-diagonal orthogonal matrix before the frozen weight:
`y = W (x R) + b`, `R = blockdiag(R_1, ..., R_r)`, each block `R_i = cayley(Q_i)` of a skew-symmetric `Q_i` built
from `b (b - 1) / 2` trained values (`oft_R.weight`, `[r, b (b - 1) / 2]`). The Cayley transform is PEFT's:
by default the Neumann series `I + 2Q + 2Q^2 + ... + Q^(n-1)` (`num_cayley_neumann_terms` = n), else the exact
`(I + Q)^-1 (I - Q)`. `Q = 0` at init: `R = I`, the model starts unchanged. Mergeable: `W' = W R^T`; the original
weight is kept while merged so that unmerging gives it back exactly.

PEFT's format: `<layer>.oft_R.weight` in the file, `<layer>.oft_R.<adapter>.weight` in the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from deltatune import inject
from deltatune.config import OFTConfig
from deltatune.methods._bookkeeping import AdapterBookkeeping
from deltatune.methods.lora import DEFAULT_TARGETS as LORA_TARGETS
from deltatune.vocab import is_conv1d, shape_of

HOLDER = "oft_R"

# PEFT's OFT defaults are LoRA's.
DEFAULT_TARGETS = dict(LORA_TARGETS)


def adjust(in_features: int, value: int) -> int:
    """PEFT's `adjust_oft_parameters`: the divisor of `in_features` nearest to `value` (lower on a tie)."""
    if value < in_features:
        higher = value
        while higher <= in_features and in_features % higher != 0:
            higher += 1
    else:
        return in_features
    lower = value
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if (value - lower) <= (higher - value) else higher


class Rotation(nn.Module):
    """The trained values of one adapter's blocks (`weight`, PEFT's `OFTRotationModule.weight`) and the rotation."""

    def __init__(self, r: int, block_size: int, in_features: int, config: OFTConfig):
        super().__init__()
        self.r, self.block_size, self.in_features = r, block_size, in_features
        self.block_share = config.block_share
        self.coft, self.eps = config.coft, config.eps
        self.use_cayley_neumann = config.use_cayley_neumann
        self.num_terms = config.num_cayley_neumann_terms
        self.weight = nn.Parameter(
            torch.zeros(1 if config.block_share else r, block_size * (block_size - 1) // 2)
        )
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def _skew(self, vec: torch.Tensor) -> torch.Tensor:
        m = torch.zeros(vec.shape[0], self.block_size, self.block_size, device=vec.device, dtype=vec.dtype)
        m[:, self.rows, self.cols] = vec
        return m - m.transpose(-2, -1)

    def _project(self, vec: torch.Tensor) -> torch.Tensor:
        """COFT: keep each block's Q within `eps / sqrt(blocks)` of 0 (PEFT's `_project_batch`)."""
        q = self._skew(vec)
        eps = self.eps / torch.sqrt(torch.tensor(q.shape[0]))
        norm = torch.norm(q, dim=(1, 2), keepdim=True)
        q = torch.where(norm <= eps, q, eps * (q / norm))
        return q[:, self.rows, self.cols]

    def blocks(self) -> torch.Tensor:
        """The orthogonal blocks `[blocks, b, b]` (one when shared)."""
        vec = self.weight
        if self.coft:
            with torch.no_grad():
                self.weight.copy_(self._project(self.weight))
        q = self._skew(vec)
        n = q.shape[0]
        if self.use_cayley_neumann:
            rot = torch.eye(self.block_size, device=q.device, dtype=q.dtype).repeat(n, 1, 1)
            if self.num_terms > 1:
                rot = rot + 2.0 * q
                if self.num_terms > 2:
                    q2 = torch.bmm(q, q)
                    rot = rot + 2.0 * q2
                    power = q2
                    for _ in range(3, self.num_terms - 1):
                        power = torch.bmm(power, q)
                        rot = rot + 2.0 * power
                    power = torch.bmm(power, q)
                    rot = rot + power
            return rot
        eye = torch.eye(self.block_size, device=q.device, dtype=q.dtype).expand(n, -1, -1)
        return torch.linalg.solve(eye + q, eye - q, left=False)

    def matrix(self) -> torch.Tensor:
        """The block-diagonal `[in, in]` rotation."""
        blocks = self.blocks()
        count = self.in_features // self.block_size if self.block_share else self.r
        return torch.block_diag(*[blocks[0 if blocks.shape[0] == 1 else i] for i in range(count)])

    def rotate(self, x: torch.Tensor, drop: float = 0.0) -> torch.Tensor:
        blocks = self.blocks()
        count = self.in_features // self.block_size if self.block_share else self.r
        if self.block_share:
            blocks = blocks.repeat(count, 1, 1)
        if drop > 0 and count > 1:  # multiplicative dropout: a fraction of the blocks is the identity
            k = int(drop * count)
            mask = torch.cat([torch.ones(k), torch.zeros(count - k)])[torch.randperm(count)].to(x.device)
            eye = torch.eye(self.block_size, device=x.device, dtype=blocks.dtype)
            blocks = (1 - mask.view(-1, 1, 1)) * blocks + mask.view(-1, 1, 1) * eye
        shaped = x.reshape(*x.shape[:-1], count, self.block_size)
        return torch.einsum("...rk,rkc->...rc", shaped, blocks).reshape(x.shape)


class OFTLinear(AdapterBookkeeping, nn.Module):
    """A frozen `nn.Linear` whose input is rotated by each active OFT adapter."""

    is_delta_layer = True
    supports_merge = True
    supports_mixed_batch = False
    merges_into_weight = True
    _adapter_holders = ("oft_R",)
    _adapter_extras = ("module_dropout",)

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            kind = "GPT-2's Conv1D" if is_conv1d(base_layer) else type(base_layer).__name__
            raise ValueError(f"OFT adapts nn.Linear layers only (as PEFT does), not {kind}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.oft_R = nn.ModuleDict()
        self.module_dropout: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._original: torch.Tensor | None = None

    def add(self, name: str, config: OFTConfig) -> None:
        if name in self.oft_R:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        r, block = config.r, config.oft_block_size
        if r == 0:
            if self.in_features % block != 0 or block > self.in_features:
                old, block = block, adjust(self.in_features, block)
                warnings.warn(
                    f"Invalid `oft_block_size` ({old})! Adjusted `oft_block_size` to ({block}).", stacklevel=2
                )
            r = self.in_features // block
        else:
            if self.in_features % r != 0 or r > self.in_features:
                old, r = r, adjust(self.in_features, r)
                warnings.warn(f"Invalid `r` ({old})! Adjusted `r` to ({r}).", stacklevel=2)
            block = self.in_features // r
        rotation = Rotation(r, block, self.in_features, config).to(self.base_layer.weight.device)
        if not config.init_weights:
            nn.init.normal_(rotation.weight, mean=0.0, std=0.1)
        self.oft_R[name] = rotation
        self.module_dropout[name] = float(config.module_dropout)
        self.set_active(self.active_adapters or [name])

    def merge(self, adapter_names: Iterable[str] | None = None) -> None:
        names = [
            n
            for n in (list(adapter_names) if adapter_names is not None else list(self.active_adapters))
            if n in self.oft_R and n not in self.merged_adapters
        ]
        if not names:
            return
        weight = self.base_layer.weight
        if self._original is None:
            self._original = weight.detach().clone()
        with torch.no_grad():
            for n in names:
                rot = self.oft_R[n].matrix().float()
                weight.copy_((rot @ weight.float().t()).t().to(weight.dtype))
                self.merged_adapters.append(n)

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        with torch.no_grad():
            self.base_layer.weight.copy_(self._original)
        self._original = None
        self.merged_adapters = []

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled or self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        from deltatune.methods.mixed import MIXED

        if MIXED.get() is not None:
            raise ValueError(
                "OFT adapters don't support mixed-adapter batches yet; run one adapter at a time"
            )
        dtype = x.dtype
        for name in self.active_adapters:
            rotation = self.oft_R[name]
            drop = self.module_dropout[name] if self.training else 0.0
            x = rotation.rotate(x.to(rotation.weight.dtype), drop)
        return self.base_layer(x.to(dtype), *args, **kwargs)

    def extra_repr(self) -> str:
        blocks = {n: (m.r, m.block_size) for n, m in self.oft_R.items()}
        return f"adapters (blocks, size)={blocks}"


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, (OFTLinear, nn.Linear))


def layers(model: nn.Module) -> list[tuple[str, OFTLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, OFTLinear)]


def prepare_config(config: OFTConfig, model: nn.Module) -> None:
    """`target_modules=None`: PEFT's per-architecture default."""
    inject.fill_default(config, "target_modules", DEFAULT_TARGETS, model, is_adaptable, "OFT")


def inject_adapter(
    model: nn.Module, config: OFTConfig, adapter_name: str, skip: Iterable[str] = ()
) -> list[str]:
    """Wrap every target with OFT (or add `adapter_name` to an existing wrapper).

    Raises:
        ValueError: a target is not an `nn.Linear` (GPT-2's `Conv1D`, say), with the adaptable modules.
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
    targets = list(
        dict.fromkeys(t[: -len(".base_layer")] if t.endswith(".base_layer") else t for t in targets)
    )
    for name in targets:
        module = inject.get_module(model, name)
        if not isinstance(module, OFTLinear):
            module = OFTLinear(module)
            inject.replace_module(model, name, module)
        module.add(adapter_name, config)
    return targets


def adapter_param_names(model: nn.Module, config: OFTConfig, adapter_name: str) -> list[str]:
    """The rotation values of every adapted layer, plus the biases `config.bias` trains."""
    names = [n for n, _ in model.named_parameters() if f".{HOLDER}.{adapter_name}." in n]
    if config.bias == "all":
        names += [
            n
            for n, _ in model.named_parameters()
            if n.endswith(".bias") and ".original_module." not in n and ".modules_to_save." not in n
        ]
    elif config.bias == "oft_only":
        for layer_name, layer in layers(model):
            if adapter_name in layer.adapters and layer.base_layer.bias is not None:
                names.append(f"{layer_name}.base_layer.bias")
    return list(dict.fromkeys(names))


def saved_key(name: str, adapter_name: str) -> str:
    return name.replace(f".{HOLDER}.{adapter_name}.", f".{HOLDER}.")


def internal_key(key: str, adapter_name: str) -> str:
    return key.replace(f".{HOLDER}.", f".{HOLDER}.{adapter_name}.")


def after_load(model: nn.Module, adapter_name: str) -> None:
    """Nothing to refresh."""


def summarize(tensors: dict[str, torch.Tensor]) -> dict:
    modules = sorted({k.split(f".{HOLDER}.")[0] for k in tensors if f".{HOLDER}." in k})
    blocks = sorted({shape_of(t)[0] for k, t in tensors.items() if k.endswith(f".{HOLDER}.weight")})
    return {"adapted_modules": modules, "blocks": blocks}
