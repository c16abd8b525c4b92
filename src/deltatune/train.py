"""`deltatune train`: a YAML config -> a model with one method -> one plain training loop -> an adapter.

    deltatune train --config configs/lora.yaml [key=value ...] [--resume | --overwrite]
    torchrun --nproc_per_node=2 -m deltatune train --config configs/lora.yaml

The config is checked in full (keys, types, method, data files) before any model loads. `run(config)` is
the Python entry; `train(model, ...)` is the loop, which gets a ready model and knows no method.

A run folder holds `train_config.yaml`, `label_map.json` (classification), `metrics.jsonl`,
`checkpoints/step-N/` (the last `keep_checkpoints`), `adapter/` (with the tokenizer) and `summary.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib.util
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import yaml
from torch import nn

from deltatune import checkpoint
from deltatune.config import METHODS, ConfigError, method_config
from deltatune.data import (
    IGNORE_INDEX,
    Datasets,
    Fields,
    batches_per_epoch,
    check_source,
    collate,
    epoch_batches,
    eval_batches,
    load_datasets,
)
from deltatune.embedded import DEFAULT_MODEL, resolve_model
from deltatune.losses import causal_lm_loss

logger = logging.getLogger(__name__)

TASK_TYPES = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RUN_FILES = ("train_config.yaml", "metrics.jsonl", "summary.json", "label_map.json", "checkpoints", "adapter")


class TrainingError(RuntimeError):
    """Training can't go on (a NaN loss, a checkpoint that doesn't fit); the message says what to do."""


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
    base_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """The dtype the frozen base is loaded in; trainable parameters always stay fp32."""

    data: str = "builtin:spam"
    """Training data: a JSONL/CSV/TSV/Parquet/text file, a `save_to_disk` folder, or `builtin:spam|quotes`."""
    eval_data: str | None = None
    """Held-out data (same formats). If unset and `eval_fraction` is 0, a built-in set uses its eval split."""
    eval_fraction: float = 0.0
    """Hold out this fraction of `data` for evaluation instead (chosen with `seed`)."""
    fields: Fields = field(default_factory=Fields)
    """Column names: `fields.text`, `fields.label`, `fields.prompt`, `fields.completion`, `fields.messages`."""
    max_length: int = 128
    """Examples are truncated to this many tokens; batches are padded to their longest example."""
    packing: bool = False
    """Causal LM: concatenate examples into full `max_length` blocks (no padding)."""

    lr: float | None = None
    """Peak learning rate; by default the method's own (`deltatune.config.METHODS`)."""
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
    max_steps: int = 0
    """Optimizer steps to train; 0: train for `epochs` instead."""
    epochs: float = 1.0
    """Passes over the training data, when `max_steps` is 0."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this; 0 turns clipping off."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast: `bf16` (CPU and CUDA) or `fp16` with a grad scaler (CUDA only); `fp32` for none."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, more time."""
    loss: Literal["chunked", "standard"] = "chunked"
    """Causal LM: `chunked` fuses the output head and cross-entropy in chunks of tokens, so the full
    `[tokens, vocab]` logits are never held (same result, far less memory); `standard` is the model's own."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: `ddp` (replicate the model) or `fsdp` (shard it: for models that don't fit)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA when there is one."""

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


# ---- loading and validating a config --------------------------------------------------------------------
def load_train_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply `key=value` overrides (dotted keys for sections) and validate it in full.

    Raises:
        ConfigError: listing every problem: unknown keys (with the closest name), wrong types, an unknown
            method or method argument, missing data files, settings that don't go together.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path!r}")
        with open(path, encoding="utf-8") as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of keys to values, not {type(raw).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. lr=1e-4, method_args.r=4)")
        target = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        target[leaf] = yaml.safe_load(value) if value.strip() else None
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """A validated `TrainConfig` from a plain dict (as read from YAML)."""
    errors: list[str] = []
    values = _coerce_dataclass(TrainConfig, raw, "", errors)
    config = TrainConfig(**values)  # wrongly typed values were left out: the rest is checked on its own
    errors += validate(config)
    if errors:
        raise ConfigError("invalid training config:\n  " + "\n  ".join(errors))
    return config


