"""Configs for every fine-tuning method, validated on construction.

`LoraConfig` takes PEFT's field names and meanings, and writes/reads PEFT's `adapter_config.json`.
The other configs (bottleneck adapters, top-layer and full fine-tuning) are deltatune's own and use
the same JSON file with their own `peft_type`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from deltatune.errors import (
    ConfigError,  # noqa: F401  (re-exported: deltatune.config.ConfigError)
    short,
)
from deltatune.vocab import TASK_TYPES

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
LORA_BIAS = ("none", "all", "lora_only")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_task_type(task_type: str | None) -> None:
    _check(
        task_type is None or task_type in TASK_TYPES,
        f"unknown task_type {short(task_type)}; use one of {', '.join(TASK_TYPES)} (or None)",
    )


def _check_str_list(value: Any, name: str, allow_str: bool = True) -> None:
    if value is None:
        return
    if allow_str and isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise ConfigError(f"{name} is not a valid regular expression ({e}): {short(value)}") from e
        return
    _check(
        isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value),
        f"{name} must be a list of module names{' or a regex string' if allow_str else ''}, got {short(value)}",
    )


# Other spellings of a config field (other libraries', or the obvious word), for "did you mean".
_KEY_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_rank": "r",
    "alpha": "lora_alpha",
    "scale": "lora_alpha",
    "dropout": "lora_dropout",
    "targets": "target_modules",
    "target": "target_modules",
    "modules": "target_modules",
    "exclude": "exclude_modules",
    "dora": "use_dora",
    "rslora": "use_rslora",
    "reduction": "reduction_factor",
    "activation": "non_linearity",
    "act": "non_linearity",
    "layers": "num_layers",
    "top_layers": "num_layers",
    "n_layers": "num_layers",
    "task": "task_type",
}


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a JSON value has a config field's annotated type (bool is not an int, an int is a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, set):
        return isinstance(value, (list, tuple, set)) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _type_ok(k, args[0]) and _type_ok(v, args[1]) for k, v in value.items()
        )
    return True  # Any, or a type this checker doesn't know


# No float of any method's config means anything beyond this (alpha, dropout, eps, ...).
MAX_CONFIG_FLOAT = 1e6
MAX_CONFIG_INT = 2**63 - 1  # what a tensor index or a seed can hold


def _absurd_number(value: Any) -> str | None:
    """Why a number in a config (or in its lists and mappings) can't be meant: NaN or infinity (JSON as Python
    writes it), a float beyond `MAX_CONFIG_FLOAT`, an integer beyond int64 (`r: 1e30` written as digits)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if abs(value) > MAX_CONFIG_FLOAT:
            return f"is {value:g}, beyond any sensible value (at most {MAX_CONFIG_FLOAT:g} in size)"
    if isinstance(value, int) and abs(value) > MAX_CONFIG_INT:
        return f"is {short(value, 60)}, larger than any integer a tensor can hold (2**63 - 1)"
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    for item in items:
        if problem := _absurd_number(item):
            return problem
    return None


def _type_words(hint: Any, plural: bool = False) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_words(a, plural) for a in args)
    if hint is type(None):
        return "null"
    if origin in (list, tuple, set):
        return f"a list of {_type_words(args[0], True)}"
    if origin is dict:
        return f"a mapping of {_type_words(args[0], True)} to {_type_words(args[1], True)}"
    words = {
        bool: ("true/false", "true/false"),
        int: ("an integer", "integers"),
        float: ("a number", "numbers"),
    }
    words[str] = ("a string", "strings")
    return words[hint][plural] if hint in words else str(hint)


# Keys PEFT writes into every adapter_config.json that carry no meaning for the adapter itself.
_PEFT_INFORMATIONAL = ("auto_mapping", "peft_version")


