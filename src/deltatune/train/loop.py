"""The training loop: `train(model, data, config)` gets a ready model (its trainable parameters have
`requires_grad`) and knows no method; `evaluate` scores it on the eval split."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from deltatune import checkpoint, tracking
from deltatune.data import IGNORE_INDEX, Datasets, collate, eval_batches, take
from deltatune.data.packing import packed_attention, packed_context, packed_inputs
from deltatune.data.streaming import make_batcher
from deltatune.errors import ConfigError, TrainingError
from deltatune.losses import causal_lm_loss
from deltatune.methods import registry
from deltatune.train.config import DTYPES, TrainConfig, resolve_dtypes

logger = logging.getLogger(__name__)


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


class Terminated(KeyboardInterrupt):
    """SIGTERM before training started (loading the model or the data): the run stops at once, its files go
    as a failed run's do, and the command exits with 128 + the signal's number."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"{signal.Signals(signum).name} before training began")
        self.signum = signum


@contextlib.contextmanager
def _terminate_raises() -> Iterator[None]:
    """While this is open, SIGTERM raises `Terminated` (before the loop there is no step to finish and no
    checkpoint to save; the default action killed the process with the run's files half-made)."""

    def handler(signum: int, _frame: Any) -> None:
        raise Terminated(signum)

    if threading.current_thread() is not threading.main_thread():  # signals can only be caught there
        yield
        return
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


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
    val: list[dict[str, Any]] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    schedule_steps: int | None = None,
    on_resumed: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train `model` (ready: its trainable parameters have `requires_grad`) and return the summary.

    Checkpoints go to `<out>/checkpoints/step-N/`, metrics to `<out>/metrics.jsonl`. Stops early (status
    `interrupted`, after saving a checkpoint) when `ctx.stop_signal` is set.

    `val`: the validation split (see `deltatune.split`). With `config.early_stopping` the model is scored on
    it every epoch (or every `val_every` steps); training stops after `patience` scores without improvement
    and the best weights are put back (kept in memory: a resumed run starts its search for the best afresh).
    Without early stopping it is scored once at the end. The summary holds `val_loss`/`val_accuracy` of the
    weights returned. `on_progress(event)` is called after every step (`{"event": "step", "step", "total",
    "loss", "epoch"}`) and every validation (`{"event": "val", "step", "val_loss", ...}`).
    `schedule_steps`: the length the lr schedule decays over, when not the run's own (the trials of
    `lr: auto` are the first steps of the real run, schedule included). `on_resumed()` is called once the
    checkpoint in `resume_dir` has been loaded into the model.

    Raises:
        TrainingError: the loss became NaN or infinite (nothing is saved; earlier checkpoints stay intact).
    """
    from tqdm.auto import tqdm

    ctx = ctx or Context()
    cfg = resolve_dtypes(config, ctx.device)  # `auto` dtypes, when called without `run`
    dev, classify = ctx.device, data.label_map is not None
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    method = registry.get(cfg.method)
    lr = cfg.lr if cfg.lr is not None else method.lr
    if not isinstance(lr, (int, float)):
        raise TrainingError(f"lr={lr!r} must be resolved to a number before training (run() searches it)")
    optimizer = build_optimizer(model, params, cfg, lr, method)
    batcher = make_batcher(
        data.train,
        batch_size=cfg.batch_size,
        mode=batching_mode(cfg),
        max_length=cfg.max_length,
        seed=cfg.seed,
        rank=ctx.rank,
        world=ctx.world,
        pad_token_id=pad_token_id,
    )
    packed_mode = None
    if batcher.mode in ("packed", "padding_free"):
        try:
            packed_mode = packed_attention(model)
        except ValueError as e:
            raise ConfigError(f"{'packing' if batcher.mode == 'packed' else 'padding_free'}: {e}") from e
    per_epoch = len(batcher)  # 0 for a stream (unknown): max_steps says how long to train
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(cfg.schedule, cfg.warmup_steps, schedule_steps or total)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
    autocast = torch.autocast(dev.type, dtype=DTYPES[cfg.precision], enabled=cfg.precision != "fp32")
    state = {"step": 0, "epoch": 0, "batch": 0, "loss": None, "loss_ema": None}
    state |= {"world": ctx.world, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum}
    if resume_dir:
        state = checkpoint.load_checkpoint(resume_dir, model, optimizer, scheduler, scaler, ctx, state)
        logger.info("resumed from %s at step %d", resume_dir, state["step"])
        if on_resumed is not None:
            on_resumed()
    trackers = None
    if ctx.main and cfg.report_to:
        trackers = tracking.make_trackers(
            cfg.report_to, out, resume_step=state["step"] if resume_dir else None
        )
    metrics = _Metrics(os.path.join(out, "metrics.jsonl"), ctx.main, state["step"], trackers)
    metrics.log_config(cfg, out, sum(p.numel() for p in params), sum(p.numel() for p in model.parameters()))
    summary: dict[str, Any] = {"resumed_from_step": state["step"] if resume_dir else None}
    if packed_mode is not None:
        summary["packed_attention"] = packed_mode  # how examples were kept apart (data.packing)
    if cfg.eval_at_start and not resume_dir and (data.eval or val):
        # with no eval data the untrained model is scored on the validation split, as the trained one is
        summary["before"] = metrics.log(
            0,
            evaluate(
                model,
                data,
                cfg,
                ctx,
                pad_token_id,
                autocast,
                examples=None if data.eval else val,
                prefix="eval" if data.eval else "val",
            ),
        )

    stopper = _EarlyStopping(cfg, params) if cfg.early_stopping and val else None
    steps_per_epoch = max(1, math.ceil(per_epoch / cfg.grad_accum))
    val_every = cfg.val_every or steps_per_epoch

    def validate_now(step: int) -> dict[str, float]:
        scores = evaluate(model, data, cfg, ctx, pad_token_id, autocast, examples=val, prefix="val")
        metrics.log(step, scores)
        if on_progress:
            on_progress({"event": "val", "step": step, **scores})
        return scores

    step_times: list[float] = []
    stream = batcher.stream(state)
    bar = tqdm(total=total, initial=state["step"], disable=not (ctx.main and cfg.progress), desc="train")
    start, train_time, steps_run, status = time.perf_counter(), 0.0, 0, "completed"
    real_tokens = 0  # this rank's non-padding tokens since the start of this process
    global_batch = cfg.batch_size * ctx.world * cfg.grad_accum
    # The fused loss runs the backbone directly, which would bypass DDP's/FSDP's forward: one process only.
    chunked = not classify and cfg.loss == "chunked" and ctx.world == 1
    model.train()
    while state["step"] < total:
        t0, loss_sum = time.perf_counter(), 0.0
        for micro in range(cfg.grad_accum):
            tensors, real, position = next(stream)
            real_tokens += real
            batch = {k: v.to(dev) for k, v in tensors.items()}
            if packed_mode is not None:  # examples side by side: attention confined to each one
                batch = packed_inputs(batch, packed_mode, model) | {"use_cache": False}
            labels = batch.pop("labels")
            with _maybe_no_sync(model, micro < cfg.grad_accum - 1), packed_context(model, packed_mode):
                with autocast:
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
            metrics.close("failed")
            last = checkpoint.latest_checkpoint(out)
            raise TrainingError(
                f"the loss or the gradients became NaN or infinite at step {state['step'] + 1}; stopped without "
                f"saving. Try a lower lr (now {lr:g}) or precision=fp32. "
                + (f"The last good checkpoint is {last} (--resume continues from it)." if last else "")
            )
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        train_time, steps_run = train_time + step_times[-1], steps_run + 1
        loss = _mean(loss_sum, ctx)
        ema = loss if state["loss_ema"] is None else 0.9 * state["loss_ema"] + 0.1 * loss
        state |= {
            "step": state["step"] + 1,
            **position,
            "loss": loss,
            "loss_ema": ema,
        }
        step, lr_now, speed = state["step"], scheduler.get_last_lr()[0], steps_run * global_batch / train_time
        tokens_s = real_tokens * ctx.world / train_time  # every rank's share is about the same size
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss:.4f}", lr=f"{lr_now:.2e}", samples_s=f"{speed:.1f}", tok_s=f"{tokens_s:.0f}"
        )
        if step % cfg.log_every == 0 or step == total:
            tokens_s = _mean(real_tokens, ctx) * ctx.world / train_time  # exact: the sum over ranks
            epochs = round(position["epoch"] + (position["batch"] / per_epoch if per_epoch else 0), 4)
            metrics.log(
                step,
                {
                    "train_loss": loss,
                    "train_loss_smoothed": ema,
                    "lr": lr_now,
                    "epoch": epochs,
                    "samples_per_s": speed,
                    "tokens_per_s": tokens_s,
                    "grad_norm": grad_norm,
                    "peak_mem_mb": peak_memory_mb(dev),
                    "tokens": round(tokens_s * train_time),  # real tokens since this process started
                },
            )
        if on_progress:
            on_progress(
                {
                    "event": "step",
                    "step": step,
                    "total": total,
                    "loss": loss,
                    "epoch": position["epoch"] + (position["batch"] / per_epoch if per_epoch else 0),
                }
            )
        if data.eval and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            metrics.log(step, evaluate(model, data, cfg, ctx, pad_token_id, autocast))
        scored = stopper is not None and (step % val_every == 0 or step == total)
        if scored and stopper.update(step, validate_now(step)):
            summary["stopped_early"] = True
            break
        if stop or (cfg.save_every and step % cfg.save_every == 0):
            checkpoint.save_checkpoint(
                out, model, optimizer, scheduler, scaler, state, ctx, cfg.keep_checkpoints
            )
        if stop:
            status = "interrupted"
            break
    bar.close()
    runtime = time.perf_counter() - start
    summary |= {"status": status, "steps": state["step"], "total_steps": total}
    summary |= {"train_loss": state["loss_ema"], "train_loss_last": state["loss"]}
    if stopper and status == "completed":
        if stopper.best_step != state["step"]:
            stopper.restore()
        summary |= {
            "stopped_early": summary.get("stopped_early", False),
            "best_step": stopper.best_step,
            "patience": cfg.patience,
            "val_metric": cfg.val_metric,
            "val_curve": stopper.curve,
        }
        summary |= {k: v for k, v in stopper.best_scores.items()}
    elif status == "completed" and val:
        summary |= validate_now(state["step"])
    if status == "completed" and data.eval:
        summary |= metrics.log(state["step"], evaluate(model, data, cfg, ctx, pad_token_id, autocast))
    summary |= {
        "runtime_s": runtime,
        "samples_per_s": steps_run * global_batch / train_time if train_time else 0.0,
        "steps_per_s": steps_run / train_time if train_time else 0.0,
        "tokens_per_s": _mean(real_tokens, ctx) * ctx.world / train_time if train_time else 0.0,
        "peak_mem_mb": peak_memory_mb(dev),
        "step_time_s": _quartiles(step_times[min(3, len(step_times) // 4) :]),
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "world_size": ctx.world,
        "global_batch": global_batch,
        "lr": lr,
    }
    metrics.close(status)
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


def _quartiles(values: list[float]) -> dict[str, float] | None:
    """Median and quartiles of the step times (the first few, warm-up, left out by the caller)."""
    if not values:
        return None
    q = np.quantile(np.asarray(values), [0.25, 0.5, 0.75])
    return {"p25": float(q[0]), "median": float(q[1]), "p75": float(q[2]), "n": len(values)}


class _EarlyStopping:
    """Keeps the best validation score, a copy of the trainable weights that scored it, and the count of
    scores since; `update` says when to stop."""

    def __init__(self, cfg: TrainConfig, params: list[nn.Parameter]):
        self.cfg, self.params = cfg, params
        self.best: tuple[float, float] | None = None
        self.best_step, self.best_scores, self.since = 0, {}, 0
        self.curve: list[dict[str, float]] = []
        self.saved: list[torch.Tensor] = []

    def _key(self, scores: dict[str, float]) -> tuple[float, float]:
        if self.cfg.val_metric == "accuracy":
            return (-scores["val_accuracy"], scores["val_loss"])
        return (scores["val_loss"], 0.0)

    def update(self, step: int, scores: dict[str, float]) -> bool:
        self.curve.append({"step": step, **scores})
        key = self._key(scores)
        if self.best is None or key < self.best:
            self.best, self.best_step, self.best_scores, self.since = key, step, dict(scores), 0
            self.saved = [p.detach().to("cpu", copy=True) for p in self.params]
            return False
        self.since += 1
        return self.since >= self.cfg.patience

    @torch.no_grad()
    def restore(self) -> None:
        for p, saved in zip(self.params, self.saved):
            p.copy_(saved.to(p.device))


def _lr_lambda(schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0 if schedule == "constant" else max(0.0, 1 - progress)

    return factor


def batching_mode(cfg: TrainConfig) -> str:
    """The `Batcher` mode the config asks for."""
    if cfg.packing:
        return "packed"
    if cfg.padding_free:
        return "padding_free"
    return "group_by_length" if cfg.group_by_length else "padded"


def _loss(logits: torch.Tensor, labels: torch.Tensor, classify: bool) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy, number of terms): per example for classification, per predicted token for LM
    (position t predicts token t+1; labels of -100, the prompt and the padding, count for nothing)."""
    if classify:
        return nn.functional.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()
    logits = logits[
        :, -labels.shape[1] :
    ]  # prompt tuning's virtual tokens come first: the last positions are ours
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


