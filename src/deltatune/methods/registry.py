"""The one table of fine-tuning methods that every command reads.

Two levels:

- a **method type** per `peft_type` (what is written in `adapter_config.json`): its config class, the module
  implementing it, whether it merges into the base, whether it trains the base's own weights ("in place"),
  whether `serve` can serve it, and which layers/mixed batches it supports;
- a **method** per command-line name (`lora`, `dora`, `qlora-nf4`, `houlsby`, ...): a method type plus the
  config defaults for that name, the quantization of its frozen base, its default learning rate (the best of
  the sweep in the README), training options (LoRA+'s `loraplus_lr_ratio`), its report colour and the
  formula `deltatune estimate` uses for its trainable parameters.

A method module implements `MethodModule` (checked when it is first imported: a missing function fails at
import, not in a user's run) and the layers it puts into a model implement `DeltaLayer`. Methods that add
virtual tokens or key/value prefixes instead of wrapping layers (prompt/prefix tuning) register with
`kind="virtual_tokens"`: they wrap no layer, `mergeable=False` with a `merge_error` that
`merge_and_unload` raises, and their module may offer `prepare_inputs` (see `MethodModule`).

Adding a method: one file in `methods/` with its config class and the module functions, one `register_type`
call and one or more `register` calls here (or in the method's own file, for a plug-in).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from deltatune.config import _BaseConfig


# ---- the contracts -----------------------------------------------------------------------------------


@runtime_checkable
class DeltaLayer(Protocol):
    """A layer a method put into the model in place of `base_layer` (marked `is_delta_layer = True`).

    `supports_merge=False` layers raise a clear `ValueError` from `merge`; `supports_mixed_batch=False` layers
    make a mixed-adapter batch fail with a clear message before it runs. `merges_into_weight` says whether
    merging changes `base_layer.weight` (so a weight tied to another module must be untied first).
    `reset_cache` drops anything derived from the adapter weights (called after weights are loaded).
    """

    is_delta_layer: bool
    supports_merge: bool
    supports_mixed_batch: bool
    merges_into_weight: bool
    base_layer: nn.Module
    active_adapters: list[str]
    merged_adapters: list[str]
    disabled: bool

    @property
    def adapters(self) -> list[str]: ...

    def set_active(self, names: Iterable[str]) -> None: ...

    def delete(self, name: str) -> None: ...

    def merge(self, adapter_names: Iterable[str] | None = None) -> None: ...

    def unmerge(self) -> None: ...

    def reset_cache(self) -> None: ...


class MethodModule(Protocol):
    """What the wrapper (`deltatune.model`) calls on a method's module.

    - `prepare_config(config, model)`: fill model-dependent defaults into the (already copied) config, e.g.
      LoRA's per-architecture `target_modules`; raise a `ValueError` that says what to pass when it can't.
    - `inject_adapter(model, config, adapter_name, skip)`: put the method into the model in place and return
      the names of the affected modules.
    - `adapter_param_names(model, config, adapter_name)`: the parameters that train and are saved.
    - `saved_key(name, adapter_name)` / `internal_key(key, adapter_name)`: parameter name <-> key in the file
      (PEFT's keys drop the adapter name).
    - `after_load(model, adapter_name)`: called after tensors were copied into the adapter's parameters.
    - `summarize(keys)`: from a saved adapter's tensor keys (and shapes), what `inspect` shows:
      `{"adapted_modules": [...], ...}` (LoRA adds `ranks`).

    Optional, for methods that change the inputs rather than layers (prompt/prefix tuning):
    `prepare_inputs(peft_model, adapter_name, args, kwargs) -> (args, kwargs)`, called before every forward and
    generate with the active adapter. Optional, for tensors of the whole adapter rather than of a layer (VeRA's
    shared projections): `shared_tensors(model, config, adapter_name) -> {file key: tensor}` when saving and
    `load_shared(model, config, adapter_name, {file key: tensor}, where)` with the file's keys outside
    `base_model.model.` when loading.
    """

    def prepare_config(self, config: _BaseConfig, model: nn.Module) -> None: ...

    def inject_adapter(
        self, model: nn.Module, config: _BaseConfig, adapter_name: str, skip: Iterable[str] = ()
    ) -> list[str]: ...

    def adapter_param_names(self, model: nn.Module, config: _BaseConfig, adapter_name: str) -> list[str]: ...

    def saved_key(self, name: str, adapter_name: str) -> str: ...

    def internal_key(self, key: str, adapter_name: str) -> str: ...

    def after_load(self, model: nn.Module, adapter_name: str) -> None: ...

    def summarize(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]: ...


MODULE_FUNCTIONS = (
    "prepare_config",
    "inject_adapter",
    "adapter_param_names",
    "saved_key",
    "internal_key",
    "after_load",
    "summarize",
)


def check_module(module: ModuleType) -> ModuleType:
    """Raise `TypeError` naming every `MethodModule` function `module` lacks."""
    missing = [f for f in MODULE_FUNCTIONS if not callable(getattr(module, f, None))]
    if missing:
        raise TypeError(
            f"method module {module.__name__} lacks {', '.join(missing)} (see deltatune.methods.registry.MethodModule)"
        )
    return module


# ---- the estimate hooks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate knows about a transformer."""

    params: float
    hidden: int
    layers: int
    heads: int
    kv_hidden: int | None = None  # keys'/values' width with grouped-query attention (None: `hidden`)
    intermediate: int | None = None  # the feed-forward width (None: 4 x `hidden`)


def _kv(shape: ModelShape) -> int:
    return getattr(shape, "kv_hidden", None) or shape.hidden


def _outputs(shape: ModelShape, o: Mapping[str, Any]) -> int:
    """The output widths of one block's adapted matrices: `targets_per_layer` of them, q then v (PEFT's default
    targets), then any others as hidden -> hidden; v is as wide as the keys/values (narrower with grouped-query
    attention)."""
    t = o["targets_per_layer"]
    return t * shape.hidden + (_kv(shape) - shape.hidden if t >= 2 else 0)


# Options the estimate formulas read (the `deltatune estimate` flags), with their defaults.
ESTIMATE_OPTIONS = {"r": 8, "targets_per_layer": 2, "num_layers": 2, "reduction_factor": 16}


def _full(shape: ModelShape, o: Mapping[str, Any]) -> float:
    return shape.params


def _top_layers(shape: ModelShape, o: Mapping[str, Any]) -> float:
    return shape.params * min(o["num_layers"], shape.layers) / shape.layers


def _lora(shape: ModelShape, o: Mapping[str, Any]) -> float:
    # per adapted matrix: A (r x in) and B (out x r)
    return shape.layers * o["r"] * (o["targets_per_layer"] * shape.hidden + _outputs(shape, o))


def _dora(shape: ModelShape, o: Mapping[str, Any]) -> float:
    return _lora(shape, o) + shape.layers * _outputs(shape, o)  # and a magnitude per output row


def _bottleneck(per_block: int) -> Callable[[ModelShape, Mapping[str, Any]], float]:
    def formula(shape: ModelShape, o: Mapping[str, Any]) -> float:
        h = shape.hidden
        b = max(1, h // o["reduction_factor"])
        return shape.layers * (2 * h * b + h + b) * per_block

    return formula


def _ia3(shape: ModelShape, o: Mapping[str, Any]) -> float:
    # PEFT's defaults: key and value outputs and the FFN down-projection's input (its width, 4h unless known).
    ffn = getattr(shape, "intermediate", None) or 4 * shape.hidden
    return shape.layers * (2 * _kv(shape) + ffn)


def _vera(shape: ModelShape, o: Mapping[str, Any]) -> float:
    # Per adapted layer: lambda_b (out) + lambda_d (r, 256 by default); the shared random matrices are frozen.
    return shape.layers * (_outputs(shape, o) + o["targets_per_layer"] * o.get("vera_r", 256))


def _oft(shape: ModelShape, o: Mapping[str, Any]) -> float:
    # Per adapted layer: in/b blocks of b(b-1)/2 values (PEFT's default block size b = 32).
    b = o.get("oft_block_size", 32)
    return shape.layers * o["targets_per_layer"] * (shape.hidden // b) * (b * (b - 1) // 2)


# The merge refusal of the methods that add virtual tokens (prompt.py's MERGE_ERROR; not imported: torch).
_VIRTUAL_MERGE_ERROR = (
    "{method} can't be merged into the base weights: its virtual tokens are extra inputs, not a change of any "
    "weight, so no plain model computes the same thing. Keep using the adapter model as it is, or call unload() "
    "to get the plain base model back."
)


def _prompt_tuning(shape: ModelShape, o: Mapping[str, Any]) -> float:
    return o.get("num_virtual_tokens", 20) * shape.hidden


def _prefix_tuning(shape: ModelShape, o: Mapping[str, Any]) -> float:
    return o.get("num_virtual_tokens", 20) * shape.layers * 2 * shape.hidden


def _all_blocks(shape: ModelShape, o: Mapping[str, Any]) -> int:
    return shape.layers


def _top_blocks(shape: ModelShape, o: Mapping[str, Any]) -> int:
    return min(o["num_layers"], shape.layers)


# ---- the tables -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodType:
    """One `peft_type`: how it is implemented and what it can do."""

    peft_type: str
    config: type
    module: str
    kind: str = "layers"  # "layers" (wraps layers), "in_place" (trains base weights), "virtual_tokens"
    mergeable: bool = True
    merge_error: str | None = None
    servable: bool = True
    mixed_batch: bool = True
    identity_at_init: bool = True  # a fresh adapter computes exactly what the base does
    adds_task_heads: bool = True  # a task's head trains as `modules_to_save` (not for full: it all trains)
    key_prefix: str = (
        "base_model.model."  # PEFT's prefix of the file's keys ("base_model." for prompt learning)
    )

    @property
    def in_place(self) -> bool:
        """Trains the base's own weights: one adapter per model, nothing to disable, no base to keep."""
        return self.kind == "in_place"

    def load(self) -> ModuleType:
        """The method's module, checked against `MethodModule`."""
        return check_module(importlib.import_module(self.module))


@dataclass(frozen=True)
class Method:
    """One method name as the command line, train configs and `compare` spell it."""

    name: str
    peft_type: str
    lr: float
    color: str
    trainable_params: Callable[[ModelShape, Mapping[str, Any]], float]
    args: Mapping[str, Any] = field(default_factory=dict)
    quantize: str | None = None
    quantized_base: bool = False  # can train on a quantized (NF4/int8) frozen base
    train_options: Mapping[str, Any] = field(default_factory=dict)  # e.g. LoRA+'s loraplus_lr_ratio
    backprop_blocks: Callable[[ModelShape, Mapping[str, Any]], int] = _all_blocks
    description: str = ""

    @property
    def type(self) -> MethodType:
        return PEFT_TYPES[self.peft_type]

    @property
    def config(self) -> type:
        return self.type.config

    @property
    def mergeable(self) -> bool:
        return self.type.mergeable

    @property
    def in_place(self) -> bool:
        return self.type.in_place

    @property
    def servable(self) -> bool:
        return self.type.servable

    def make_config(self, task_type: str | None = None, **overrides: Any) -> _BaseConfig:
        """A fresh config for this method (`overrides` replace its defaults; a wrong name raises)."""
        args = {**self.args, **overrides, "task_type": task_type}
        return self.config.from_dict(args, strict=True)


_TYPES: dict[str, MethodType] = {}
_METHODS: dict[str, Method] = {}
PEFT_TYPES: Mapping[str, MethodType] = MappingProxyType(_TYPES)
METHODS: Mapping[str, Method] = MappingProxyType(_METHODS)


def register_type(method_type: MethodType) -> MethodType:
    if method_type.peft_type in _TYPES:
        raise ValueError(f"peft_type {method_type.peft_type!r} is registered already")
    if method_type.config.peft_type != method_type.peft_type:
        raise ValueError(
            f"{method_type.config.__name__}.peft_type is {method_type.config.peft_type!r}, "
            f"not {method_type.peft_type!r}"
        )
    if not method_type.mergeable and not method_type.merge_error:
        raise ValueError(f"{method_type.peft_type} doesn't merge: give the merge_error users will read")
    _TYPES[method_type.peft_type] = method_type
    return method_type


def register(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is registered already")
    if method.peft_type not in _TYPES:
        raise ValueError(f"method {method.name!r}: register peft_type {method.peft_type!r} first")
    _METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    """The method registered as `name`.

    Raises:
        ValueError: an unknown name, with the closest one and the list of all.
    """
    if name not in _METHODS:
        hint = difflib.get_close_matches(name, list(_METHODS), n=1)
        raise ValueError(
            f"unknown method {name!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
            f"deltatune has {', '.join(_METHODS)}"
        )
    return _METHODS[name]


def method_type(peft_type: str) -> MethodType:
    """The method type of a `peft_type` (as read from `adapter_config.json`)."""
    if peft_type not in _TYPES:
        raise ValueError(f"unsupported peft_type {peft_type!r}; deltatune reads {', '.join(_TYPES)}")
    return _TYPES[peft_type]


def module_for(peft_type: str) -> ModuleType:
    """The module implementing `peft_type`."""
    return method_type(peft_type).load()


def not_servable(peft_type: str) -> str:
    """Why `serve` refuses adapters of `peft_type`."""
    kind = method_type(peft_type)
    if kind.in_place:
        return f"{peft_type} checkpoints are whole models, not adapters to serve"
    if kind.kind == "virtual_tokens":
        return (
            f"{peft_type} adapters can't be served: serve runs mixed-adapter batches, which don't support virtual "
            "tokens (they change the length and the keys/values of every row); use `deltatune generate` instead"
        )
    if not kind.mixed_batch:
        return f"{peft_type} adapters can't be served yet: serve runs mixed-adapter batches, which they don't support"
    return f"{peft_type} adapters can't be served"


def config_types() -> dict[str, type]:
    return {t.peft_type: t.config for t in _TYPES.values()}


def names() -> list[str]:
    return list(_METHODS)


# ---- the methods --------------------------------------------------------------------------------------


def _register_builtin() -> None:
    from deltatune.config import (
        BottleneckConfig,
        FullFinetuneConfig,
        IA3Config,
        LoraConfig,
        OFTConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        TopLayersConfig,
        VeraConfig,
    )

    register_type(
        MethodType(
            "FULL",
            FullFinetuneConfig,
            "deltatune.methods.layers",
            kind="in_place",
            servable=False,
            adds_task_heads=False,
        )
    )
    register_type(
        MethodType("TOP_LAYERS", TopLayersConfig, "deltatune.methods.layers", kind="in_place", servable=False)
    )
    register_type(
        MethodType(
            "BOTTLENECK",
            BottleneckConfig,
            "deltatune.methods.bottleneck",
            mergeable=False,
            merge_error=(
                "bottleneck adapters can't be merged into the base weights: `h + up(act(down(h)))` has a "
                "non-linearity between its projections, so no single weight matrix computes it, and the adapter "
                "layers stay in the model at inference (adding latency). Keep using the adapter model as it is, "
                "call unload() to get the plain base model back, or train LoRA instead if you need zero added "
                "latency after merging."
            ),
        )
    )
    register_type(MethodType("LORA", LoraConfig, "deltatune.methods.lora"))

    # Learning rates: the best of benchmarks/lr_sweep.py on the embedded default (README).
    register(Method("full", "FULL", 1e-4, "#7f7f7f", _full, description="every weight trains"))
    register(
        Method(
            "top-layers",
            "TOP_LAYERS",
            3e-4,
            "#bcbd22",
            _top_layers,
            args={"num_layers": 2},
            backprop_blocks=_top_blocks,
            description="the last N blocks and the head train",
        )
    )
    register(
        Method(
            "houlsby",
            "BOTTLENECK",
            3e-3,
            "#ff7f0e",
            _bottleneck(2),
            args={"style": "houlsby"},
            quantized_base=True,
            description="bottleneck adapters after attention and FFN (AdapterH)",
        )
    )
    register(
        Method(
            "pfeiffer",
            "BOTTLENECK",
            3e-3,
            "#d62728",
            _bottleneck(1),
            args={"style": "pfeiffer"},
            quantized_base=True,
            description="one bottleneck adapter per block, after the FFN (AdapterL)",
        )
    )
    lora_args = {"r": 8, "lora_alpha": 16}
    register(
        Method(
            "lora", "LORA", 3e-3, "#1f77b4", _lora, args=lora_args, quantized_base=True, description="LoRA"
        )
    )
    register(
        Method(
            "dora",
            "LORA",
            3e-3,
            "#17becf",
            _dora,
            args={**lora_args, "use_dora": True},
            quantized_base=True,
            description="DoRA: LoRA with a trained magnitude per output row",
        )
    )
    register(
        Method(
            "lora-plus",
            "LORA",
            1e-3,  # the best of benchmarks/lr_sweep.py's grid on the embedded default
            "#aec7e8",
            _lora,
            args=lora_args,
            quantized_base=True,
            train_options={"loraplus_lr_ratio": 16},
            description="LoRA+: B matrices at 16x the learning rate of A (an ordinary LoRA adapter)",
        )
    )
    register(
        Method(
            "qlora-nf4",
            "LORA",
            3e-3,
            "#2ca02c",
            _lora,
            args=lora_args,
            quantize="nf4",
            quantized_base=True,
            description="LoRA on a frozen NF4 base",
        )
    )
    register(
        Method(
            "qlora-int8",
            "LORA",
            3e-3,
            "#98df8a",
            _lora,
            args=lora_args,
            quantize="int8",
            quantized_base=True,
            description="LoRA on a frozen int8 base",
        )
    )
    register_type(MethodType("IA3", IA3Config, "deltatune.methods.ia3", mixed_batch=False, servable=False))
    register(
        Method(
            "ia3",
            "IA3",
            1e-2,  # the best of benchmarks/lr_sweep.py's grid on the embedded default
            "#8c564b",
            _ia3,
            description="(IA)^3: learned vectors rescale keys, values and the FFN input",
        )
    )

    register_type(MethodType("VERA", VeraConfig, "deltatune.methods.vera", mixed_batch=False, servable=False))
    register(
        Method(
            "vera",
            "VERA",
            3e-2,  # the best of benchmarks/lr_sweep.py's grid on the embedded default
            "#e377c2",
            _vera,
            description="VeRA: shared frozen random matrices, trained scaling vectors",
        )
    )

    register_type(MethodType("OFT", OFTConfig, "deltatune.methods.oft", mixed_batch=False, servable=False))
    register(
        Method(
            "oft",
            "OFT",
            3e-3,  # the best of benchmarks/lr_sweep.py's grid on the embedded default
            "#7f3fbf",
            _oft,
            description="OFT: a block-diagonal orthogonal rotation of each adapted layer's input",
        )
    )

    register_type(
        MethodType(
            "PROMPT_TUNING",
            PromptTuningConfig,
            "deltatune.methods.prompt",
            kind="virtual_tokens",
            mergeable=False,
            merge_error=_VIRTUAL_MERGE_ERROR.format(method="prompt tuning"),
            servable=False,
            mixed_batch=False,
            identity_at_init=False,
            key_prefix="base_model.",
        )
    )
    register(
        Method(
            "prompt-tuning",
            "PROMPT_TUNING",
            1e-1,
            "#9467bd",
            _prompt_tuning,
            args={"num_virtual_tokens": 20, "prompt_tuning_init": "SAMPLE_VOCAB"},
            description="prompt tuning: 20 trained virtual tokens in front of the input embeddings",
        )
    )

    register_type(
        MethodType(
            "PREFIX_TUNING",
            PrefixTuningConfig,
            "deltatune.methods.prefix",
            kind="virtual_tokens",
            mergeable=False,
            merge_error=_VIRTUAL_MERGE_ERROR.format(method="prefix tuning"),
            servable=False,
            mixed_batch=False,
            identity_at_init=False,
            key_prefix="base_model.",
        )
    )
    register(
        Method(
            "prefix-tuning",
            "PREFIX_TUNING",
            3e-2,
            "#c5b0d5",
            _prefix_tuning,
            args={"num_virtual_tokens": 20},
            description="prefix tuning: 20 trained keys and values in front of every layer's own",
        )
    )


_register_builtin()
