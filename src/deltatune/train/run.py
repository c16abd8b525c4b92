"""`run(config)`: load the tokenizer, the data and the model, put the method in, train, save; and
`deltatune train` (its command line is `deltatune.train.cli`, which imports this module only to run)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deltatune import checkpoint, dtypes
from deltatune.config import method_config
from deltatune.data import Datasets, load_datasets, load_stream
from deltatune.embedded import check_model, portable_name, resolve_model
from deltatune.errors import ConfigError, TrainingError, short
from deltatune.split import split_validation
from deltatune.train import loop
from deltatune.train.config import (
    DTYPES,
    RUN_FILES,
    TASK_TYPES,
    TrainConfig,
    config_yaml,
    needs_validation,
    output_dir,
    resolve_dtypes,
    same_source,
    validate,
    why_no_evaluation,
)
from deltatune.train.loop import Context, _catch_signals, _init_context, _terminate_raises, seed_everything
from deltatune.train.lr_search import search_lr
from deltatune.vocab import context_length, fix_pad_token

logger = logging.getLogger(__name__)


# ---- the Python entry ------------------------------------------------------------------------------------
def run(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    wrap: Callable | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train as `config` says and return the summary (also written to `<output_dir>/summary.json`).

    Args:
        config: a validated config (`load_train_config` or `config_from_dict`).
        resume: continue from the newest complete checkpoint in the output folder.
        overwrite: replace a run that is already in the output folder.
        wrap: `wrap(model, peft_config) -> model` instead of `get_peft_model` (compare's PEFT peer row).
        on_progress: called with each step's and each validation's numbers (`loop.train`), and, during
            `lr: auto`, with `phase` naming the rate being tried.

    The validation split (`deltatune.split`) is held out of the training data when `lr` is `auto`, with
    `early_stopping`, or when there is no eval data; with no eval data the evaluation is on it
    (`evaluated_on` in the summary says so).
    """
    errors = validate(config)
    if errors:
        raise ConfigError("invalid training config:\n  " + "\n  ".join(errors))
    if problem := check_model(config.model):  # a hub name: found in seconds, or said to be out of reach
        raise ConfigError(f"model: {problem}")
    config = _fit_max_length(config)
    ctx = _init_context(config)
    config = resolve_dtypes(config, ctx.device)  # `auto` dtypes: what this machine computes fastest
    out = output_dir(config)
    made = checkpoint.first_missing(out)  # the folders this run makes for `out`, if any
    owned = False  # whether the files in `out` are this run's (so a failure may remove them)
    lock = checkpoint.FolderLock()  # rank 0 holds it on `out` while the run writes there
    loading = contextlib.ExitStack()  # until the loop's own handler: SIGTERM stops the run where it is
    try:
        loading.enter_context(_terminate_raises())
        resume_dir = _prepare_output(out, config, ctx, lock, resume=resume, overwrite=overwrite)
        owned = not resume
        for name in (config.precision, config.base_dtype):
            dtypes.warn_if_slow(name, ctx.device.type)
        seed_everything(config.seed, config.deterministic)
        tokenizer = _load_tokenizer(config)
        started = time.perf_counter()
        load = load_stream if config.streaming else load_datasets
        data = load(
            config.data,
            tokenizer,
            task=config.task,
            eval_data=config.eval_data,
            fields=config.fields,
            max_length=config.max_length,
            labels=config.labels,
            num_proc=config.num_proc,
            **({} if config.streaming else {"eval_fraction": config.eval_fraction, "seed": config.seed}),
        )
        data_load_s = time.perf_counter() - started  # reading + tokenizing, or reading the cache
        if data.label_map is not None:
            _keep_label_map(os.path.join(out, "label_map.json"), data.label_map, ctx, resume_dir)
        if config.eval_data is not None and same_source(config.data, config.eval_data) and ctx.main:
            logger.warning(
                "eval_data is the training data: its scores say how well the run fits what it trained on, "
                "not how it does on data it has not seen"
            )
        val, split = None, None
        if needs_validation(config, bool(data.eval)):
            train_rows, val, split = split_validation(
                data.train, config.val_fraction, config.seed, exclude=data.eval
            )
            data = dataclasses.replace(data, train=train_rows)
            if ctx.main:
                logger.info("%s", split.describe())
        elif not data.eval and ctx.main:
            logger.warning("no evaluation: %s", why_no_evaluation(config))
        peft_model = build_model(config, data.label_map, tokenizer, ctx.device, wrap=wrap)
        model = _distribute(peft_model, config, ctx)
        lr_search = None
        loading.close()
        with _catch_signals(ctx):
            if config.lr == "auto" and not resume_dir:
                lr_search = search_lr(
                    model,
                    data,
                    val,
                    config,
                    out=out,
                    train_fn=loop.train,
                    ctx=ctx,
                    pad_token_id=tokenizer.pad_token_id,
                    on_progress=on_progress,
                )
                if ctx.main:
                    finals = ", ".join(
                        f"{t['lr']:.2g} -> {t['val_loss']:.4f}" for t in lr_search["finalists"]
                    )
                    logger.info(
                        "lr: auto chose %.3g (%s; %d steps per rate%s, %d in all)",
                        lr_search["lr"],
                        ", ".join(f"{t['lr']:.2g} -> {t['val_loss']:.4f}" for t in lr_search["trials"]),
                        lr_search["steps_per_trial"],
                        f"; finalists, {lr_search['steps_per_finalist']} steps: {finals}" if finals else "",
                        lr_search["budget_steps"],
                    )
                    checkpoint.atomic_write_text(
                        os.path.join(out, "lr_search.json"), json.dumps(lr_search, indent=2)
                    )
            elif config.lr == "auto":  # resumed: the rate the interrupted run chose
                lr_search = _read_lr_search(os.path.join(out, "lr_search.json"))
            train_config = (
                dataclasses.replace(config, lr=lr_search["lr"]) if lr_search is not None else config
            )
            summary = loop.train(
                model,
                data,
                train_config,
                out=out,
                ctx=ctx,
                pad_token_id=tokenizer.pad_token_id,
                resume_dir=resume_dir,
                val=val,
                on_progress=on_progress,
                # a refused --resume (other labels, method, rank, batch) leaves the run's settings as they were
                on_resumed=(lambda: _write_run_config(out, config)) if ctx.main else None,
            )
        summary["lr_chosen_by"] = "auto" if lr_search else ("given" if config.lr is not None else "default")
        if lr_search is not None:
            summary["lr_search"] = lr_search
        if split is not None:
            summary["validation"] = split.as_dict()
        summary["evaluated_on"] = _evaluated_on(config, bool(data.eval), val is not None)
        summary["eval_rows"] = len(data.eval) if data.eval else len(val or [])
        if not data.eval and val is not None and summary["status"] == "completed":
            # no eval data: the evaluation is the validation split's (the summary says so)
            for name in ("loss", "accuracy", "f1", "perplexity"):
                if f"val_{name}" in summary:
                    summary[f"eval_{name}"] = summary[f"val_{name}"]
                if f"val_{name}" in summary.get("before", {}):
                    summary["before"][f"eval_{name}"] = summary["before"].pop(f"val_{name}")
        if summary["status"] == "completed":
            try:
                _save_final(model, peft_model, tokenizer, data, out, ctx)
            except Exception as e:
                raise checkpoint.CheckpointError(
                    f"could not save the trained adapter to {os.path.join(out, 'adapter')}: "
                    f"{checkpoint.write_failure(e, out)}; {checkpoint.intact_note(out)}"
                ) from e
            summary["adapter_dir"] = os.path.join(out, "adapter")
        summary["data_load_s"] = data_load_s
        summary.update(
            {"method": config.method, "model": config.model, "task": config.task, "data": config.data}
        )
        if ctx.main:
            checkpoint.atomic_write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
        return summary
    except BaseException as e:
        loading.close()
        loop.close_trackers("interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        if owned and ctx.main:
            _remove_failed_run(out, made)
        raise
    finally:
        lock.release()
        if ctx.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _remove_failed_run(out: str, made: str | None) -> None:
    """A run that failed with nothing to resume from leaves nothing behind (so the rerun needs no
    --overwrite): its run files go, and the folders this run made for it (`made`, the outermost) while empty."""
    if checkpoint.latest_checkpoint(out) is not None:
        return  # resumable: keep everything; the error says how to continue
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.unlink(path)
    checkpoint.remove_made(out, made)


def _evaluated_on(config: TrainConfig, has_eval: bool, has_val: bool) -> str | None:
    """What the eval_* numbers of the summary were measured on (None: nothing was evaluated)."""
    from deltatune.builtin_data import default_eval

    if has_eval:
        if config.eval_data:
            return config.eval_data
        if config.eval_fraction:
            return f"{config.eval_fraction:.0%} of {config.data}, held out"
        return default_eval(config.data)
    return "validation split" if has_val else None


def _fit_max_length(config: TrainConfig) -> TrainConfig:
    """`max_length` cut to what the model's learned position table holds (less prompt or prefix tuning's
    virtual tokens), with a warning: a longer row indexed past the table (an IndexError deep in the model).
    Rotary-position models (Llama, Qwen, Mistral) compute any position, and are left as asked."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(resolve_model(config.model))
    except Exception:  # noqa: BLE001  (the model's own loading says what is wrong with it, later)
        return config
    if any(
        getattr(model_config, k, None) is not None for k in ("rope_parameters", "rope_theta", "rope_scaling")
    ):
        return config
    limit = context_length(model_config)
    if limit is None:
        return config
    peft_config, _ = method_config(config.method, TASK_TYPES[config.task], **config.method_args)
    virtual = getattr(peft_config, "num_virtual_tokens", None) or 0
    longest = limit - virtual
    if config.max_length <= longest:
        return config
    if longest < 1:
        raise ConfigError(
            f"method_args.num_virtual_tokens={virtual} leaves no room in the model's {limit} positions"
        )
    logger.warning(
        "max_length %d is more than %s takes (%d positions%s): sequences are cut at %d tokens",
        config.max_length,
        short(config.model),
        limit,
        f", less {virtual} virtual tokens" if virtual else "",
        longest,
    )
    return dataclasses.replace(config, max_length=longest)


def _finished(out: str) -> str:
    """For the 'nothing to resume' error: that the run in `out` already ended, as its summary.json says."""
    try:
        with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
        status, steps = summary["status"], summary.get("steps")
    except (OSError, ValueError, TypeError, KeyError):
        return ""
    if status != "completed":
        return ""
    return (
        f"; the run there completed ({steps} steps, summary.json): its adapter is in "
        f"{os.path.join(out, 'adapter')!r}; to train more, start a new run (save_every keeps checkpoints)"
    )


def _prepare_output(
    out: str, config: TrainConfig, ctx: Context, lock: checkpoint.FolderLock, *, resume: bool, overwrite: bool
) -> str | None:
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pick one")
    in_use = ctx.main and os.path.isdir(out) and not lock.acquire(out)
    if ctx.any(in_use)[0]:  # before anything is read or removed there
        raise ConfigError(
            f"output_dir {out!r} is in use: another deltatune train or compare is writing there now; wait for it "
            "to end (a train stopped with Ctrl-C or SIGTERM saves a checkpoint that --resume continues), or set "
            "another output_dir"
        )
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    resume_dir = None
    if resume:
        resume_dir = checkpoint.latest_checkpoint(out)
        if resume_dir is None:
            raise TrainingError(
                f"nothing to resume: no complete checkpoint in {os.path.join(out, 'checkpoints')!r}"
                + _finished(out)
            )
    elif found and not overwrite:
        raise ConfigError(
            f"output_dir {out!r} already holds a run ({', '.join(found)}); continue it with --resume, "
            "replace it with --overwrite, or set another output_dir"
        )
    ctx.barrier()
    failed: Exception | None = None
    if ctx.main:
        try:
            if overwrite:
                for name in found:
                    path = os.path.join(out, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
            # a read-only place, /proc, a file on the way: before any work
            if why := checkpoint.unwritable(out):
                raise ConfigError(f"output_dir {out!r} can't be written in: {why}; set another output_dir")
            # the folder was made just now: lock it, unless a run that started meanwhile took it first
            if lock.fd is None and not lock.acquire(out):
                raise ConfigError(
                    f"output_dir {out!r} is in use: another deltatune train or compare began there"
                )
            # a resumed run's settings are written once its checkpoint has been taken (loop.train)
            if not resume:
                _write_run_config(out, config)
        except (ConfigError, OSError) as e:
            failed = e
    # every rank learns whether rank 0 could prepare the folder (the others waited in a barrier that then broke
    # with gloo's "Connection closed by peer" and a traceback above rank 0's message)
    if ctx.any(failed is not None)[0]:
        if failed is not None:
            raise failed
        raise ConfigError(f"output_dir {out!r} could not be prepared by rank 0 (its error says why)")
    return resume_dir


def _write_run_config(out: str, config: TrainConfig) -> None:
    checkpoint.atomic_write_text(
        os.path.join(out, "train_config.yaml"), config_yaml(dataclasses.replace(config, output_dir=out))
    )


def _saved_json(path: str, what: str, shape_ok: Any, shape: str, remedy: str) -> Any:
    """A JSON file the run being resumed wrote (`what` it holds), when `shape_ok(value)`; otherwise a ConfigError
    naming the file and its damage (unreadable, or not `shape`) and the `remedy`."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not JSON, or not UTF-8
        why = f"{type(e).__name__}: {str(e)[:200]}"
    else:
        if shape_ok(saved):
            return saved
        why = f"not {shape}: {short(saved)}"
    raise ConfigError(f"{path}, {what} of the run being resumed, is damaged ({why}): {remedy}")


def _read_lr_search(path: str) -> dict:
    """The `lr: auto` search of the run being resumed (`lr_search.json`): the rate it chose is the run's rate."""

    def has_lr(saved: Any) -> bool:
        lr = saved.get("lr") if isinstance(saved, dict) else None
        return isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0

    return _saved_json(
        path,
        "the learning rate `lr: auto` chose",
        has_lr,
        "an object with a positive 'lr'",
        "restore it, or resume with the rate set (lr=<the rate>)",
    )


def _keep_label_map(path: str, label_map: dict[str, int], ctx: Context, resume_dir: str | None) -> None:
    if resume_dir and os.path.isfile(path):
        saved = _saved_json(
            path,
            "the labels",
            lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
            "an object of label names",
            "restore it, or remove it to resume with this data's labels as they are numbered now",
        )
        if saved != label_map:
            raise ConfigError(
                f"the labels of this data ({', '.join(label_map)}) differ from the run being resumed "
                f"({', '.join(saved)}, {path}); resume with the same data"
            )
    if ctx.main:
        checkpoint.atomic_write_text(path, json.dumps(label_map, indent=2))


def _load_tokenizer(config: TrainConfig) -> Any:
    from deltatune.vocab import load_tokenizer

    try:
        tokenizer = load_tokenizer(resolve_model(config.model))
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
    if _flash_varlen(config, device):  # packed rows through flash-attention's variable-length kernel
        kwargs["attn_implementation"] = "flash_attention_2"
    if config.task == "seq-cls":
        assert label_map is not None
        kwargs |= {"num_labels": len(label_map), "label2id": label_map}
        kwargs["id2label"] = {i: n for n, i in label_map.items()}
    auto = AutoModelForSequenceClassification if config.task == "seq-cls" else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(resolve_model(config.model), **kwargs)
    except OSError as e:
        raise ConfigError(_cannot_load(config.model, e)) from e
    except RuntimeError as e:  # transformers: "You set `ignore_mismatched_sizes` to `False` ..."
        if label_map is None or "ignore_mismatched_sizes" not in str(e):
            raise
        raise ConfigError(_head_mismatch(config.model, label_map)) from e
    fix_pad_token(tokenizer, model)
    model.to(device)
    peft_config, quantize = method_config(config.method, TASK_TYPES[config.task], **config.method_args)
    # The name the user gave (a hub name, their path, or `embedded:minilm`), not the resolved folder.
    peft_config.base_model_name_or_path = portable_name(config.model)
    quantize = config.quantize or quantize
    if quantize:
        from deltatune.methods.quant import quantize_model

        quantize_model(model, quantize, compute_dtype=DTYPES[config.base_dtype])  # a BackendError is one line
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    try:
        peft = (wrap or get_peft_model)(model, peft_config)
    except ValueError as e:  # the method doesn't fit this model (no target matched, ...): the config's to fix
        raise ConfigError(f"method {config.method} on model {short(config.model)}: {e}") from e
    for p in peft.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return peft.to(device)


def _flash_varlen(config: TrainConfig, device: torch.device) -> bool:
    """Packing or padding-free on CUDA with a half-precision base and flash-attn installed (not tried on a GPU
    yet; `loop.train` checks with a probe that examples stay apart, whatever the attention)."""
    import importlib.util

    return (
        (config.packing or config.padding_free)
        and device.type == "cuda"
        and config.base_dtype != "fp32"
        and importlib.util.find_spec("flash_attn") is not None
    )


def _cannot_load(model: str, error: Exception) -> str:
    return (
        f"could not load the model {short(model)}: {short(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__, 300)}. "
        "Give a local Hugging Face model folder (with config.json and the tokenizer files), "
        "or a hub name while the hub is reachable"
    )


def _head_mismatch(model: str, label_map: dict[str, int]) -> str:
    """The message for a base whose classification head has another number of classes than the data."""
    from transformers import AutoConfig

    try:
        head = f"a head for {AutoConfig.from_pretrained(resolve_model(model)).num_labels} classes"
    except Exception:  # only for the message
        head = "a head of another size"
    return (
        f"model {short(model)} is a classifier with {head}, but this run has {len(label_map)} classes "
        f"({short(list(label_map), 120)}); its head can't take them: give its base model (without the head), "
        "or data (or labels: [...]) with the head's classes"
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
        full = checkpoint.trainable_state(model, ctx)
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
