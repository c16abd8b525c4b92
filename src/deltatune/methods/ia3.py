"""(IA)^3 (Liu et al., 2022): a learned vector rescales a frozen layer's output, or its input for feed-forward
layers ("Infused Adapter by Inhibiting and Amplifying Inner Activations").

`y = (W x + b) * l` (one value per output feature, the bias rescaled too) or, for `feedforward_modules`,
`y = W (x * l) + b` (one value per input feature). Vectors start at 1, so the model starts unchanged. Merging
folds `l` into the weight (rows, or columns for feed-forward layers) and the bias: `W' = W * l`. Parameter and
file names are PEFT's: `<layer>.ia3_l.<adapter>` in the model, `<layer>.ia3_l` in the file, shaped `[out, 1]`
or `[1, in]` (as `[out, 1]`/`[1, in]` of the `[out, in]` weight; GPT-2's `Conv1D` stores `[in, out]`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from deltatune import inject
from deltatune.config import IA3Config
from deltatune.methods._bookkeeping import AdapterBookkeeping
from deltatune.vocab import is_conv1d, linear_features, shape_of

HOLDER = "ia3_l"

# PEFT's per-architecture defaults (config.model_type -> names).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}
DEFAULT_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}

MIXED_ERROR = (
    "(IA)^3 adapters don't support mixed-adapter batches yet; run one adapter at a time (set_adapter)"
)


class IA3Linear(AdapterBookkeeping, nn.Module):
    """A frozen linear layer (`nn.Linear` or `Conv1D`) whose output (or input) is rescaled per adapter."""

    is_delta_layer = True
    supports_merge = True
    supports_mixed_batch = False
    merges_into_weight = True
    _adapter_holders = ("ia3_l",)
    _adapter_extras = ("is_feedforward",)

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if getattr(base_layer, "is_quantized_linear", False):
            raise ValueError("(IA)^3 on a quantized base is not supported; use LoRA (qlora-nf4/qlora-int8)")
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._original: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def add(self, name: str, config: IA3Config, feedforward: bool) -> None:
        if name in self.ia3_l:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        if self.ia3_l and feedforward != next(iter(self.is_feedforward.values())):
            raise ValueError(
                "all (IA)^3 adapters of one layer must agree on whether it is a feed-forward layer"
            )
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        device = self.base_layer.weight.device
        vector = (
            torch.ones(shape, device=device) if config.init_ia3_weights else torch.randn(shape, device=device)
        )
        self.ia3_l[name] = nn.Parameter(vector)
        self.is_feedforward[name] = feedforward
        self.set_active(self.active_adapters or [name])

    def _scale(self, names: Iterable[str]) -> torch.Tensor | None:
        scale = None
        for n in names:
            if n in self.ia3_l:
                v = self.ia3_l[n].flatten()
                scale = v if scale is None else scale * v
        return scale

    @property
    def feedforward(self) -> bool:
        return any(self.is_feedforward.values())

    def merge(self, adapter_names: Iterable[str] | None = None) -> None:
        """Fold the vectors into the weight (and, for output scaling, the bias); exact unmerge keeps a copy of the
        original weight while merged (a division would not give the base back bit for bit)."""
        names = [
            n
            for n in (list(adapter_names) if adapter_names is not None else list(self.active_adapters))
            if n in self.ia3_l and n not in self.merged_adapters
        ]
        if not names:
            return
        base = self.base_layer
        if self._original is None:
            bias = base.bias.detach().clone() if getattr(base, "bias", None) is not None else None
            self._original = (base.weight.detach().clone(), bias)
        with torch.no_grad():
            for n in names:
                v = self.ia3_l[n].detach().float().flatten()
                w = base.weight.float()
                if self.is_feedforward[n]:  # scale the input features: columns of [out, in] (rows of Conv1D)
                    w = w * (v[:, None] if self.fan_in_fan_out else v[None, :])
                else:
                    w = w * (v[None, :] if self.fan_in_fan_out else v[:, None])
                    if getattr(base, "bias", None) is not None:
                        base.bias.copy_((base.bias.float() * v).to(base.bias.dtype))
                base.weight.copy_(w.to(base.weight.dtype))
                self.merged_adapters.append(n)

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        weight, bias = self._original  # type: ignore[misc]
        with torch.no_grad():
            self.base_layer.weight.copy_(weight)
            if bias is not None:
                self.base_layer.bias.copy_(bias)
        self._original = None
        self.merged_adapters = []

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled or self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        from deltatune.methods.mixed import MIXED

        if MIXED.get() is not None:
            raise ValueError(MIXED_ERROR)
        scale = self._scale(self.active_adapters)
        if scale is None:
            return self.base_layer(x, *args, **kwargs)
        if self.feedforward:
            return self.base_layer((x * scale.to(x.dtype)).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scale).to(result.dtype)

    def extra_repr(self) -> str:
        return f"adapters={self.adapters}, feedforward={self.feedforward}"


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, (IA3Linear, nn.Linear)) or is_conv1d(module)


def _is_feedforward(config: IA3Config, name: str) -> bool:
    """PEFT's rule: a regex full-matches the name, a list entry is a plain suffix of it."""
    ff = config.feedforward_modules
    if isinstance(ff, str):
        return re.fullmatch(ff, name) is not None
    return any(name.endswith(f) for f in ff or [])