@dataclass
class _BaseConfig:
    """Fields every method shares."""

    peft_type: ClassVar[str] = ""

    task_type: str | None = None
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        _check_task_type(self.task_type)
        _check_str_list(self.modules_to_save, "modules_to_save", allow_str=False)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    def to_dict(self) -> dict[str, Any]:
        """Return the config as the JSON-ready dict written to `adapter_config.json`."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k, v in out.items():
            if isinstance(v, (set, tuple)):
                out[k] = sorted(v) if isinstance(v, set) else list(v)
        out["peft_type"] = self.peft_type
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = True) -> _BaseConfig:
        """Build a config from a dict. Unknown keys raise (strict) or are dropped with a warning."""
        data = dict(data)
        data.pop("peft_type", None)
        for key in _PEFT_INFORMATIONAL:
            data.pop(key, None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in data if k not in names]
        for k in unknown:
            data.pop(k)
            alias = _KEY_ALIASES.get(str(k).lower())
            hint = [alias] if alias in names else difflib.get_close_matches(str(k)[:100], names, n=1)
            msg = f"unknown {cls.__name__} key {short(k)}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            if strict:
                raise ConfigError(msg)
            logger.warning("%s; ignored", msg)
        hints = typing.get_type_hints(cls)
        for key, value in list(data.items()):
            if value is None and typing.get_origin(hints[key]) is dict:
                data[key] = {}  # PEFT writes `"rank_pattern": null` as often as `{}`
            elif not _type_ok(value, hints[key]):
                raise ConfigError(
                    f"field {short(key)} must be {_type_words(hints[key])}, got {type(value).__name__} {short(value)}"
                )
            elif problem := _absurd_number(value):
                raise ConfigError(f"field {short(key)} {problem}")
        return cls(**data)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `adapter_config.json` into `directory` atomically."""
        from deltatune.checkpoint import write_adapter_config

        write_adapter_config(os.fspath(directory), self.to_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> _BaseConfig:
        """Read `adapter_config.json` from `directory` (any method's config, chosen by `peft_type`)."""
        return load_config(directory)


# PEFT's LoRA keys that deltatune reads but does not implement: loading is refused when they hold a
# value that changes the adapter's numerics, since the outputs would silently differ from PEFT's.
_PEFT_LORA_INERT = {
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
    "auto_mapping": None,  # any value: informational
    "corda_config": (None,),
    "ensure_weight_tying": None,
    "eva_config": (None,),
    "kasa_config": (None,),
    "layer_replication": (None,),
    "loftq_config": ({}, None),
    "lora_bias": (False,),
    "lora_ga_config": (None,),
    "megatron_config": (None,),
    "megatron_core": None,
    "monteclora_config": (None,),
    "peft_version": None,
    "qalora_group_size": None,
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_bdlora": (None, False),
    "use_qalora": (False,),
    "velora_config": (None,),
}


@dataclass
class LoraConfig(_BaseConfig):
    """LoRA: learn `W' = W + (lora_alpha / r) * B @ A` beside chosen layers (PEFT's names and meanings).

    Args:
        r: rank of the update.
        lora_alpha: scaling numerator; the update is scaled by `lora_alpha / r` (or `/ sqrt(r)` with rslora).
        lora_dropout: dropout on the input of the LoRA branch.
        target_modules: a list matches module names exactly or as a suffix after a dot; a string is a regex
            full-matched against the full module name; `"all-linear"` targets every linear layer but the
            output head; `None` uses the architecture's default (e.g. `q_proj`/`v_proj` for OPT/Llama).
        exclude_modules: same syntax as `target_modules`; matching modules are never adapted.
        bias: `"none"`, `"all"` (every bias trains) or `"lora_only"` (biases of adapted layers train).
        task_type: `CAUSAL_LM`, `SEQ_CLS`, `TOKEN_CLS`, `SEQ_2_SEQ_LM` or `FEATURE_EXTRACTION`; with
            `SEQ_CLS`/`TOKEN_CLS` the classification head (`classifier` or `score`) trains and is saved.
        modules_to_save: modules trained in full and saved with the adapter.
        fan_in_fan_out: the layer stores its weight as `[in, out]` (GPT-2's `Conv1D`; set automatically).
        use_rslora: scale by `lora_alpha / sqrt(r)`.
        init_lora_weights: `True` (A Kaiming-uniform, B zero: the model starts unchanged), `"gaussian"`
            (A normal with std 1/r, B zero), `False` (both random: not a no-op) or `"pissa"` (A and B from the
            top-r SVD of W; the residual stays in the base weight).
        layers_to_transform: only adapt layers with these indices.
        layers_pattern: the name of the layer list the indices refer to (e.g. `"layers"`, `"h"`).
        rank_pattern: per-module rank overrides, `{name_or_regex: r}`.
        alpha_pattern: per-module alpha overrides, `{name_or_regex: alpha}`.
        use_dora: DoRA, a trained magnitude vector per output row (mergeable).
    """

    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
            f"r must be a positive integer, got {short(self.r)}",
        )
        _check(
            isinstance(self.lora_alpha, (int, float))
            and not isinstance(self.lora_alpha, bool)
            and 0 < self.lora_alpha <= MAX_CONFIG_FLOAT,
            f"lora_alpha must be a positive number of at most {MAX_CONFIG_FLOAT:g}, got {short(self.lora_alpha)}",
        )
        _check(
            isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1,
            f"lora_dropout must be in [0, 1), got {short(self.lora_dropout)}",
        )
        _check(self.bias in LORA_BIAS, f"unknown bias {short(self.bias)}; use one of {', '.join(LORA_BIAS)}")
        _check(
            isinstance(self.init_lora_weights, bool) or self.init_lora_weights in ("gaussian", "pissa"),
            f"unknown init_lora_weights {short(self.init_lora_weights)}; use True, False, 'gaussian' or 'pissa'",
        )
        _check_str_list(self.target_modules, "target_modules")
        _check_str_list(self.exclude_modules, "exclude_modules")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = (
                sorted(self.target_modules)
                if isinstance(self.target_modules, set)
                else list(self.target_modules)
            )
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = list(self.exclude_modules)
        if self.layers_to_transform is not None:
            layers = (
                [self.layers_to_transform]
                if isinstance(self.layers_to_transform, int)
                else self.layers_to_transform
            )
            _check(
                isinstance(layers, (list, tuple)) and all(isinstance(i, int) and i >= 0 for i in layers),
                f"layers_to_transform must be a non-negative int or a list of them, got {short(self.layers_to_transform)}",
            )
            _check(
                not isinstance(self.target_modules, str) or self.target_modules.lower() == "all-linear",
                "layers_to_transform cannot be used when target_modules is a regex string; put the layer index in the regex",
            )
        for key, value in self.rank_pattern.items():
            _check(
                isinstance(value, int) and value > 0,
                f"rank_pattern[{short(key)}] must be a positive integer, got {short(value)}",
            )
        for key, value in self.alpha_pattern.items():
            _check(
                isinstance(value, (int, float)) and 0 < value <= MAX_CONFIG_FLOAT,
                f"alpha_pattern[{short(key)}] must be positive and at most {MAX_CONFIG_FLOAT:g}, got {short(value)}",
            )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # PEFT's own keys with their neutral values, so that PEFT reads our file without surprises.
        out.update(
            {
                "lora_bias": False,
                "layer_replication": None,
                "loftq_config": {},
                "megatron_config": None,
                "megatron_core": "megatron.core",
                "use_qalora": False,
                "target_parameters": None,
                "trainable_token_indices": None,
            }
        )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = True) -> LoraConfig:
        data = dict(data)
        for key, neutral in _PEFT_LORA_INERT.items():
            if key not in data:
                continue
            value = data.pop(key)
            if neutral is not None and value not in neutral:
                raise ConfigError(
                    f"this adapter uses PEFT's {key}={short(value)}, which deltatune does not implement; "
                    "load it with peft instead"
                )
        return super().from_dict(data, strict=strict)  # type: ignore[return-value]