def _coerce_dataclass(cls: type, raw: Any, prefix: str, errors: list[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.')}: expected a section of key: value pairs, got {raw!r}")
        return {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in raw.items():
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            suggestion = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            errors.append(f"unknown key '{prefix}{key}'{suggestion}")
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
        return _coerce(value, inner[0] if len(inner) == 1 else hint, key, errors)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            errors.append(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping (key: value pairs), got {value!r}")
        return value
    if hint is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)  # YAML 1.1 reads `1e-4` as a string
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        errors.append(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def validate(config: TrainConfig) -> list[str]:
    """Every problem with a type-correct config (empty if it is good); reads no model and no data."""
    errors = []
    if config.method not in METHODS:
        hint = difflib.get_close_matches(config.method, METHODS, n=1)
        errors.append(
            f"method: unknown {config.method!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
            f"use one of {', '.join(METHODS)}"
        )
    else:
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
    model = resolve_model(config.model)
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        errors.append(f"model: {model!r} has no config.json; is it a Hugging Face model folder?")
    elif os.path.isfile(model):
        errors.append(f"model: {model!r} is a file; give the model's folder")
    elif not os.path.isdir(model) and model.startswith((".", "/", "~")):
        errors.append(f"model: folder not found: {model!r}")
    for key in ("data", "eval_data"):
        source = getattr(config, key)
        if source is not None and (problem := check_source(source)):
            errors.append(f"{key}: {problem}")
    positive = ("max_length", "batch_size", "grad_accum", "eval_batch_size", "log_every", "keep_checkpoints")
    errors += [
        f"{k}: must be at least 1, got {getattr(config, k)}" for k in positive if getattr(config, k) < 1
    ]
    non_negative = ("max_steps", "warmup_steps", "eval_every", "save_every", "weight_decay", "max_grad_norm")
    errors += [
        f"{k}: must not be negative, got {getattr(config, k)}" for k in non_negative if getattr(config, k) < 0
    ]
    if config.max_steps == 0 and not config.epochs > 0:
        errors.append(f"epochs: must be positive when max_steps is 0, got {config.epochs}")
    if config.lr is not None and not config.lr > 0:
        errors.append(f"lr: must be positive, got {config.lr}")
    if not 0 <= config.eval_fraction < 1:
        errors.append(f"eval_fraction: must be in [0, 1), got {config.eval_fraction}")
    if config.eval_fraction and config.eval_data is not None:
        errors.append("eval_data and eval_fraction: set one of them, not both")
    if config.packing and config.task != "causal-lm":
        errors.append("packing: only for task causal-lm")
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        errors.append("device: cuda was asked for, but torch sees no CUDA device")
    if config.precision == "fp16" and not cuda:
        errors.append("precision: fp16 needs a CUDA device (its grad scaler is CUDA-only); use bf16 on CPU")
    if config.base_dtype != "fp32" and config.precision == "fp32":
        errors.append(
            f"base_dtype {config.base_dtype} needs autocast so that the fp32 trainable weights meet the "
            f"{config.base_dtype} base: set precision=bf16 (or fp16 on CUDA)"
        )
    return errors


def output_dir(config: TrainConfig) -> str:
    return config.output_dir or os.path.join("runs", config.method)


# ---- distributed context ---------------------------------------------------------------------------------
@dataclass
class Context:
    """Where this process trains: its rank among `world` processes, its device, and the stop flag."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stop_signal: int | None = None
    """Set by SIGINT/SIGTERM: the loop finishes its step, saves a checkpoint and returns."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def any(self, *flags: bool) -> list[bool]:
        """Each flag, true if it is true on any rank (so every rank takes the same branch)."""
        if self.world == 1:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]


def _init_context(config: TrainConfig) -> Context:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return Context(rank=rank, world=world, device=device)


@contextlib.contextmanager
def _catch_signals(ctx: Context) -> Iterator[None]:
    """First SIGINT/SIGTERM: stop after this step and save; a second SIGINT aborts at once."""

    def handler(signum: int, _frame: Any) -> None:
        if ctx.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        ctx.stop_signal = signum
        if ctx.main:
            logger.warning(
                "%s: stopping after this step and saving a checkpoint (Ctrl-C again aborts at once)",
                signal.Signals(signum).name,
            )

    if threading.current_thread() is not threading.main_thread():  # signals can only be caught there
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (all devices); optionally insist on deterministic CUDA kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic and torch.cuda.is_available():
        # cuBLAS reads this when it starts, i.e. at the first matmul, which comes later.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


# ---- the Python entry ------------------------------------------------------------------------------------
def run(
    config: TrainConfig, *, resume: bool = False, overwrite: bool = False, wrap: Callable | None = None
) -> dict[str, Any]:
    """Train as `config` says and return the summary (also written to `<output_dir>/summary.json`).

    Args:
        config: a validated config (`load_train_config` or `config_from_dict`).
        resume: continue from the newest complete checkpoint in the output folder.
        overwrite: replace a run that is already in the output folder.
        wrap: `wrap(model, peft_config) -> model` instead of `get_peft_model` (compare's PEFT peer row).
    """
    errors = validate(config)
    if errors:
        raise ConfigError("invalid training config:\n  " + "\n  ".join(errors))
    ctx = _init_context(config)
    try:
        out = output_dir(config)
        resume_dir = _prepare_output(out, config, ctx, resume=resume, overwrite=overwrite)
        seed_everything(config.seed, config.deterministic)
        tokenizer = _load_tokenizer(config)
        data = load_datasets(
            config.data,
            tokenizer,
            task=config.task,
            eval_data=config.eval_data,
            eval_fraction=config.eval_fraction,
            fields=config.fields,
            max_length=config.max_length,
            packing=config.packing,
            seed=config.seed,
        )
        if data.label_map is not None:
            _keep_label_map(os.path.join(out, "label_map.json"), data.label_map, ctx, resume_dir)
        peft_model = build_model(config, data.label_map, tokenizer, ctx.device, wrap=wrap)
        model = _distribute(peft_model, config, ctx)
        with _catch_signals(ctx):
            summary = train(
                model,
                data,
                config,
                out=out,
                ctx=ctx,
                pad_token_id=tokenizer.pad_token_id,
                resume_dir=resume_dir,
            )
        if summary["status"] == "completed":
            _save_final(model, peft_model, tokenizer, data, out, ctx)
            summary["adapter_dir"] = os.path.join(out, "adapter")
        summary.update(
            {"method": config.method, "model": config.model, "task": config.task, "data": config.data}
        )
        if ctx.main:
            checkpoint.atomic_write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
        return summary
    finally:
        if ctx.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _prepare_output(
    out: str, config: TrainConfig, ctx: Context, *, resume: bool, overwrite: bool
) -> str | None:
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pick one")
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    resume_dir = None
    if resume:
        resume_dir = latest_checkpoint(out)
        if resume_dir is None:
            raise TrainingError(
                f"nothing to resume: no complete checkpoint in {os.path.join(out, 'checkpoints')!r}"
            )
    elif found and not overwrite:
        raise ConfigError(
            f"output_dir {out!r} already holds a run ({', '.join(found)}); continue it with --resume, "
            "replace it with --overwrite, or set another output_dir"
        )
    ctx.barrier()
    if ctx.main:
        if overwrite:
            for name in found:
                path = os.path.join(out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        os.makedirs(out, exist_ok=True)
        text = yaml.safe_dump(
            dataclasses.asdict(dataclasses.replace(config, output_dir=out)), sort_keys=False
        )
        checkpoint.atomic_write_text(os.path.join(out, "train_config.yaml"), text)
    ctx.barrier()
    return resume_dir


def _keep_label_map(path: str, label_map: dict[str, int], ctx: Context, resume_dir: str | None) -> None:
    if resume_dir and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved != label_map:
            raise ConfigError(
                f"the labels of this data ({', '.join(label_map)}) differ from the run being resumed "
                f"({', '.join(saved)}, {path}); resume with the same data"
            )
    if ctx.main:
        checkpoint.atomic_write_text(path, json.dumps(label_map, indent=2))


def _load_tokenizer(config: TrainConfig) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.model))
    except OSError as e:
        raise ConfigError(_cannot_load(config.model, e)) from e
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"the tokenizer of {config.model!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(
    config: TrainConfig,
    label_map: dict[str, int] | None,
    tokenizer: Any,
    device: torch.device,
    wrap: Callable | None = None,
) -> nn.Module:
    """Load the base model, quantize it if asked, and put the method into it with `get_peft_model`."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from deltatune.model import get_peft_model

    kwargs: dict[str, Any] = {"dtype": DTYPES[config.base_dtype]}
    if config.task == "seq-cls":
        assert label_map is not None
        kwargs |= {"num_labels": len(label_map), "label2id": label_map}
        kwargs["id2label"] = {i: n for n, i in label_map.items()}
    auto = AutoModelForSequenceClassification if config.task == "seq-cls" else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(resolve_model(config.model), **kwargs)
    except OSError as e:
        raise ConfigError(_cannot_load(config.model, e)) from e
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    peft_config, quantize = method_config(config.method, TASK_TYPES[config.task], **config.method_args)
    quantize = config.quantize or quantize
    if quantize:
        from deltatune.methods.quant import quantize_model

        quantize_model(model, quantize, compute_dtype=DTYPES[config.base_dtype])
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    peft = (wrap or get_peft_model)(model, peft_config)
    for p in peft.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return peft.to(device)


def _cannot_load(model: str, error: Exception) -> str:
    return (
        f"could not load the model {model!r}: {error}\n"
        "Give a local Hugging Face model folder (with config.json and the tokenizer files), "
        "or a hub name while the hub is reachable."
    )


def _distribute(model: nn.Module, config: TrainConfig, ctx: Context) -> nn.Module:
    if ctx.world == 1:
        return model
    if config.strategy == "ddp":
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # find_unused_parameters: a method may train a parameter that some batch doesn't reach.
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)
    from torch.distributed.fsdp import fully_shard

    blocks = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len, default=[])
    for block in blocks:
        fully_shard(block)
    return fully_shard(model)


def _save_final(
    model: nn.Module, peft_model: nn.Module, tokenizer: Any, data: Datasets, out: str, ctx: Context
) -> None:
    directory = os.path.join(out, "adapter")
    if isinstance(model, nn.parallel.DistributedDataParallel) or ctx.world == 1:
        if ctx.main:
            peft_model.save_pretrained(directory)
    else:  # FSDP: gather the trained tensors, then write them under the adapter's keys
        full = _trainable_state(model, ctx)
        if ctx.main:
            names = {id(p): n for n, p in peft_model.named_parameters()}
            tensors = {k: full[names[id(p)]] for k, p in peft_model.adapter_state_dict().items()}
            config = peft_model.peft_config[peft_model.active_adapter].to_dict() | {"inference_mode": True}
            checkpoint.save_adapter(directory, tensors, config)
    if ctx.main:
        tokenizer.save_pretrained(directory)
        if data.label_map is not None:
            checkpoint.atomic_write_text(
                os.path.join(directory, "label_map.json"), json.dumps(data.label_map, indent=2)
            )
    ctx.barrier()


# ---- the loop --------------------------------------------------------------------------------------------
def train(
    model: nn.Module,
    data: Datasets,
    config: TrainConfig,
    *,
    out: str,
    ctx: Context | None = None,
    pad_token_id: int = 0,
    resume_dir: str | None = None,
) -> dict[str, Any]:
    """Train `model` (ready: its trainable parameters have `requires_grad`) and return the summary.

    Checkpoints go to `<out>/checkpoints/step-N/`, metrics to `<out>/metrics.jsonl`. Stops early (status
    `interrupted`, after saving a checkpoint) when `ctx.stop_signal` is set.

    Raises:
        TrainingError: the loss became NaN or infinite (nothing is saved; earlier checkpoints stay intact).
    """
    from tqdm.auto import tqdm

    cfg, ctx = config, ctx or Context()
    dev, classify = ctx.device, data.label_map is not None
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    lr = cfg.lr if cfg.lr is not None else METHODS[cfg.method]["lr"]
    decay, no_decay = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    per_epoch = batches_per_epoch(len(data.train), cfg.batch_size, ctx.world)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(cfg.schedule, cfg.warmup_steps, total)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
    autocast = torch.autocast(dev.type, dtype=DTYPES[cfg.precision], enabled=cfg.precision != "fp32")
    state = {"step": 0, "epoch": 0, "batch": 0, "loss": None, "loss_ema": None}
    state |= {"world": ctx.world, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum}
    if resume_dir:
        state = load_checkpoint(resume_dir, model, optimizer, scheduler, scaler, ctx, state)
        logger.info("resumed from %s at step %d", resume_dir, state["step"])
    metrics = _Metrics(os.path.join(out, "metrics.jsonl"), ctx.main, truncate_after=state["step"])
    summary: dict[str, Any] = {"resumed_from_step": state["step"] if resume_dir else None}
    if cfg.eval_at_start and data.eval and not resume_dir:
        summary["before"] = metrics.log(0, evaluate(model, data, cfg, ctx, pad_token_id, autocast))

    stream = _micro_batches(len(data.train), cfg, ctx, state)
    bar = tqdm(total=total, initial=state["step"], disable=not (ctx.main and cfg.progress), desc="train")
    start, train_time, steps_run, status = time.perf_counter(), 0.0, 0, "completed"
    global_batch = cfg.batch_size * ctx.world * cfg.grad_accum
    # The fused loss runs the backbone directly, which would bypass DDP's/FSDP's forward: one process only.
    chunked = not classify and cfg.loss == "chunked" and ctx.world == 1
    model.train()
    while state["step"] < total:
        t0, loss_sum = time.perf_counter(), 0.0
        for micro in range(cfg.grad_accum):
            epoch, index, ids = next(stream)
            batch = {k: v.to(dev) for k, v in collate([data.train[i] for i in ids], pad_token_id).items()}
            labels = batch.pop("labels")
            with _maybe_no_sync(model, micro < cfg.grad_accum - 1), autocast:
                if chunked:
                    count = int((labels[:, 1:] != IGNORE_INDEX).sum())
                    loss = causal_lm_loss(model, labels, **batch) * count
                else:
                    loss, count = _loss(model(**batch).logits, labels, classify)
                loss = loss / max(count, 1) / cfg.grad_accum
            scaler.scale(loss).backward()
            loss_sum += loss.item()
        grad_norm = _clip(scaler, optimizer, params, cfg.max_grad_norm)
        bad = not math.isfinite(loss_sum) or (not math.isfinite(grad_norm) and not scaler.is_enabled())
        bad, stop = ctx.any(bad, ctx.stop_signal is not None)  # every rank takes the same branch
        if bad:
            last = latest_checkpoint(out)
            raise TrainingError(
                f"the loss or the gradients became NaN or infinite at step {state['step'] + 1}; stopped without "
                f"saving. Try a lower lr (now {lr:g}) or precision=fp32. "
                + (f"The last good checkpoint is {last} (--resume continues from it)." if last else "")
            )
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_time, steps_run = train_time + time.perf_counter() - t0, steps_run + 1
        loss = _mean(loss_sum, ctx)
        ema = loss if state["loss_ema"] is None else 0.9 * state["loss_ema"] + 0.1 * loss
        state |= {
            "step": state["step"] + 1,
            "epoch": epoch,
            "batch": index + 1,
            "loss": loss,
            "loss_ema": ema,
        }
        step, lr_now, speed = state["step"], scheduler.get_last_lr()[0], steps_run * global_batch / train_time
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_now:.2e}", samples_s=f"{speed:.1f}")
        if step % cfg.log_every == 0 or step == total:
            epochs = round(epoch + (index + 1) / per_epoch, 4)
            metrics.log(
                step,
                {
                    "train_loss": loss,
                    "train_loss_smoothed": ema,
                    "lr": lr_now,
                    "epoch": epochs,
                    "samples_per_s": speed,
                },
            )
        if data.eval and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            metrics.log(step, evaluate(model, data, cfg, ctx, pad_token_id, autocast))
        if stop or (cfg.save_every and step % cfg.save_every == 0):
            save_checkpoint(out, model, optimizer, scheduler, scaler, state, ctx, cfg.keep_checkpoints)
        if stop:
            status = "interrupted"
            break
    bar.close()
    runtime = time.perf_counter() - start
    summary |= {"status": status, "steps": state["step"], "total_steps": total}
    summary |= {"train_loss": state["loss_ema"], "train_loss_last": state["loss"]}
    if status == "completed" and data.eval:
        summary |= metrics.log(state["step"], evaluate(model, data, cfg, ctx, pad_token_id, autocast))
    summary |= {
        "runtime_s": runtime,
        "samples_per_s": steps_run * global_batch / train_time if train_time else 0.0,
        "steps_per_s": steps_run / train_time if train_time else 0.0,
        "peak_mem_mb": peak_memory_mb(dev),
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "world_size": ctx.world,
        "global_batch": global_batch,
        "lr": lr,
    }
    if status == "interrupted":
        summary["signal"] = signal.Signals(ctx.stop_signal).name if ctx.stop_signal else None
        if ctx.main:
            logger.warning(
                "stopped by %s at step %d; checkpoint saved. Resume with:\n  deltatune train --config %s --resume%s",
                summary["signal"],
                step,
                os.path.join(out, "train_config.yaml"),
                f"\n(under torchrun: the same torchrun command with --resume, {ctx.world} processes)"
                if ctx.world > 1
                else "",
            )
    return summary


def _lr_lambda(schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0 if schedule == "constant" else max(0.0, 1 - progress)

    return factor


def _micro_batches(
    n: int, cfg: TrainConfig, ctx: Context, state: dict
) -> Iterator[tuple[int, int, list[int]]]:
    """(epoch, batch index, example indices) from the saved position on; a resumed run skips exactly the
    batches the checkpointed run consumed."""
    epoch, start = state["epoch"], state["batch"]
    while True:
        batches = epoch_batches(n, cfg.batch_size, epoch, cfg.seed, ctx.rank, ctx.world)
        for i in range(start, len(batches)):
            yield epoch, i, batches[i]
        epoch, start = epoch + 1, 0


def _loss(logits: torch.Tensor, labels: torch.Tensor, classify: bool) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy, number of terms): per example for classification, per predicted token for LM
    (position t predicts token t+1; labels of -100, the prompt and the padding, count for nothing)."""
    if classify:
        return nn.functional.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()
    logits, labels = logits[:, :-1], labels[:, 1:]
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((labels != IGNORE_INDEX).sum())


def _maybe_no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter only on the last micro-batch
        model.set_requires_gradient_sync(not skip)
    return contextlib.nullcontext()


def _clip(
    scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, params: list, max_norm: float
) -> float:
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return float(norm)


def _mean(value: float, ctx: Context) -> float:
    if ctx.world == 1:
        return value
    t = torch.tensor([value], device=ctx.device, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t) / ctx.world


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Datasets, cfg: TrainConfig, ctx: Context, pad_token_id: int, autocast: Any
) -> dict[str, float]:
    """Eval loss; accuracy and macro F1 (classification) or perplexity (causal LM), over every rank's share."""
    classify = data.label_map is not None
    k = len(data.label_map) if classify else 1
    totals = torch.zeros(
        2 + k * k, dtype=torch.float64
    )  # loss sum, count, confusion matrix (gold x predicted)
    model.eval()
    for ids in eval_batches(len(data.eval), cfg.eval_batch_size, ctx.rank, ctx.world):
        examples = [data.eval[max(i, 0)] for i in ids]
        batch = {key: v.to(ctx.device) for key, v in collate(examples, pad_token_id).items()}
        labels, valid = batch.pop("labels"), torch.tensor([i >= 0 for i in ids], device=ctx.device)
        with autocast:
            logits = model(**batch).logits.float()
        if classify:
            losses = nn.functional.cross_entropy(logits, labels, reduction="none")
            totals[0] += float(losses[valid].sum())
            totals[1] += int(valid.sum())
            pairs = labels[valid] * k + logits[valid].argmax(-1)
            totals[2:] += torch.bincount(pairs.cpu(), minlength=k * k).double()
        else:
            labels[~valid] = IGNORE_INDEX
            loss, count = _loss(logits, labels, classify=False)
            totals[0] += float(loss)
            totals[1] += count
    model.train()
    if ctx.world > 1:
        totals = totals.to(ctx.device)
        torch.distributed.all_reduce(totals)
        totals = totals.cpu()
    loss = float(totals[0] / max(totals[1], 1))
    if not classify:
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
    confusion = totals[2:].reshape(k, k)
    tp = confusion.diag()
    f1_denominator = confusion.sum(0) + confusion.sum(1)  # 2tp + fp + fn
    present = f1_denominator > 0
    f1 = float((2 * tp[present] / f1_denominator[present]).mean()) if present.any() else 0.0
    return {"eval_loss": loss, "eval_accuracy": float(tp.sum() / max(confusion.sum(), 1)), "eval_f1": f1}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated CUDA memory on GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class _Metrics:
    """`metrics.jsonl`, one JSON object per line; a resumed run first drops lines past its checkpoint."""

    def __init__(self, path: str, enabled: bool, truncate_after: int):
        self.path, self.enabled = path, enabled
        if enabled and truncate_after and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                kept = [
                    line for line in f if line.strip() and json.loads(line).get("step", 0) <= truncate_after
                ]
            checkpoint.atomic_write_text(path, "".join(kept))

    def log(self, step: int, values: dict[str, float]) -> dict[str, float]:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
            if "eval_loss" in values:
                logger.info("step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in values.items()))
        return values


# ---- checkpoints -----------------------------------------------------------------------------------------
def _trainable_state(model: nn.Module, ctx: Context) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, gathered in full (on rank 0 under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    names = {n.removeprefix("module.") for n, p in model.named_parameters() if p.requires_grad}
    options = StateDictOptions(full_state_dict=True, cpu_offload=ctx.world > 1)
    return {k: v for k, v in get_model_state_dict(model, options=options).items() if k in names}


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(
    out: str,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    state: dict,
    ctx: Context,
    keep: int,
) -> str:
    """Write `<out>/checkpoints/step-N/` atomically: files into a temp folder, renamed into place last."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    weights = _trainable_state(model, ctx)
    options = StateDictOptions(full_state_dict=True, cpu_offload=ctx.world > 1)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    rngs = [None] * ctx.world
    if ctx.world > 1:
        torch.distributed.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
    root = os.path.join(out, "checkpoints")
    final = os.path.join(root, f"step-{state['step']}")
    if ctx.main:
        tmp = os.path.join(root, f".step-{state['step']}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        checkpoint.atomic_save_tensors(os.path.join(tmp, "trainable.safetensors"), weights)
        training = {
            "optimizer": optim,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rngs,
        }
        checkpoint.atomic_torch_save(os.path.join(tmp, "training_state.pt"), training)
        checkpoint.atomic_write_text(os.path.join(tmp, "state.json"), json.dumps(state, indent=2))
        if os.path.exists(final):  # the same step saved again (a resumed run interrupted at once)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for old in _checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


def _checkpoints(out: str) -> list[str]:
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    steps = [(int(m.group(1)), m.group(0)) for d in os.listdir(root) if (m := re.fullmatch(r"step-(\d+)", d))]
    return [
        os.path.join(root, d) for _, d in sorted(steps) if os.path.isfile(os.path.join(root, d, "state.json"))
    ]


def latest_checkpoint(out: str) -> str | None:
    """The newest complete checkpoint folder of a run, or None."""
    found = _checkpoints(out)
    return found[-1] if found else None


def load_checkpoint(
    directory: str, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, ctx: Context, state: dict
) -> dict:
    """Restore weights, optimizer, scheduler, scaler and RNG from a checkpoint; return its training state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    with open(os.path.join(directory, "state.json"), encoding="utf-8") as f:
        saved = json.load(f)
    changed = [k for k in ("world", "batch_size", "grad_accum") if saved.get(k) != state[k]]
    if changed:
        raise TrainingError(
            f"{directory} was written with "
            + ", ".join(f"{k}={saved.get(k)}" for k in changed)
            + f"; this run has {', '.join(f'{k}={state[k]}' for k in changed)}. Resume with the same settings "
            "(the data position depends on them)"
        )
    weights = checkpoint.load_tensors(os.path.join(directory, "trainable.safetensors"))
    names = {n.removeprefix("module.") for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != names:
        raise TrainingError(
            f"{directory} holds other trainable parameters than this model has "
            f"({len(set(weights) - names)} unexpected, {len(names - set(weights))} missing): "
            "was it saved with another method or model?"
        )
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    training = torch.load(os.path.join(directory, "training_state.pt"), map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, training["optimizer"], options=options)
    scheduler.load_state_dict(training["scheduler"])
    scaler.load_state_dict(training["scaler"])
    _set_rng_state(training["rng"][ctx.rank])
    return saved


# ---- the command line ------------------------------------------------------------------------------------
def train_main(argv: list[str]) -> int:
    """`deltatune train --config FILE [key=value ...] [--resume | --overwrite]`."""
    parser = argparse.ArgumentParser(
        prog="deltatune train",
        description="Fine-tune a model with one method. Settings come from --config and key=value overrides "
        "(dotted keys for sections: fields.text=body, method_args.r=4).",
    )
    parser.add_argument(
        "--config", help="a YAML file (see configs/); without it, the defaults: LoRA on MiniLM + builtin:spam"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in output_dir"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        config = load_train_config(args.config, args.overrides)
        summary = run(config, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, TrainingError, checkpoint.CheckpointError) as e:
        print(f"deltatune train: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(summary)
    if summary["status"] == "interrupted":
        return 128 + int(signal.Signals[summary["signal"]] if summary.get("signal") else signal.SIGINT)
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
    rows = [(k, v) for k, v in summary.items() if not isinstance(v, dict) and v is not None]
    if "before" in summary:
        rows += [(f"{k} (before training)", v) for k, v in summary["before"].items()]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(
            f"{key.ljust(width)}  {value:.4g}" if isinstance(value, float) else f"{key.ljust(width)}  {value}"
        )