def prepare_config(config: IA3Config, model: nn.Module) -> None:
    """PEFT's per-architecture defaults for `target_modules` and `feedforward_modules`.

    Raises:
        ValueError: the architecture has no default for one of them; says which to pass.
    """
    for field, table in (("target_modules", DEFAULT_TARGETS), ("feedforward_modules", DEFAULT_FEEDFORWARD)):
        inject.fill_default(config, field, table, model, is_adaptable, "(IA)^3")


def inject_adapter(
    model: nn.Module, config: IA3Config, adapter_name: str, skip: Iterable[str] = ()
) -> list[str]:
    """Wrap every target of `config` with an (IA)^3 vector (or add `adapter_name` to an existing wrapper)."""
    targets = inject.find_targets(
        model,
        config.target_modules,
        adaptable=is_adaptable,
        exclude_modules=config.exclude_modules,
        skip=list(skip),
    )
    targets = list(
        dict.fromkeys(t[: -len(".base_layer")] if t.endswith(".base_layer") else t for t in targets)
    )
    config.fan_in_fan_out = any(is_conv1d(_base(inject.get_module(model, t))) for t in targets)
    for name in targets:
        module = inject.get_module(model, name)
        if not isinstance(module, IA3Linear):
            module = IA3Linear(module)
            inject.replace_module(model, name, module)
        module.add(adapter_name, config, _is_feedforward(config, name))
    return targets


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, IA3Linear) else module


def adapter_param_names(model: nn.Module, config: IA3Config, adapter_name: str) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.endswith(f".{HOLDER}.{adapter_name}")]


def saved_key(name: str, adapter_name: str) -> str:
    return name.replace(f".{HOLDER}.{adapter_name}", f".{HOLDER}")


def internal_key(key: str, adapter_name: str) -> str:
    return f"{key}.{adapter_name}" if key.endswith(f".{HOLDER}") else key


def after_load(model: nn.Module, adapter_name: str) -> None:
    """Nothing to refresh."""


def summarize(tensors: dict[str, torch.Tensor]) -> dict:
    modules = sorted({k[: -len(f".{HOLDER}")] for k in tensors if k.endswith(f".{HOLDER}")})
    feedforward = sorted(
        k[: -len(f".{HOLDER}")] for k, t in tensors.items() if k.endswith(HOLDER) and shape_of(t)[0] == 1
    )
    return {"adapted_modules": modules, "feedforward_modules": feedforward}