BOTTLENECK_STYLES = ("houlsby", "pfeiffer")
NON_LINEARITIES = ("relu", "gelu", "swish", "silu", "tanh")
BOTTLENECK_INITS = ("zeros", "bert")


@dataclass
class BottleneckConfig(_BaseConfig):
    """Bottleneck adapters `h + up(act(down(h)))` (Houlsby "AdapterH", Pfeiffer/Lin "AdapterL").

    Args:
        style: `"houlsby"` (after each block's attention output and FFN output projections) or
            `"pfeiffer"` (after the FFN output projection only).
        reduction_factor: bottleneck size is `hidden // reduction_factor`.
        non_linearity: `"relu"`, `"gelu"`, `"swish"` (= `"silu"`) or `"tanh"`.
        dropout: dropout inside the adapter, after the non-linearity.
        init: `"zeros"` (up-projection zero: the model starts unchanged) or `"bert"` (normal, std 0.02).
        attention_output_modules: names/suffixes (or a regex) of the attention output projections,
            for models deltatune does not know.
        ffn_output_modules: the same for the feed-forward output projections.
    """

    peft_type: ClassVar[str] = "BOTTLENECK"

    style: str = "houlsby"
    reduction_factor: int = 16
    non_linearity: str = "relu"
    dropout: float = 0.0
    init: str = "zeros"
    attention_output_modules: list[str] | str | None = None
    ffn_output_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.style in BOTTLENECK_STYLES, f"unknown style {short(self.style)}; use 'houlsby' or 'pfeiffer'"
        )
        _check(
            isinstance(self.reduction_factor, int)
            and not isinstance(self.reduction_factor, bool)
            and self.reduction_factor > 0,
            f"reduction_factor must be a positive integer, got {short(self.reduction_factor)}",
        )
        _check(
            self.non_linearity in NON_LINEARITIES,
            f"unknown non_linearity {short(self.non_linearity)}; use one of {', '.join(NON_LINEARITIES)}",
        )
        _check(
            isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1,
            f"dropout must be in [0, 1), got {short(self.dropout)}",
        )
        _check(self.init in BOTTLENECK_INITS, f"unknown init {short(self.init)}; use 'zeros' or 'bert'")
        _check_str_list(self.attention_output_modules, "attention_output_modules")
        _check_str_list(self.ffn_output_modules, "ffn_output_modules")


