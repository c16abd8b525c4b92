"""The training config: `TrainConfig`, loading it from YAML with `key=value` overrides, and validating it in
full before any model loads (every problem at once, unknown keys with the closest name)."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import yaml

from deltatune import dtypes, tracking
from deltatune.config import method_config
from deltatune.data import Fields, check_source
from deltatune.data.tokenize import label_name
from deltatune.embedded import DEFAULT_MODEL, check_model
from deltatune.errors import ConfigError, short
from deltatune.methods import registry

_MAX_PIPED_CONFIG = 1 << 20  # what is read from a config that isn't a regular file (a pipe, a device)
MAX_SEED = 2**32 - 1  # NumPy's legacy seeding (and so the data order) takes 0 .. 2**32 - 1
TASK_TYPES = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
DTYPES = {name: dtypes.torch_dtype(name) for name in dtypes.NAMES}  # the spellings train configs use
RUN_FILES = (
    "train_config.yaml",
    "metrics.jsonl",
    "summary.json",
    "label_map.json",
    "checkpoints",
    "adapter",
    "lr_search.json",
    "lr_search",
    "tracking.json",
)


@dataclass
class TrainConfig:
    """Everything `deltatune train` needs; every field can be set in the YAML or as `key=value`."""

    model: str = DEFAULT_MODEL
    """A local Hugging Face model folder, a hub name, or `embedded:minilm` (the embedded all-MiniLM-L6-v2)."""
    task: Literal["seq-cls", "causal-lm"] = "seq-cls"
    """`seq-cls` (sequence classification: a new head) or `causal-lm` (next-token prediction)."""
    method: str = "lora"
    """One of `full`, `top-layers`, `houlsby`, `pfeiffer`, `lora`, `dora`, `qlora-nf4`, `qlora-int8`."""
    method_args: dict[str, Any] = field(default_factory=dict)
    """Fields of the method's config that replace its defaults, e.g. `{r: 4, lora_alpha: 32}` for LoRA."""
    quantize: Literal["nf4", "int8"] | None = None
    """Quantize the frozen base (QLoRA); the `qlora-*` methods set this themselves."""
    base_dtype: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    """The dtype the frozen base is loaded in; trainable parameters always stay fp32. `auto`: the autocast
    dtype when `precision` is 16-bit (or `auto` resolved to bf16), else fp32."""

    data: str = "builtin:spam"
    """Training data: a JSONL/CSV/TSV/Parquet/text file, a `save_to_disk` folder, or `builtin:spam|quotes`."""
    eval_data: str | None = None
    """Held-out data (same formats). If unset and `eval_fraction` is 0, a built-in set uses its eval split."""
    eval_fraction: float = 0.0
    """Hold out this fraction of `data` for evaluation instead (chosen with `seed`)."""
    fields: Fields = field(default_factory=Fields)
    """Column names: `fields.text`, `fields.label`, `fields.prompt`, `fields.completion`, `fields.messages`."""
    labels: list[str | int] | None = None
    """Classification: the label set, class `i` being the `i`-th entry (e.g. `[0, 1, 2]` when a class has no
    example yet, or `[1, 2, 3, 4, 5]` for star ratings). Default: the labels seen in `data`, where integer
    labels must be exactly the ids 0..K-1 (anything else is refused before the model loads)."""
    max_length: int = 128
    """Examples are truncated to this many tokens; batches are padded to their longest example."""
    packing: bool = False
    """Causal LM: pack examples side by side into rows of `max_length` tokens; each example attends only to
    itself (position ids restart, a block-diagonal mask or flash-attention's variable-length path), so every
    example's loss is what it is alone, with almost no padding."""
    padding_free: bool = False
    """Causal LM: each batch of `batch_size` examples is one row with no padding at all (position ids restart
    per example, as transformers' `DataCollatorWithFlattening`); for models whose attention honours them."""
    group_by_length: bool = False
    """Batches of examples of similar length (random within length buckets, the same for a seed), so little
    padding; resuming continues exactly."""
    streaming: bool = False
    """Read, tokenize and batch the training data as it is used, never holding or caching it (a JSONL, text
    or Parquet file or a folder of shards, in file order); needs `max_steps`; `--resume` continues at the
    exact example. Classification needs `labels`."""
    num_proc: int = 1
    """Processes that tokenize the data (batched, through `datasets`); the result is cached on disk."""

    lr: float | Literal["auto"] | None = None
    """Peak learning rate; by default the method's own (`deltatune.methods.registry`). `auto`: a short search
    on the validation split (`lr_search_*`), around the method's default; the chosen rate and the curve go in
    the summary."""
    lr_search_steps: int = 0
    """`lr: auto`: optimizer steps per tried rate (0: one epoch of the training split, 10 to 30 steps)."""
    lr_search_trials: int = 5
    """`lr: auto`: at most this many rates: the default x 1/3, x 1, x 3, then further out by x 3 while the
    best is at an end of the grid."""
    lr_search_finalists: int = 2
    """`lr: auto`: this many rates train again, 3x as long, and the lowest validation loss there wins: the
    short trials' best and the rates just below it (short trials favour rates that learn fast); 0 or 1: the
    short trials decide."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: LoRA's B matrices (and 1-D parameters) learn at `lr * loraplus_lr_ratio` (PEFT's
    `create_loraplus_optimizer`); the method `lora-plus` sets 16."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (biases and norms get none)."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay of the learning rate after the warm-up, to zero at the last step."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimizer steps."""
    batch_size: int = 8
    """Examples per micro-batch on each process; global batch = batch_size x processes x grad_accum."""
    grad_accum: int = 1
    """Micro-batches accumulated into one optimizer step."""
    max_steps: int | None = None
    """Optimizer steps to train (at least 1); unset (`null`, the default): train for `epochs` instead."""
    epochs: float = 1.0
    """Passes over the training data, when `max_steps` is unset."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this; 0 turns clipping off."""
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    """Autocast: `bf16` (CPU and CUDA) or `fp16` with a grad scaler (CUDA only); `fp32` for none. `auto`:
    bf16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else
    fp32 (emulated bf16 on an AVX2 CPU is several times slower). The run folder's `train_config.yaml` records
    what `auto` became."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, more time."""
    loss: Literal["chunked", "standard"] = "chunked"
    """Causal LM: `chunked` fuses the output head and cross-entropy in chunks of tokens, so the full
    `[tokens, vocab]` logits are never held (same result, far less memory); `standard` is the model's own."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: `ddp` (replicate the model) or `fsdp` (shard it: for models that don't fit)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA when there is one."""

    val_fraction: float = 0.2
    """The validation split: this fraction of the training data (stratified by label for classification) is
    held out of training when something is chosen automatically (`lr: auto`, `early_stopping`), or when there
    is no eval data (then the evaluation is on it). 0: never hold out."""
    early_stopping: bool = False
    """Train up to `epochs` (or `max_steps`), evaluating on the validation split every epoch (or every
    `val_every` steps); stop after `patience` evaluations without improvement and restore the best weights."""
    patience: int = 3
    """Early stopping: evaluations without improvement of `val_metric` before stopping."""
    val_metric: Literal["loss", "accuracy"] = "loss"
    """Early stopping watches this on the validation split (`accuracy`: classification only; ties go to the
    lower loss)."""
    val_every: int = 0
    """Early stopping: evaluate on the validation split every N steps (0: at the end of every epoch)."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    eval_at_start: bool = True
    """Evaluate once before training too, to show what training gained."""
    eval_batch_size: int = 32
    """Examples per evaluation batch on each process."""
    log_every: int = 10
    """Append the train loss, lr and samples/s to `metrics.jsonl` every N steps."""
    save_every: int = 50
    """Save a checkpoint every N steps (0: only when interrupted); the final adapter is always saved."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    seed: int = 0
    """Seeds Python, NumPy and torch, the data order and the eval split: a run repeats exactly."""
    deterministic: bool = True
    """CUDA: use deterministic kernels only (a little slower); CPU kernels are deterministic anyway."""
    output_dir: str | None = None
    """The run folder; default `runs/<method>`."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""
    report_to: list[str] = field(default_factory=list)
    """Also log metrics, the config and the parameter counts to `tensorboard`, `mlflow` and/or `wandb`
    (rank 0 only; each an optional extra: `pip install 'deltatune[tensorboard]'`); see `deltatune.tracking`."""


# ---- loading and validating a config --------------------------------------------------------------------
def config_yaml(config: TrainConfig) -> str:
    """Every setting of a config as YAML, a file `--config` takes (`train --print-config`, a run's
    `train_config.yaml`)."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True)


