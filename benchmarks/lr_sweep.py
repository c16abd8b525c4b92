"""How the default learning rates of `deltatune compare` were chosen: a small sweep per method.

Each method trains on the embedded default (all-MiniLM-L6-v2, builtin:spam, the compare settings: 60 steps,
batch 8, max_length 64, seed 0) at a few learning rates around the usual range for that method, and the
held-out accuracy is printed. A method's default is the rate that did best here (ties: the smaller rate).
These defaults are what `deltatune compare --fast` uses and the centre of the grid that `lr: auto` (compare's
default) searches on each user's own validation split.

    python benchmarks/lr_sweep.py [--methods full,lora] [--steps 60] [--out lr_sweep.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # python -P / PYTHONSAFEPATH leave it out
from _args import unwritable_out  # noqa: E402

GRID = {
    "full": [2e-5, 5e-5, 1e-4],
    "top-layers": [1e-4, 3e-4, 1e-3],
    "houlsby": [1e-3, 3e-3, 1e-2],
    "pfeiffer": [1e-3, 3e-3, 1e-2],
    "lora": [1e-3, 3e-3, 1e-2],
    "lora-plus": [1e-4, 3e-4, 1e-3],
    "ia3": [1e-3, 3e-3, 1e-2],
    "vera": [3e-3, 1e-2, 3e-2],
    "oft": [3e-4, 1e-3, 3e-3],
    "prompt-tuning": [1e-2, 3e-2, 1e-1],
    "prefix-tuning": [3e-3, 1e-2, 3e-2],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(GRID))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="lr_sweep.json")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if unknown := [m for m in methods if m not in GRID]:
        parser.error(f"--methods: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(GRID)}")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if why := unwritable_out(args.out):
        parser.error(why)
    from deltatune.train import config_from_dict, run

    results = []
    for method in methods:
        for lr in GRID[method]:
            with tempfile.TemporaryDirectory() as out:
                cfg = config_from_dict(
                    {
                        "method": method,
                        "lr": lr,
                        "max_steps": args.steps,
                        "batch_size": 8,
                        "max_length": 64,
                        "seed": 0,
                        "output_dir": out,
                        "save_every": 0,
                        "eval_at_start": False,
                        "progress": False,
                    }
                )
                summary = run(cfg)
            # SIGTERM or Ctrl-C: the trainer saved, stopped the run and returned (with no eval metrics)
            if summary["status"] != "completed":
                sys.exit(f"lr_sweep: the {method} run at lr {lr:g} was {summary['status']}; nothing written")
            row = {
                "method": method,
                "lr": lr,
                "eval_accuracy": summary["eval_accuracy"],
                "eval_loss": summary["eval_loss"],
                "train_loss": summary["train_loss"],
            }
            results.append(row)
            print(
                f"{method:<11} lr {lr:<8g} eval acc {row['eval_accuracy']:.4f}  eval loss {row['eval_loss']:.4f}",
                flush=True,
            )
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