@dataclass
class TopLayersConfig(_BaseConfig):
    """Train only the last `num_layers` transformer blocks and the task head (`0`: the head only).

    Args:
        num_layers: how many of the top blocks train.
        blocks_module: the dotted name of the model's `ModuleList` of blocks, when it can't be found.
        train_final_norm: also train the norm layers after the last block (e.g. `final_layer_norm`).
    """

    peft_type: ClassVar[str] = "TOP_LAYERS"

    num_layers: int = 2
    blocks_module: str | None = None
    train_final_norm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            isinstance(self.num_layers, int)
            and not isinstance(self.num_layers, bool)
            and self.num_layers >= 0,
            f"num_layers must be a non-negative integer, got {short(self.num_layers)}",
        )


@dataclass
class FullFinetuneConfig(_BaseConfig):
    """Every weight trains (the article's baseline)."""

    peft_type: ClassVar[str] = "FULL"


@dataclass
class IA3Config(_BaseConfig):
    """(IA)^3 (Liu et al., 2022): learned vectors that rescale chosen layers' activations (PEFT's names).

    Args:
        target_modules: as `LoraConfig.target_modules`; `None` uses PEFT's per-architecture default
            (e.g. `key`, `value`, `output.dense` for BERT; `k_proj`, `v_proj`, `down_proj` for Llama).
        exclude_modules: modules never adapted (same syntax).
        feedforward_modules: targets whose *input* is rescaled (one value per input feature); the others get
            their output rescaled (one value per output feature, bias included). A list matches names ending with
            an entry (PEFT's rule), a string is a full-match regex; `None` uses PEFT's default for the architecture.
            Must be a subset of `target_modules` when both are lists.
        fan_in_fan_out: the layer stores its weight as `[in, out]` (GPT-2's `Conv1D`; set automatically).
        init_ia3_weights: `True` starts every vector at 1 (the model starts unchanged).
    """

    peft_type: ClassVar[str] = "IA3"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            _check_str_list(getattr(self, name), name)
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            _check(
                set(self.feedforward_modules) <= set(self.target_modules),
                f"feedforward_modules {self.feedforward_modules} must be a subset of target_modules "
                f"{self.target_modules}",
            )
        _check(
            isinstance(self.init_ia3_weights, bool),
            f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}",
        )