def load_train_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply `key=value` overrides (dotted keys for sections) and validate it in full.

    Raises:
        ConfigError: listing every problem: unknown keys (with the closest name), wrong types, an unknown
            method or method argument, missing data files, settings that don't go together.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        if os.path.isdir(path):
            inside = os.path.join(path, "train_config.yaml")
            meant = f" (a run's settings: {short(inside)})" if os.path.isfile(inside) else ""
            raise ConfigError(f"--config {short(path)} is a folder; give a YAML file{meant} (see configs/)")
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {short(path)}")
        try:
            with open(path, encoding="utf-8-sig") as f:
                # Not only regular files: `--config <(...)` is a pipe, /dev/null empty; /dev/zero never ends.
                text = f.read() if os.path.isfile(path) else f.read(_MAX_PIPED_CONFIG + 1)
            if len(text) > _MAX_PIPED_CONFIG:
                raise ConfigError(
                    f"{short(path)} is not a regular file and gave more than {_MAX_PIPED_CONFIG} characters: "
                    "not a config; give a YAML file"
                )
            raw = _load_yaml(text)
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{path} is not UTF-8 text (byte offset {e.start}: {e.reason}); save it as UTF-8"
            ) from e
        except _DuplicateKey as e:
            raise ConfigError(f"{path}: {e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())[:400]}") from e
        if raw is None:  # an empty file (or only comments): likely the wrong file, not "all defaults"
            raise ConfigError(
                f"{short(path)} holds no settings (it is empty or only comments); give the config you meant, "
                "or leave out --config to train with the defaults"
            )
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of keys to values, not {type(raw).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {short(item)} is not key=value (e.g. lr=1e-4, method_args.r=4)")
        target = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {short(item)}: {short(part)} is not a section")
        if not parents and leaf in ("output_dir", "output", "out", "outdir") and not value.strip():
            # `output_dir=$OUT` with OUT unset: the run would go silently to runs/<method>
            raise ConfigError(
                f"override {short(item)}: the value is empty; give a folder, or leave output_dir out for the "
                "default runs/<method>"
            )
        try:
            target[leaf] = _load_yaml(value) if value.strip() else None
        except _DuplicateKey as e:
            raise ConfigError(f"override {short(item)}: {e}") from e
        except yaml.YAMLError as e:
            # `*`, `&`, `!`, `%`, `@`, a backquote, `|` or `>` at the start mean something else in YAML (a glob
            # `data=*.jsonl` reads as an alias): such a value is text only when quoted
            hint = (
                f"; quote it to give it as text: {leaf}='\"{value}\"'"
                if value.lstrip()[:1] in tuple("*&!%@`|>")
                else ""
            )
            raise ConfigError(
                f"override {short(item)}: the value is not valid YAML ({' '.join(str(e).split())[:200]}){hint}"
            ) from e
    return config_from_dict(raw)


class _DuplicateKey(ConfigError):
    """A mapping gives a key twice; the caller says where (the file or the override)."""


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]  # libyaml: ~20x faster
    """A safe loader that refuses a key given twice in one mapping (YAML keeps the last one, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: construct_mapping refuses it with its own message
                continue
            if first is not None:
                raise _DuplicateKey(
                    f"key {short(key, 60)} is given twice (line {first}{'' if first == line else f' and line {line}'}); "
                    "YAML would keep only "
                    "the last: give each key once"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    """Safe YAML without anchors and aliases (a config has no need of them, and a few hundred bytes of nested
    aliases can stand for billions of values) and without a key given twice in a mapping."""
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(
                f"YAML aliases (*{str(event.anchor)[:40]}) are not allowed in a train config (line "
                f"{event.start_mark.line + 1}); write the value out"
            )
    return yaml.load(text, Loader=_Loader)  # noqa: S506  (a safe loader)


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """A validated `TrainConfig` from a plain dict (as read from YAML)."""
    errors: list[str] = []
    if isinstance(raw, dict):
        raw = dict(raw)
        for key in ("precision", "base_dtype"):  # fp32|bf16|fp16, and their aliases float32|bfloat16|float16
            if isinstance(raw.get(key), str) and (name := dtypes.canonical(raw[key])):
                raw[key] = name
    values = _coerce_dataclass(TrainConfig, raw, "", errors)
    config = TrainConfig(**values)  # wrongly typed values were left out: the rest is checked on its own
    errors += validate(config)
    if errors:
        raise ConfigError("invalid training config:\n  " + "\n  ".join(errors))
    return config


# Names that other tools (transformers' Trainer, PEFT, other fine-tuning scripts) use for a key of ours.
KEY_ALIASES = {
    "learning_rate": "lr",
    "learningrate": "lr",
    "rate": "lr",
    "epoch": "epochs",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "n_epochs": "epochs",
    "batch": "batch_size",
    "batchsize": "batch_size",
    "bs": "batch_size",
    "train_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size",
    "eval_batch": "eval_batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "accumulation_steps": "grad_accum",
    "steps": "max_steps",
    "num_steps": "max_steps",
    "train_steps": "max_steps",
    "warmup": "warmup_steps",
    "lr_scheduler_type": "schedule",
    "scheduler": "schedule",
    "model_name_or_path": "model",
    "model_name": "model",
    "base_model": "model",
    "base": "model",
    "dataset": "data",
    "train_data": "data",
    "train_file": "data",
    "eval_file": "eval_data",
    "validation_file": "eval_data",
    "valid_data": "eval_data",
    "validation_data": "eval_data",
    "output": "output_dir",
    "out": "output_dir",
    "outdir": "output_dir",
    "max_seq_length": "max_length",
    "seq_len": "max_length",
    "max_len": "max_length",
    "dtype": "precision",
    "fp16": "precision",
    "bf16": "precision",
    "mixed_precision": "precision",
    "torch_dtype": "base_dtype",
    "r": "method_args.r",
    "rank": "method_args.r",
    "lora_r": "method_args.r",
    "lora_rank": "method_args.r",
    "alpha": "method_args.lora_alpha",
    "lora_alpha": "method_args.lora_alpha",
    "lora_dropout": "method_args.lora_dropout",
    "target_modules": "method_args.target_modules",
    "reduction_factor": "method_args.reduction_factor",
    "num_layers": "method_args.num_layers",
    "random_seed": "seed",
    "max_grad": "max_grad_norm",
    "clip": "max_grad_norm",
    "grad_clip": "max_grad_norm",
    "gradient_clipping": "max_grad_norm",
    "checkpoint_every": "save_every",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "logging_steps": "log_every",
    "label": "fields.label",
    "text": "fields.text",
}


def _coerce_dataclass(cls: type, raw: Any, prefix: str, errors: list[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.')}: expected a section of key: value pairs, got {short(raw)}")
        return {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in raw.items():
        if key not in names:
            alias = KEY_ALIASES.get(str(key).lower().replace("-", "_")) if not prefix else None
            hint = [alias] if alias else difflib.get_close_matches(str(key)[:100], names, n=1)
            suggestion = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            errors.append(f"unknown key '{prefix}{str(key)[:60]}'{suggestion}")
            continue
        before = len(errors)
        coerced = _coerce(value, hints[key], f"{prefix}{key}", errors)
        if len(errors) == before:
            out[key] = coerced
    return out


def _coerce(value: Any, hint: Any, key: str, errors: list[str]) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return hint(**_coerce_dataclass(hint, value, f"{key}.", errors))
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key, errors)
        tries = []
        for alternative in inner:  # the first alternative that takes the value as it is
            trial: list[str] = []
            coerced = _coerce(value, alternative, key, trial)
            if not trial:
                return coerced
            tries.append(trial[0])
        errors.append(f"{key}: " + ", or ".join(t.removeprefix(f"{key}: ") for t in tries))  # the key once
        return value
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            errors.append(f"{key}: {short(value)} is not one of {choices}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping (key: value pairs), got {short(value)}")
        return value
    if hint is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)  # YAML 1.1 reads `1e-4` as a string
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        errors.append(f"{key}: expected {hint.__name__}, got {type(value).__name__} {short(value)}")
    return value


def validate(config: TrainConfig) -> list[str]:
    """Every problem with a type-correct config (empty if it is good); reads no model and no data."""
    errors = []
    if config.method not in registry.METHODS:
        hint = difflib.get_close_matches(str(config.method)[:100], registry.names(), n=1)
        errors.append(
            f"method: unknown {short(config.method)}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
            f"use one of {', '.join(registry.names())}"
        )
    else:
        if config.loraplus_lr_ratio is not None and (
            registry.get(config.method).peft_type != "LORA" or not config.loraplus_lr_ratio > 0
        ):
            errors.append(
                f"loraplus_lr_ratio: LoRA+ needs a LoRA method (lora, dora, qlora-*, lora-plus) and a positive ratio; "
                f"got method {config.method!r}, ratio {config.loraplus_lr_ratio!r}"
            )
        try:
            _, quantize = method_config(config.method, TASK_TYPES[config.task], **config.method_args)
        except (ConfigError, TypeError) as e:
            errors.append(f"method_args: {e}")
            quantize = None
        quantize = config.quantize or quantize
        if quantize and importlib.util.find_spec("deltatune.methods.quant") is None:
            errors.append(
                f"quantize={quantize!r} needs deltatune.methods.quant, which this install does not have"
            )
        elif quantize == "nf4" and importlib.util.find_spec("bitsandbytes") is None:  # before any model loads
            from deltatune.methods.quant import INSTALL_HINT

            errors.append(
                f"{'method ' + config.method if config.quantize is None else 'quantize: nf4'}: the NF4 base needs "
                f"bitsandbytes, which is not installed; install it with: {INSTALL_HINT}; or use qlora-int8, "
                "whose int8 base needs nothing more"
            )
    if problem := check_model(config.model, hub=False):  # a folder; a hub name is looked for by `run`
        errors.append(f"model: {problem}")
    for key in ("data", "eval_data"):
        source = getattr(config, key)
        if source is not None and (problem := check_source(source)):
            errors.append(f"{key}: {problem}")
    positive = (
        "max_length",
        "num_proc",
        "batch_size",
        "grad_accum",
        "eval_batch_size",
        "log_every",
        "keep_checkpoints",
    )
    errors += [
        f"{k}: must be at least 1, got {getattr(config, k)}" for k in positive if getattr(config, k) < 1
    ]
    non_negative = ("warmup_steps", "eval_every", "save_every", "weight_decay", "max_grad_norm")
    errors += [
        f"{k}: must not be negative, got {getattr(config, k)}" for k in non_negative if getattr(config, k) < 0
    ]
    if not 0 <= config.seed <= MAX_SEED:
        errors.append(f"seed: must be an integer from 0 to {MAX_SEED} (2**32 - 1), got {short(config.seed)}")
    if config.max_steps is not None and config.max_steps < 1:
        errors.append(
            f"max_steps: must be at least 1, got {config.max_steps}; leave it unset (null) to train for `epochs`"
        )
    if config.max_steps is None and not config.epochs > 0:
        errors.append(f"epochs: must be positive when max_steps is unset, got {config.epochs}")
    if isinstance(config.lr, str) and config.lr != "auto":
        errors.append(f"lr: a positive number or 'auto', got {config.lr!r}")
    elif isinstance(config.lr, (int, float)) and not 0 < config.lr <= 10:
        errors.append(
            f"lr: must be positive and at most 10 (AdamW's are usually 1e-5 to 1e-2), got {config.lr}"
        )
    for key in ("weight_decay", "max_grad_norm", "epochs", "eval_fraction"):
        if not math.isfinite(getattr(config, key)):
            errors.append(f"{key}: must be a finite number, got {getattr(config, key)}")
    out = output_dir(config)
    if isinstance(config.output_dir, str) and not config.output_dir.strip():
        errors.append(
            f"output_dir: {config.output_dir!r} names no folder; give one, or leave output_dir out for the "
            "default runs/<method>"
        )
    elif "\0" in out:  # os.makedirs: ValueError: embedded null byte
        errors.append(
            f"output_dir: {short(out)} holds a NUL character, which no path can; set another output_dir"
        )
    elif os.path.exists(out) and not os.path.isdir(out):
        errors.append(f"output_dir: {short(out)} is a file, not a folder; set another output_dir")
    elif problem := _uncreatable(out):
        errors.append(f"output_dir: {short(out)} can't be created: {problem}; set another output_dir")
    if not 0 <= config.val_fraction < 1:
        errors.append(f"val_fraction: must be in [0, 1), got {config.val_fraction}")
    automatic = [
        k for k, on in (("lr: auto", config.lr == "auto"), ("early_stopping", config.early_stopping)) if on
    ]
    if automatic and not config.val_fraction:
        errors.append(
            f"{' and '.join(automatic)} choose on the validation split, but val_fraction is 0; set val_fraction "
            "(e.g. 0.2) or a fixed lr and max_steps"
        )
    if automatic and config.eval_data is not None and same_source(config.data, config.eval_data):
        errors.append(
            f"{' and '.join(automatic)} choose on a validation split that holds no eval example, but eval_data "
            f"{short(config.eval_data)} is the training data itself, so every example is one; give held-out "
            "eval_data, or leave it out (the validation split is then evaluated)"
        )
    if automatic and config.streaming:
        errors.append(
            f"{' and '.join(automatic)} need a validation split, which streamed data can't give; "
            "give a fixed lr and max_steps"
        )
    if config.val_metric == "accuracy" and config.task != "seq-cls":
        errors.append("val_metric: accuracy is for classification (task seq-cls); use loss")
    errors += [
        f"{k}: must be at least 1, got {getattr(config, k)}"
        for k in ("patience", "lr_search_trials")
        if getattr(config, k) < 1
    ]
    errors += [
        f"{k}: must not be negative, got {getattr(config, k)}"
        for k in ("val_every", "lr_search_steps", "lr_search_finalists")
        if getattr(config, k) < 0
    ]
    if not 0 <= config.eval_fraction < 1:
        errors.append(f"eval_fraction: must be in [0, 1), got {config.eval_fraction}")
    if config.eval_fraction and config.eval_data is not None:
        errors.append("eval_data and eval_fraction: set one of them, not both")
    errors += _check_labels(config)
    errors += tracking.check(config.report_to)
    if config.streaming:
        if not config.max_steps:
            errors.append("streaming: set max_steps (a stream's length isn't known before it is read)")
        if config.eval_fraction:
            errors.append("streaming: eval_fraction can't hold rows out of a stream; give eval_data instead")
        if config.group_by_length:
            errors.append(
                "streaming: group_by_length needs every length up front; use padding_free or packing"
            )
        if config.task == "seq-cls" and config.labels is None:
            errors.append("streaming: classification needs the label set up front: set labels: [...]")
    if config.packing and config.task != "causal-lm":
        errors.append("packing: only for task causal-lm")
    if config.padding_free and config.task != "causal-lm":
        errors.append("padding_free: only for task causal-lm")
    if config.packing and (config.padding_free or config.group_by_length):
        errors.append(
            "packing: already leaves no padding; don't combine it with padding_free or group_by_length"
        )
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        errors.append("device: cuda was asked for, but torch sees no CUDA device")
    if config.precision == "fp16" and not cuda:
        errors.append("precision: fp16 needs a CUDA device (its grad scaler is CUDA-only); use bf16 on CPU")
    if config.base_dtype not in ("fp32", "auto") and config.precision == "fp32":
        errors.append(
            f"base_dtype {config.base_dtype} needs autocast so that the fp32 trainable weights meet the "
            f"{config.base_dtype} base: set precision=bf16 (or fp16 on CUDA)"
        )
    return errors


def same_source(data: str, eval_data: str) -> bool:
    """Whether `eval_data` names the same data as `data` (the same file or folder, or built-in split)."""
    if data.startswith("builtin:") or eval_data.startswith("builtin:"):

        def split(spec: str) -> str:  # builtin:spam is builtin:spam:train
            return f"{spec}:train" if spec.count(":") == 1 else spec

        return split(data) == split(eval_data)
    try:
        return os.path.samefile(data, eval_data)
    except (OSError, ValueError):  # not there (said elsewhere), a NUL in the name
        return False


def _uncreatable(folder: str) -> str | None:
    """Why `folder` (not there yet) can't be made, as far as can be told without making it: the nearest
    existing folder above it is a file, or can't be written in; None otherwise (`run` makes it, and says
    what went wrong if that fails anyway)."""
    if os.path.exists(folder):
        return None
    above = os.path.dirname(os.path.abspath(folder))
    while not os.path.exists(above) and os.path.dirname(above) != above:
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        return f"{short(above)} is a file, not a folder"
    if not os.access(above, os.W_OK | os.X_OK):
        return f"{short(above)} can't be written in"
    return None


def _check_labels(config: TrainConfig) -> list[str]:
    labels = config.labels
    if labels is None:
        return []
    if config.task != "seq-cls":
        return ["labels: only for task seq-cls"]
    if not isinstance(labels, list) or not all(
        isinstance(v, (str, int)) and not isinstance(v, bool) for v in labels
    ):
        return [f"labels: expected a list of label names or integers, got {str(labels)[:200]!r}"]
    names = [label_name(v) for v in labels]  # as the data's labels are read: "00", "0" and 0 are class 0
    if len(names) < 2:
        return [f"labels: a classifier needs two or more labels, got {names}"]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        spelled = [short(v, 40) for v, n in zip(labels, names) if n in twice]
        return [
            f"labels: each label once, but {', '.join(twice)[:200]} appear more than once"
            + (
                f" ({', '.join(spelled)[:200]}: a string of digits is its number)"
                if len(set(spelled)) > 1
                else ""
            )
        ]
    return []


def resolve_dtypes(config: TrainConfig, device: Any) -> TrainConfig:
    """`config` with `precision`/`base_dtype` `auto` replaced by what is fastest on `device` (see the fields)."""
    if "auto" not in (config.precision, config.base_dtype):
        return config
    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    else:
        native = kind == "cpu" and dtypes.cpu_has_native_bf16()
    precision = ("bf16" if native else "fp32") if config.precision == "auto" else config.precision
    base = config.base_dtype
    if base == "auto":
        base = precision if precision in ("bf16", "fp16") else "fp32"
    return dataclasses.replace(config, precision=precision, base_dtype=base)


def needs_validation(config: TrainConfig, has_eval: bool) -> bool:
    """Whether a run holds out a validation split: for an automatic choice, or to evaluate at all."""
    automatic = config.lr == "auto" or config.early_stopping
    if not config.val_fraction or (config.streaming and not automatic):
        return False  # a streamed set can't be split; validate() refuses automatic choices on one
    return automatic or not has_eval


def why_no_evaluation(config: TrainConfig) -> str:
    """Why a run without eval data evaluates nothing (`needs_validation` said no)."""
    if config.streaming and config.val_fraction:
        return (
            "no eval data, and streamed data can't be split for a validation set; give eval_data to evaluate"
        )
    return "no eval data and val_fraction=0"


def output_dir(config: TrainConfig) -> str:
    return config.output_dir or os.path.join("runs", config.method)
