"""`lr: auto`: a short, budgeted search for the learning rate on the validation split.

The grid is logarithmic around the method's default (`deltatune.methods.registry`): the default x 1/3, x 1 and
x 3 first; while the best rate is at an end of the grid, one more rate further out by x 3, up to
`lr_search_trials` rates. Each rate trains the same model from the same starting weights, with the same seed
and data order, for `lr_search_steps` steps (default: one epoch of the training split, 10 to 30 steps): the
first steps of the real run, its lr schedule included (the schedule decays over the real run's length, not
the trial's), and is scored by its loss on the validation split (a rate whose loss became NaN or infinite
scores infinity).

Short trials favour rates that learn fast: measured on the development task (`benchmarks/defaults_sweep.py`,
README), the rate that won 20-step trials was 3x too high for every method's real run. So two finalists, the
best rate and the next lower rate tried (`lr_search_finalists`), train again from the same start for 3x as
many steps, and the lower validation loss there wins. The weights and the random state are put back before
the real run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deltatune.data import Datasets, batches_per_epoch
from deltatune.errors import TrainingError
from deltatune.train.config import TrainConfig

logger = logging.getLogger(__name__)

FACTOR = 3.0
FINAL_LENGTH = 3  # finalists train this many times the short trials' steps


def _steps_per_epoch(config: TrainConfig, n_train: int, world: int) -> int:
    return math.ceil(batches_per_epoch(n_train, config.batch_size, world) / config.grad_accum)


def search_budget(config: TrainConfig, n_train: int, world: int = 1) -> int:
    """Optimizer steps per tried rate."""
    if config.lr_search_steps:
        return config.lr_search_steps
    return int(min(30, max(10, _steps_per_epoch(config, n_train, world))))


def search_lr(
    model: nn.Module,
    data: Datasets,
    val: list[dict[str, Any]],
    config: TrainConfig,
    *,
    out: str,
    train_fn: Callable[..., dict[str, Any]],
    ctx: Any = None,
    pad_token_id: int = 0,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    default_lr: float | None = None,
) -> dict[str, Any]:
    """Try rates on `val` and return `{"lr": chosen, "trials": [{"lr", "val_loss", ...}], "steps_per_trial",
    "budget_steps", "scored_on"}`; the model's trainable weights are as they were when this returns.

    `train_fn` is `deltatune.train.loop.train` (passed in to keep the import one way).
    """
    from deltatune.methods import registry
    from deltatune.train.loop import seed_everything

    default = default_lr or registry.get(config.method).lr
    world = getattr(ctx, "world", 1)
    steps = search_budget(config, len(data.train), world)
    per_epoch = _steps_per_epoch(config, len(data.train), world)
    real_steps = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))  # the real run's schedule
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().to("cpu", copy=True) for p in params]
    scored = dataclasses.replace(data, eval=val)
    trials: dict[float, dict[str, Any]] = {}

    def restore() -> None:
        with torch.no_grad():
            for p, saved in zip(params, start):
                p.copy_(saved.to(p.device))

    def trial(lr: float, length: int = steps, stage: str = "") -> dict[str, Any]:
        restore()
        seed_everything(config.seed, config.deterministic)
        cfg = dataclasses.replace(
            config,
            lr=lr,
            max_steps=length,
            early_stopping=False,
            eval_at_start=False,
            eval_every=0,
            save_every=0,
            progress=False,
            log_every=max(1, length // 20),
        )
        folder = os.path.join(out, "lr_search", f"{stage}lr-{lr:.3g}")
        os.makedirs(folder, exist_ok=True)
        label = f"finalist {lr:.2g}" if stage else f"{len(trials) + 1}: {lr:.2g}"

        def progress(event: dict[str, Any]) -> None:
            if on_progress:
                on_progress({**event, "phase": f"lr search {label}"})

        # the loop's own "step N: eval_loss=..." line would name this validation score an eval score; the
        # line below reports it
        loop_logger = logging.getLogger("deltatune.train.loop")
        level = loop_logger.level
        loop_logger.setLevel(max(level, logging.WARNING))
        try:
            summary = train_fn(
                model,
                scored,
                cfg,
                out=folder,
                ctx=ctx,
                pad_token_id=pad_token_id,
                on_progress=progress,
                schedule_steps=max(real_steps, length),
            )
            loss = summary.get("eval_loss")
            row = {"lr": lr, "val_loss": loss if loss is not None and math.isfinite(loss) else math.inf}
            row |= {
                k.replace("eval_", "val_"): v
                for k, v in summary.items()
                if k.startswith("eval_") and k != "eval_loss"
            }
            row["train_loss"] = summary.get("train_loss")
        except TrainingError:
            row = {"lr": lr, "val_loss": math.inf, "diverged": True}
        finally:
            loop_logger.setLevel(level)
        row["steps"] = length
        logger.info("lr search: lr %.3g, %d steps -> val loss %.4f", lr, length, row["val_loss"])
        return row

    for lr in (default / FACTOR, default, default * FACTOR):
        trials[lr] = trial(lr)
    while len(trials) < config.lr_search_trials:
        best = min(trials.values(), key=lambda r: r["val_loss"])["lr"]
        low, high = min(trials), max(trials)
        if math.isinf(trials[best]["val_loss"]):
            nxt = low / FACTOR  # everything diverged: go lower
        elif best == low:
            nxt = low / FACTOR
        elif best == high:
            nxt = high * FACTOR
        else:
            break
        trials[nxt] = trial(nxt)
    ordered = [trials[lr] for lr in sorted(trials)]
    best = min(ordered, key=lambda r: r["val_loss"])
    finite = sorted((r for r in ordered if math.isfinite(r["val_loss"])), key=lambda r: r["val_loss"])
    finalists: list[dict[str, Any]] = []
    if config.lr_search_finalists >= 2 and len(finite) >= 2:
        # the best, then the rates below it (nearest first), then the others by their loss
        below = sorted((r for r in finite[1:] if r["lr"] < best["lr"]), key=lambda r: -r["lr"])
        rest = [r for r in finite[1:] if r["lr"] > best["lr"]]
        for row in ([best] + below + rest)[: config.lr_search_finalists]:
            finalists.append(trial(row["lr"], steps * FINAL_LENGTH, stage="final-"))
        finalists.sort(key=lambda r: r["lr"])
        if any(math.isfinite(r["val_loss"]) for r in finalists):
            best = min(finalists, key=lambda r: r["val_loss"])
    restore()
    seed_everything(config.seed, config.deterministic)
    if math.isinf(best["val_loss"]):
        raise TrainingError(
            f"lr: auto: every rate tried ({', '.join(f'{r:.2g}' for r in sorted(trials))}) diverged; "
            "set a smaller lr by hand"
        )
    return {
        "lr": best["lr"],
        "default_lr": default,
        "trials": ordered,
        "steps_per_trial": steps,
        "finalists": finalists,
        "steps_per_finalist": steps * FINAL_LENGTH if finalists else 0,
        "budget_steps": steps * len(trials) + steps * FINAL_LENGTH * len(finalists),
        "scored_on": "validation loss",
        "at_grid_edge": best["lr"] in (min(trials), max(trials)),
    }