VERA_BIAS = ("none", "all", "vera_only")


@dataclass
class VeraConfig(_BaseConfig):
    """VeRA (Kopiczko et al., 2024): one pair of frozen random matrices shared by every adapted layer, and per
    layer two trained scaling vectors: `dW = diag(lambda_b) B diag(lambda_d) A` (PEFT's names and meanings).

    Args:
        r: the rank of the shared random matrices (larger than LoRA's: only `r + out` values train per layer).
        target_modules: as `LoraConfig.target_modules` (`None`: PEFT's per-architecture default, as LoRA's).
        projection_prng_key: seed of the shared matrices (Kaiming-uniform, drawn as PEFT draws them).
        save_projection: store the shared matrices in the file (`base_model.vera_A`/`vera_B`); otherwise they are
            drawn again from `projection_prng_key` when loading.
        vera_dropout: dropout on the input of the VeRA branch.
        d_initial: initial value of `lambda_d` (`lambda_b` starts at 0: the model starts unchanged).
        fan_in_fan_out: the layer stores its weight as `[in, out]` (GPT-2's `Conv1D`; set automatically).
        bias: `"none"`, `"all"` or `"vera_only"` (biases of adapted layers train).
        init_weights: `True` (the init above); `False` leaves `lambda_d` random and `lambda_b` at 1 (not a no-op).
        layers_to_transform, layers_pattern: as in `LoraConfig`.
    """

    peft_type: ClassVar[str] = "VERA"

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
            f"r must be a positive integer, got {self.r!r}",
        )
        _check(
            isinstance(self.vera_dropout, (int, float)) and 0 <= self.vera_dropout < 1,
            f"vera_dropout must be in [0, 1), got {self.vera_dropout!r}",
        )
        _check(self.bias in VERA_BIAS, f"unknown bias {self.bias!r}; use one of {', '.join(VERA_BIAS)}")
        _check(
            isinstance(self.projection_prng_key, int),
            f"projection_prng_key must be an integer, got {self.projection_prng_key!r}",
        )
        _check_str_list(self.target_modules, "target_modules")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        _check(
            not (self.layers_pattern and self.layers_to_transform is None),
            "layers_pattern needs layers_to_transform (the indices it refers to)",
        )


OFT_BIAS = ("none", "all", "oft_only")