def build_optimizer(
    model: nn.Module, params: list[nn.Parameter], cfg: TrainConfig, lr: float, method: registry.Method
) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only. With LoRA+ (`loraplus_lr_ratio`, or the method's own, as for
    `lora-plus`) PEFT's `create_loraplus_optimizer` groups: B matrices at `lr * ratio`."""
    ratio = cfg.loraplus_lr_ratio or method.train_options.get("loraplus_lr_ratio")
    if ratio:
        from deltatune.methods.loraplus import create_loraplus_optimizer

        return create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=lr,
            loraplus_lr_ratio=ratio,
            loraplus_weight_decay=cfg.weight_decay,
            **fused_kwargs(params),
        )
    decay, no_decay = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, **fused_kwargs(params))


def fused_kwargs(params: list[torch.Tensor]) -> dict:
    """`{"fused": True}` when torch's fused AdamW can take these parameters (plain float tensors, all on one CPU
    or CUDA device), else `{}`. The same update as the default per-tensor loop to float rounding, in one kernel
    over all tensors: on the CPU the default loop costs ~15 ms a step for LoRA on every linear layer of a
    125M model (168 small tensors), the fused one ~2 ms."""
    devices = {p.device for p in params}
    ok = (
        len(devices) == 1
        and next(iter(devices)).type in ("cpu", "cuda")
        and all(
            type(p.data) is torch.Tensor and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
            for p in params
        )
    )
    return {"fused": True} if ok and params else {}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Datasets,
    cfg: TrainConfig,
    ctx: Context,
    pad_token_id: int,
    autocast: Any,
    *,
    examples: list[dict[str, Any]] | None = None,
    prefix: str = "eval",
) -> dict[str, float]:
    """Eval loss; accuracy and macro F1 (classification) or perplexity (causal LM), over every rank's share.

    `examples` (default: `data.eval`) and `prefix` (`eval` or `val`, the keys' prefix) score another split."""
    classify = data.label_map is not None
    rows = data.eval if examples is None else examples
    k = len(data.label_map) if classify else 1
    totals = torch.zeros(
        2 + k * k, dtype=torch.float64
    )  # loss sum, count, confusion matrix (gold x predicted)
    model.eval()
    for ids in eval_batches(len(rows), cfg.eval_batch_size, ctx.rank, ctx.world):
        batch_rows = take(rows, [max(i, 0) for i in ids])
        batch = {key: v.to(ctx.device) for key, v in collate(batch_rows, pad_token_id).items()}
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
        return {f"{prefix}_loss": loss, f"{prefix}_perplexity": math.exp(min(loss, 50.0))}
    confusion = totals[2:].reshape(k, k)
    tp = confusion.diag()
    f1_denominator = confusion.sum(0) + confusion.sum(1)  # 2tp + fp + fn
    present = f1_denominator > 0
    f1 = float((2 * tp[present] / f1_denominator[present]).mean()) if present.any() else 0.0
    return {
        f"{prefix}_loss": loss,
        f"{prefix}_accuracy": float(tp.sum() / max(confusion.sum(), 1)),
        f"{prefix}_f1": f1,
    }


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated CUDA memory on GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident set size: VmHWM, its own since it started (or since writing 5 to
    /proc/self/clear_refs). Not `ru_maxrss` where VmHWM can be read: on Linux exec keeps the larger of the two
    processes' peaks, so a run started by a large process (a notebook, a test session: `compare` starts one
    process per method) reported that process's size as its own peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


