"""Which method settings should be the defaults? Measured on the development task, as compare trains.

Each variant is one `deltatune train` run (its own process) with exactly the settings `deltatune compare` uses by
default (`lr: auto` searched on a stratified 20% validation split of the training data, up to 15 epochs with early
stopping on validation loss, patience 3, batch 8, max length 64), changing one thing against the method's current
default: LoRA on all linear layers instead of the attention query/value, rank 16, rsLoRA scaling, warm-up, a
constant schedule; the bottleneck adapters' reduction factor. Every variant runs with each seed of `--seeds`;
the table gives validation accuracy (what a default is chosen on) and test accuracy (`--eval-data`, only
reported), mean and spread over the seeds.

    python benchmarks/dev_compare.py --build-only                 # writes fortunes-dev/{train,test}.jsonl
    python benchmarks/defaults_sweep.py --seeds 0,1,2            # every variant, 3 seeds
    python benchmarks/defaults_sweep.py --only lora,lora-all --data fortunes-held-out/train.jsonl \
        --eval-data fortunes-held-out/test.jsonl --out fortunes-held-out/sweep   # the independent check

Writes `<out>/<variant>-s<seed>/` (each run's folder, summary.json) and `<out>/sweep.json`, and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # python -P / PYTHONSAFEPATH leave it out
from _args import comma_ints, unwritable_folder  # noqa: E402

# name -> (method, method_args, other train settings), each one change against the method's default
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "full": ("full", {}, {}),
    "lora": ("lora", {}, {}),
    "lora-all": ("lora", {"target_modules": "all-linear"}, {}),
    "lora-r16": ("lora", {"r": 16, "lora_alpha": 32}, {}),
    "lora-rslora": ("lora", {"use_rslora": True}, {}),
    "lora-warmup": ("lora", {}, {"warmup_steps": 20}),
    "lora-constant": ("lora", {}, {"schedule": "constant"}),
    "lora-plus": ("lora-plus", {}, {}),
    "houlsby": ("houlsby", {}, {}),
    "houlsby-rf8": ("houlsby", {"reduction_factor": 8}, {}),
    "houlsby-rf32": ("houlsby", {"reduction_factor": 32}, {}),
    "pfeiffer": ("pfeiffer", {}, {}),
    "pfeiffer-rf8": ("pfeiffer", {"reduction_factor": 8}, {}),
    # early stopping on validation accuracy (loss breaks ties) instead of validation loss
    "full-acc": ("full", {}, {"val_metric": "accuracy"}),
    "top-layers-acc": ("top-layers", {}, {"val_metric": "accuracy"}),
    "houlsby-acc": ("houlsby", {}, {"val_metric": "accuracy"}),
    "pfeiffer-acc": ("pfeiffer", {}, {"val_metric": "accuracy"}),
    "lora-acc": ("lora", {}, {"val_metric": "accuracy"}),
    "lora-all-acc": ("lora", {"target_modules": "all-linear"}, {"val_metric": "accuracy"}),
    # the rate one grid step (x 1/3) below what `lr: auto` chose on this task, early stopping on accuracy
    "lora-acc-lr3e-3": ("lora", {}, {"val_metric": "accuracy", "lr": 3e-3}),
    "full-acc-lr1e-4": ("full", {}, {"val_metric": "accuracy", "lr": 1e-4}),
    "lora-all-acc-lr1e-3": ("lora", {"target_modules": "all-linear"}, {"val_metric": "accuracy", "lr": 1e-3}),
}


def run_one(name: str, seed: int, args: argparse.Namespace) -> dict:
    method, method_args, extra = VARIANTS[name]
    out = os.path.join(args.out, f"{name}-s{seed}")
    summary_path = os.path.join(out, "summary.json")
    if not os.path.isfile(summary_path):
        settings = {
            "model": args.model,
            "task": "seq-cls",
            "method": method,
            "data": args.data,
            "eval_data": args.eval_data,
            "max_length": 64,
            "batch_size": 8,
            "epochs": 15,
            "lr": "auto",
            "early_stopping": "true",
            "patience": 3,
            "val_fraction": 0.2,
            "seed": seed,
            "save_every": 0,
            "log_every": 5,
            "progress": "false",
            "output_dir": out,
            **extra,
        }
        overrides = [f"{k}={v}" for k, v in settings.items()]
        overrides += [
            f"method_args.{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in method_args.items()
        ]
        t0 = time.time()
        done = subprocess.run([sys.executable, "-m", "deltatune", "train", "--overwrite", *overrides])
        if done.returncode != 0:
            return {"variant": name, "seed": seed, "error": f"exit {done.returncode}"}
        print(f"{name} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    with open(summary_path) as f:
        s = json.load(f)
    return {
        "variant": name,
        "seed": seed,
        "lr": s.get("lr"),
        "val_accuracy": s.get("val_accuracy"),
        "val_loss": s.get("val_loss"),
        "eval_accuracy": s.get("eval_accuracy"),
        "best_step": s.get("best_step"),
        "steps": s.get("steps"),
        "runtime_s": s.get("runtime_s"),
        "trainable_params": s.get("trainable_params"),
    }


def _cell(values: list[float], scale: float = 100.0) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| variant | val acc % | test acc % | lr chosen | best step / steps | trainable |",
        "|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name and "error" not in r]
        if not mine:
            lines.append(f"| {name} | failed | | | | |")
            continue
        lrs = ", ".join(f"{r['lr']:g}" for r in mine if r.get("lr") is not None)
        steps = ", ".join(f"{r['best_step']}/{r['steps']}" for r in mine)
        lines.append(
            f"| {name} | {_cell([r['val_accuracy'] for r in mine])} | {_cell([r['eval_accuracy'] for r in mine])} "
            f"| {lrs} | {steps} | {mine[0]['trainable_params']:,} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fortunes-dev/train.jsonl")
    parser.add_argument("--eval-data", default="fortunes-dev/test.jsonl")
    parser.add_argument("--model", default="embedded:minilm")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--only", default=None, help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--out", default="fortunes-dev/sweep")
    args = parser.parse_args()
    names = args.only.split(",") if args.only is not None else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(
            f"--only: unknown variant(s) {', '.join(map(repr, unknown))}; choose from {', '.join(VARIANTS)}"
        )
    seeds = comma_ints(args.seeds)
    if seeds is None:
        parser.error(f"--seeds must be comma-separated whole numbers, got {args.seeds!r}")
    for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
        if os.path.isdir(path):
            parser.error(f"{flag} {path} is a folder; give a JSONL file")
        if not os.path.isfile(path):
            parser.error(f"{path} is missing: run `python benchmarks/dev_compare.py --build-only` first")
    if why := unwritable_folder(args.out, "--out"):
        parser.error(why)
    rows = [run_one(name, seed, args) for seed in seeds for name in names]
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump({"data": args.data, "eval_data": args.eval_data, "seeds": seeds, "runs": rows}, f, indent=2)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