@dataclass
class OFTConfig(_BaseConfig):
    """OFT (Qiu et al., 2023): an orthogonal, block-diagonal rotation of each adapted layer's input,
    `y = W (R x) + b` with `R = cayley(Q)` for skew-symmetric blocks `Q` (PEFT's names and meanings).

    Args:
        r: the number of blocks per layer (`in_features = r * oft_block_size`); give `r` or `oft_block_size`,
            not both (the other is 0).
        oft_block_size: the size of each square block (PEFT's default 32).
        module_dropout: multiplicative dropout: during training this fraction of the blocks is the identity.
        target_modules: as `LoraConfig.target_modules` (`None`: PEFT's per-architecture default, LoRA's);
            `nn.Linear` layers only (as in PEFT: GPT-2's `Conv1D` is not supported).
        exclude_modules: modules never adapted.
        bias: `"none"`, `"all"` or `"oft_only"` (biases of adapted layers train).
        init_weights: `True` (Q = 0: R is the identity, the model starts unchanged); `False`: Q ~ N(0, 0.1^2).
        coft: constrained OFT: Q is projected into a ball of radius `eps` before each use.
        eps: COFT's radius.
        block_share: one block shared by all blocks of a layer.
        use_cayley_neumann: approximate the Cayley transform `(I + Q)^-1 (I - Q)` with `num_cayley_neumann_terms`
            terms of its Neumann series (PEFT's default); `False`: the exact inverse.
        fan_in_fan_out, layers_to_transform, layers_pattern: as in `LoraConfig`.
    """

    peft_type: ClassVar[str] = "OFT"

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "oft_block_size", "num_cayley_neumann_terms"):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                f"{name} must be a non-negative integer, got {value!r}",
            )
        _check(
            (self.r != 0) != (self.oft_block_size != 0),
            f"give either r ({self.r}) or oft_block_size ({self.oft_block_size}), the other 0: r x oft_block_size is "
            "the layer's input size",
        )
        _check(
            isinstance(self.module_dropout, (int, float)) and 0 <= self.module_dropout < 1,
            f"module_dropout must be in [0, 1), got {self.module_dropout!r}",
        )
        _check(self.bias in OFT_BIAS, f"unknown bias {self.bias!r}; use one of {', '.join(OFT_BIAS)}")
        for name in ("target_modules", "exclude_modules"):
            _check_str_list(getattr(self, name), name)
            if isinstance(getattr(self, name), (set, tuple)):
                setattr(self, name, sorted(getattr(self, name)))
        _check(
            not (self.layers_pattern and self.layers_to_transform is None),
            "layers_pattern needs layers_to_transform (the indices it refers to)",
        )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # The Cayley-Neumann series is PEFT >= 0.18's (PEFT warns about older files without this key).
        out["peft_version"] = "0.18.0"
        return out


@dataclass
class _PromptLearningConfig(_BaseConfig):
    """Fields of PEFT's prompt-learning methods. The model-dependent ones (`token_dim`, `num_attention_heads`,
    `num_layers`, `num_transformer_submodules`) are filled from the model's config when left `None`, as PEFT does
    (for grouped-query attention, prefix tuning sizes its keys/values by `num_key_value_heads`)."""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "num_virtual_tokens",
            "token_dim",
            "num_transformer_submodules",
            "num_attention_heads",
            "num_layers",
        ):
            value = getattr(self, name)
            _check(
                value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0),
                f"{name} must be a positive integer, got {value!r}",
            )
        _check(
            self.num_virtual_tokens is not None, f"{type(self).__name__} needs num_virtual_tokens (e.g. 20)"
        )