_OPEN: list[_Metrics] = []  # runs whose trackers are open: `close_trackers` ends them if the run crashes


def close_trackers(status: str) -> None:
    """End the tracker runs of training that raised (`run` calls this): `failed`, or `interrupted`."""
    while _OPEN:
        _OPEN[-1].close(status)


def _row_step(line: str) -> float:
    """The step of a `metrics.jsonl` line; infinite for a line that is no metrics row (the half-written last line
    of a killed run, a hand edit), which a resumed run drops with the lines past its checkpoint."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return math.inf
    step = row.get("step", 0) if isinstance(row, dict) else None
    return (
        step if isinstance(step, (int, float)) and not isinstance(step, bool) and step == step else math.inf
    )


class _Metrics:
    """`metrics.jsonl`, one JSON object per line; a resumed run first drops lines past its checkpoint."""

    def __init__(self, path: str, enabled: bool, truncate_after: int, trackers: Any = None):
        self.path, self.enabled = path, enabled
        self.trackers = trackers  # `report_to`: each row also goes to these (deltatune.tracking)
        if trackers:
            _OPEN.append(self)
        if enabled and truncate_after and os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                kept = [line for line in f if _row_step(line) <= truncate_after]
            checkpoint.atomic_write_text(path, "".join(line.rstrip("\n") + "\n" for line in kept))

    def log(self, step: int, values: dict[str, float]) -> dict[str, float]:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
            if "eval_loss" in values or "val_loss" in values:
                logger.info("step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in values.items()))
            if self.trackers:
                self.trackers.log(step, values)
        return values

    def log_config(self, cfg: TrainConfig, out: str, trainable: int, total: int) -> None:
        if self.enabled and self.trackers:
            config = dataclasses.asdict(dataclasses.replace(cfg, output_dir=out))
            self.trackers.log_config(config, {"trainable_params": trainable, "total_params": total})

    def close(self, status: str) -> None:
        if self in _OPEN:
            _OPEN.remove(self)
        if self.trackers:
            self.trackers.close(status)
            self.trackers = None
