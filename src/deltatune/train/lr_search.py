"""`lr: auto`: a short, budgeted search for the learning rate on the validation split.

The grid is logarithmic around the method's default (`deltatune.methods.registry`): the default x 1/3, x 1 and
x 3 first; while the best rate is at an end of the grid, one more rate further out by x 3, up to
`lr_search_trials` rates. Each rate trains the same model from the same starting weights, with the same seed
and data order, for `lr_search_steps` steps (default: one epoch of the training split, 10 to 30 steps) with
the run's schedule, and is scored by its loss on the validation split (a rate whose loss became NaN or
infinite scores infinity). The lowest loss wins; the weights and the random state are put back before the
real run. Short runs favour rates that learn fast; the x 3 spacing keeps that bias to one grid step at most.
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


def search_budget(config: TrainConfig, n_train: int, world: int = 1) -> int:
    """Optimizer steps per tried rate."""
    if config.lr_search_steps:
        return config.lr_search_steps
    per_epoch = math.ceil(batches_per_epoch(n_train, config.batch_size, world) / config.grad_accum)
    return int(min(30, max(10, per_epoch)))


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
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().to("cpu", copy=True) for p in params]
    scored = dataclasses.replace(data, eval=val)
    trials: dict[float, dict[str, Any]] = {}

    def restore() -> None:
        with torch.no_grad():
            for p, saved in zip(params, start):
                p.copy_(saved.to(p.device))

    def trial(lr: float) -> None:
        restore()
        seed_everything(config.seed, config.deterministic)
        cfg = dataclasses.replace(
            config,
            lr=lr,
            max_steps=steps,
            early_stopping=False,
            eval_at_start=False,
            eval_every=0,
            save_every=0,
            progress=False,
            log_every=max(1, steps // 20),
        )
        folder = os.path.join(out, "lr_search", f"lr-{lr:.3g}")
        os.makedirs(folder, exist_ok=True)

        def progress(event: dict[str, Any]) -> None:
            if on_progress:
                on_progress({**event, "phase": f"lr search {len(trials) + 1}: {lr:.2g}"})

        try:
            summary = train_fn(
                model, scored, cfg, out=folder, ctx=ctx, pad_token_id=pad_token_id, on_progress=progress
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
        trials[lr] = row
        logger.info("lr search: lr %.3g -> val loss %.4f", lr, row["val_loss"])

    for lr in (default / FACTOR, default, default * FACTOR):
        trial(lr)
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
        trial(nxt)
    restore()
    seed_everything(config.seed, config.deterministic)
    ordered = [trials[lr] for lr in sorted(trials)]
    best = min(ordered, key=lambda r: r["val_loss"])
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
        "budget_steps": steps * len(trials),
        "scored_on": "validation loss",
        "at_grid_edge": best["lr"] in (min(trials), max(trials)),
    }