PROMPT_TUNING_INIT = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass
class PromptTuningConfig(_PromptLearningConfig):
    """Prompt tuning (Lester et al., 2021): `num_virtual_tokens` trained embeddings prepended to the input
    embeddings; the model itself stays frozen (PEFT's names and meanings).

    Args:
        num_virtual_tokens: how many virtual tokens (the trained parameters are `num_virtual_tokens x token_dim`).
        prompt_tuning_init: `"RANDOM"` (PEFT's default: standard normal), `"SAMPLE_VOCAB"` (embeddings of random
            vocabulary tokens) or `"TEXT"` (the embeddings of `prompt_tuning_init_text`, repeated or cut to length).
        prompt_tuning_init_text: the text for `"TEXT"`.
        tokenizer_name_or_path: the tokenizer for `"TEXT"` (a local folder or hub name).
        tokenizer_kwargs: extra arguments for `AutoTokenizer.from_pretrained` (`"TEXT"` only).
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.prompt_tuning_init in PROMPT_TUNING_INIT,
            f"unknown prompt_tuning_init {self.prompt_tuning_init!r}; use one of {', '.join(PROMPT_TUNING_INIT)}",
        )
        if self.prompt_tuning_init == "TEXT":
            _check(
                bool(self.tokenizer_name_or_path), "prompt_tuning_init='TEXT' needs tokenizer_name_or_path"
            )
            _check(
                self.prompt_tuning_init_text is not None,
                "prompt_tuning_init='TEXT' needs prompt_tuning_init_text",
            )
        _check(
            not self.tokenizer_kwargs or self.prompt_tuning_init == "TEXT",
            "tokenizer_kwargs only apply with prompt_tuning_init='TEXT'",
        )


@dataclass
class PrefixTuningConfig(_PromptLearningConfig):
    """Prefix tuning (Li & Liang, 2021): per layer, `num_virtual_tokens` trained keys and values in front of the
    sequence's own; the model stays frozen (PEFT's names and meanings).

    Args:
        num_virtual_tokens: the prefix length.
        prefix_projection: train a `[num_virtual_tokens, token_dim]` table through a two-layer MLP (Linear, Tanh,
            Linear) instead of the keys/values directly; the file holds the MLP's output (loads for inference only).
        encoder_hidden_size: the MLP's hidden size (default: `token_dim`).
        init_weights: `None` (PEFT's default: standard normal) or `"zero"` (the prefix starts at zero).
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.init_weights in (None, "zero"),
            f"init_weights must be None or 'zero', got {self.init_weights!r}",
        )
        _check(
            isinstance(self.prefix_projection, bool),
            f"prefix_projection must be True or False, got {self.prefix_projection!r}",
        )
        _check(
            self.encoder_hidden_size is None
            or (isinstance(self.encoder_hidden_size, int) and not isinstance(self.encoder_hidden_size, bool)
                and self.encoder_hidden_size > 0),
            f"encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size!r}",
        )  # fmt: skip


AnyConfig = _BaseConfig


def config_from_dict(data: dict[str, Any], *, strict: bool = True) -> _BaseConfig:
    """Build the right config class for `data["peft_type"]` (any registered method); `data` is not changed."""
    from deltatune.methods import registry

    peft_type = data.get("peft_type")
    types = registry.config_types()
    if not isinstance(peft_type, str) or peft_type not in types:  # a list would be unhashable: a TypeError
        raise ConfigError(f"unsupported peft_type {short(peft_type)}; deltatune reads {', '.join(types)}")
    return types[peft_type].from_dict(data, strict=strict)


def load_config(directory: str | os.PathLike) -> _BaseConfig:
    """Read an adapter directory's `adapter_config.json`. Unknown keys load with a warning."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no {CONFIG_NAME} in {os.fspath(directory)!r}: is this an adapter directory?"
        )
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is skipped
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte offset {e.start}: {e.reason}); an adapter config is a JSON file"
        ) from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    except RecursionError as e:
        raise ConfigError(f"{path} nests too deeply to be an adapter config") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(data).__name__}")
    try:
        return config_from_dict(data, strict=False)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    except (TypeError, ValueError, AttributeError) as e:  # a value a field's own checks didn't expect
        raise ConfigError(f"{path}: {type(e).__name__}: {short(str(e), 300)}") from e


def method_config(
    method: str, task_type: str | None = None, **overrides: Any
) -> tuple[_BaseConfig, str | None]:
    """The config for a method name (`"lora"`, `"houlsby"`, ...) and the quantization its base needs.

    The method table is `deltatune.methods.registry`.

    Args:
        method: a registered method name.
        task_type: the PEFT task type (e.g. `"SEQ_CLS"`, `"CAUSAL_LM"`).
        **overrides: config fields that replace the method's defaults (a wrong name raises, suggesting one).
    """
    from deltatune.methods import registry

    try:
        spec = registry.get(method)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return spec.make_config(task_type, **overrides), spec.quantize


def __getattr__(name: str) -> Any:
    # `METHODS`: the registry's table as the plain dicts older callers read (`METHODS[name]["lr"]`).
    if name == "METHODS":
        from deltatune.methods import registry

        return {
            m.name: {"config": m.config, "args": dict(m.args), "quantize": m.quantize, "lr": m.lr}
            for m in registry.METHODS.values()
        }
    if name == "CONFIG_TYPES":
        from deltatune.methods import registry

        return registry.config_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
