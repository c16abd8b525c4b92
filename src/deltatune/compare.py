"""`deltatune compare`: the article's experiment — every method on the same model and data, side by side.

Each method trains in its own process (so its peak memory is its own) with the same steps, batch and
seed, and its own default learning rate (adapters and LoRA need a larger one than full fine-tuning).
Then, in that process, the trained result is measured: checkpoint size, inference latency at batch 1
and 32 (LoRA also merged), and forgetting — how far the model's original behaviour moved. The parent
writes `results.json`, `report.md` and PNG plots, and prints a table with ratios against full
fine-tuning, like the article's "+96% samples/s, -57.6% memory".
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from deltatune import tracking
from deltatune.config import ConfigError
from deltatune.embedded import DEFAULT_MODEL, resolve_model
from deltatune.methods import registry
from deltatune.vocab import IGNORE_INDEX, fix_pad_token

DEFAULT_METHODS = ("full", "top-layers", "houlsby", "pfeiffer", "lora")
PEERS = {"peft": "peft-lora"}
TASKS = ("seq-cls", "causal-lm")


# ---- validation, before anything runs -------------------------------------------------------------------


def validate(args: argparse.Namespace) -> list[str]:
    """Every problem with the request, each saying what to do (empty: fine)."""
    from deltatune.data import check_source

    errors = []
    for method in args.methods:
        if method not in registry.METHODS and method not in PEERS.values():
            try:
                registry.get(method)
            except ValueError as e:
                errors.append(str(e))
    if args.task not in TASKS:
        errors.append(f"unknown task {args.task!r}; use seq-cls or causal-lm")
    path = resolve_model(args.model)
    if os.path.sep in str(args.model) or str(args.model).startswith(".") or os.path.exists(path):
        if not os.path.isdir(path):
            errors.append(f"model folder {args.model!r} does not exist")
        elif not os.path.isfile(os.path.join(path, "config.json")):
            errors.append(f"{args.model!r} has no config.json: is it a Hugging Face model folder?")
        elif args.task in TASKS:
            problem = _task_fits(path, args.task)
            if problem:
                errors.append(problem)
    for label, source in (
        ("data", args.data),
        ("eval data", args.eval_data),
        ("reference data", args.reference_data),
    ):
        problem = check_source(source) if source else None
        if problem:
            errors.append(f"{label}: {problem}")
    if args.steps is not None and args.steps <= 0:
        errors.append(f"--steps must be positive, got {args.steps}")
    if args.epochs is not None and args.epochs <= 0:
        errors.append(f"--epochs must be positive, got {args.epochs}")
    for method in args.lr:
        if method not in args.methods:
            errors.append(f"--lr names {method!r}, which is not among --methods")
    errors += tracking.check(getattr(args, "report_to", None))
    if "peft-lora" in args.methods:
        try:
            import peft  # noqa: F401
        except ImportError:
            errors.append("--peers peft: peft is not installed (pip install peft)")
    return errors


def _task_fits(path: str, task: str) -> str | None:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    model_type = AutoConfig.from_pretrained(path).model_type
    names = (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        if task == "causal-lm"
        else MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    )
    if model_type not in names:
        other = "seq-cls" if task == "causal-lm" else "causal-lm"
        return f"a {model_type!r} model can't do task {task!r}" + (
            f"; try --task {other}"
            if model_type
            in (
                MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
                if task == "causal-lm"
                else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            )
            else ""
        )
    return None


# ---- one method, in its own process ---------------------------------------------------------------------


def _round_robin(fns: dict[str, Any], reps: int) -> dict[str, float]:
    """Median ms of each function, timed in turns so that they all see the same machine noise."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps + 1):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            if rep:  # the first round warms up
                times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def _folder_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(path, f))
        for f in os.listdir(path)
        if f.endswith((".safetensors", ".bin"))
    )


def run_method(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one method as `spec` says, then measure what it produced. Runs in a worker process."""
    import torch

    from deltatune import PeftModel
    from deltatune.data import read_rows
    from deltatune.train import config_from_dict, run

    method, out = spec["method"], spec["out"]
    train_method = "lora" if method == "peft-lora" else method
    cfg = config_from_dict(
        {
            "model": spec["model"],
            "task": spec["task"],
            "method": train_method,
            "data": spec["data"],
            "eval_data": spec["eval_data"],
            "eval_fraction": spec["eval_fraction"],
            "max_length": spec["max_length"],
            "batch_size": spec["batch_size"],
            "max_steps": spec["steps"] or None,
            "epochs": spec["epochs"] or 1.0,
            "lr": spec["lr"],
            "seed": spec["seed"],
            "output_dir": out,
            "save_every": 0,
            "log_every": 1,
            "eval_at_start": False,
            "progress": spec["progress"],
            "report_to": spec.get("report_to") or [],
        }
    )
    wrap = _peft_wrap if method == "peft-lora" else None
    baseline_mb = _rss_mb()
    summary = run(cfg, overwrite=True, wrap=wrap)
    record = {
        k: summary.get(k)
        for k in (
            "train_loss",
            "eval_loss",
            "eval_accuracy",
            "eval_f1",
            "eval_perplexity",
            "runtime_s",
            "samples_per_s",
            "steps_per_s",
            "peak_mem_mb",
            "trainable_params",
            "total_params",
            "steps",
            "lr",
        )
    }
    adapter = summary["adapter_dir"]
    record["checkpoint_bytes"] = _folder_bytes(adapter)
    record["baseline_mem_mb"] = baseline_mb
    record["memory_estimate_mb"] = _estimate_mb(spec, train_method, record)

    from transformers import AutoTokenizer

    from deltatune.tools import load_base

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    fix_pad_token(tokenizer)
    label_map = None
    if os.path.isfile(os.path.join(adapter, "label_map.json")):
        with open(os.path.join(adapter, "label_map.json")) as f:
            label_map = json.load(f)
    task_type = "SEQ_CLS" if spec["task"] == "seq-cls" else "CAUSAL_LM"
    path = resolve_model(spec["model"])

    def fresh():
        model = load_base(path, task_type, len(label_map) if label_map else None)
        fix_pad_token(tokenizer, model)
        quantize = registry.get(train_method).quantize
        if quantize:
            from deltatune.methods.quant import quantize_model

            quantize_model(model, quantize)
        return model

    reference = [r.get("text") or r.get("completion") or "" for _, r in read_rows(spec["reference_data"])][
        :64
    ]
    ref_batch = tokenizer(
        reference, return_tensors="pt", padding=True, truncation=True, max_length=spec["max_length"]
    )
    eval_texts = [
        r.get("text") or r.get("prompt", "") + r.get("completion", "")
        for _, r in read_rows(spec["eval_source"])
    ]
    eval_texts = (eval_texts * 32)[:32]
    b32 = tokenizer(
        eval_texts, return_tensors="pt", padding="max_length", truncation=True, max_length=spec["max_length"]
    )
    b1 = {k: v[:1] for k, v in b32.items()}

    base = load_base(path, task_type, len(label_map) if label_map else None)
    fix_pad_token(tokenizer, base)
    tuned = PeftModel.from_pretrained(fresh(), adapter).eval()
    with torch.no_grad():
        before = _behaviour(base, ref_batch, spec["task"])
        after = _behaviour(tuned, ref_batch, spec["task"])
        record["forgetting"] = _forgetting(before, after, spec["task"])
        keeps_base = not registry.get(train_method).in_place
        if keeps_base:
            with tuned.disable_adapter():
                disabled = _behaviour(tuned, ref_batch, spec["task"])
            reference_base = (
                before
                if not registry.get(train_method).quantize
                else _behaviour(fresh(), ref_batch, spec["task"])
            )
            record["base_restored"] = bool(torch.equal(disabled["raw"], reference_base["raw"]))
        else:
            record["base_restored"] = None
        variants = {"base": base, "": tuned}
        if registry.get(train_method).mergeable and not registry.get(train_method).in_place:
            variants["_merged"] = copy.deepcopy(tuned).merge_and_unload(dtype=torch.float32)
        latency = {}
        for batch_name, batch in (("b1", b1), ("b32", b32)):
            reps = spec["latency_reps"] if batch_name == "b1" else max(3, spec["latency_reps"] // 8)
            got = _round_robin({k: (lambda m=m, b=batch: m(**b)) for k, m in variants.items()}, reps)
            for key, ms in got.items():
                latency[f"base_{batch_name}" if key == "base" else f"{batch_name}{key}"] = ms
    record["latency_ms"] = latency
    return record


def _rss_mb() -> float:
    """The process's resident memory now (what the peak is measured against)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _estimate_mb(spec: dict[str, Any], train_method: str, record: dict[str, Any]) -> float | None:
    """`deltatune estimate`'s number for this run (fp32, AdamW states fp32, no checkpointing, padded length)."""
    from transformers import AutoConfig

    from deltatune.estimate import estimate

    config = AutoConfig.from_pretrained(resolve_model(spec["model"]))
    config = getattr(config, "text_config", config)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not (hidden and layers and heads and record.get("trainable_params")):
        return None
    method = registry.get(train_method)
    in_place = method.in_place
    base_params = record["total_params"] - (0 if in_place else record["trainable_params"])
    e = estimate(
        base_params,
        train_method,
        quantize=method.quantize,
        precision="32",
        state_bytes=4,
        checkpointing=False,
        batch=spec["batch_size"],
        seq=spec["max_length"],
        hidden=hidden,
        layers=layers,
        heads=heads,
        num_layers=method.args.get("num_layers", 2),
        trainable=record["trainable_params"],
    )
    return e.total_gb * 1e9 / 2**20


def _peft_wrap(model, peft_config):
    """PEFT's LoRA with the same settings, for the `peft-lora` peer row."""
    import peft

    fields = {k: v for k, v in peft_config.to_dict().items() if k in peft.LoraConfig.__dataclass_fields__}
    fields.pop("peft_type", None)
    fields["inference_mode"] = False
    return peft.get_peft_model(model, peft.LoraConfig(**fields))


def _behaviour(model, batch, task: str) -> dict[str, Any]:
    """What forgetting is measured on: mean-pooled hidden states (encoders) or per-token loss (causal LM)."""

    if task == "causal-lm":
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        out = model(**batch, labels=labels)
        # Prompt tuning's virtual tokens come first: the last positions are the input's.
        return {"raw": out.logits[:, -labels.shape[1] :], "loss": float(out.loss)}
    out = model(**batch, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, -batch["attention_mask"].shape[1] :]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return {"raw": pooled, "pooled": pooled, "logits": out.logits if hasattr(out, "logits") else None}


def _forgetting(before: dict[str, Any], after: dict[str, Any], task: str) -> dict[str, float]:
    import torch

    if task == "causal-lm":
        ppl_before, ppl_after = math.exp(min(before["loss"], 50)), math.exp(min(after["loss"], 50))
        return {
            "reference_ppl_before": ppl_before,
            "reference_ppl_after": ppl_after,
            "reference_ppl_change": ppl_after / ppl_before - 1,
        }
    cos = torch.nn.functional.cosine_similarity(before["pooled"], after["pooled"], dim=-1)
    return {"embedding_cosine_distance": float((1 - cos).mean())}


# ---- the parent -----------------------------------------------------------------------------------------


def _run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    os.makedirs(spec["out"], exist_ok=True)
    spec_path = os.path.join(spec["out"], "compare_spec.json")
    record_path = os.path.join(spec["out"], "record.json")
    if os.path.exists(record_path):
        os.unlink(record_path)
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = {
        **os.environ,
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONWARNINGS": "ignore",
        "TQDM_MININTERVAL": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "deltatune.compare", "--worker", spec_path],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if os.path.isfile(record_path):
        with open(record_path) as f:
            return json.load(f)
    tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or [
        f"exit code {proc.returncode}"
    ]
    return {"method": spec["method"], "status": "failed", "error": tail[0][-300:]}


def _worker_main(spec_path: str) -> int:
    import traceback

    with open(spec_path) as f:
        spec = json.load(f)
    record_path = os.path.join(spec["out"], "record.json")
    try:
        record = {"method": spec["method"], "status": "ok", **run_method(spec)}
    except Exception as e:  # reported in the table; the other methods still run
        traceback.print_exc()
        record = {"method": spec["method"], "status": "failed", "error": f"{type(e).__name__}: {e}"[:500]}
    with open(record_path, "w") as f:
        json.dump(record, f, indent=2)
    return 0 if record["status"] == "ok" else 1


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Run every method and write the results; returns the results dict."""
    from rich.console import Console

    console = Console(stderr=True)
    os.makedirs(args.out, exist_ok=True)
    eval_source = args.eval_data or (
        f"{args.data}:eval" if args.data.startswith("builtin:") and not args.eval_fraction else args.data
    )
    records = []
    start = time.perf_counter()
    for i, method in enumerate(args.methods, start=1):
        lr = args.lr.get(method, registry.get("lora" if method == "peft-lora" else method).lr)
        console.print(
            f"[bold][{i}/{len(args.methods)}] {method}[/bold]  lr {lr:g}, {args.steps or args.epochs} "
            f"{'steps' if args.steps else 'epochs'}, batch {args.batch_size}"
        )
        spec = {
            "method": method,
            "out": os.path.join(args.out, method),
            "model": args.model,
            "task": args.task,
            "data": args.data,
            "eval_data": args.eval_data,
            "eval_fraction": args.eval_fraction,
            "eval_source": eval_source,
            "reference_data": args.reference_data,
            "max_length": args.max_length,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "epochs": args.epochs,
            "lr": lr,
            "seed": args.seed,
            "progress": not args.no_progress,
            "latency_reps": args.latency_reps,
            "report_to": tracking.as_list(args.report_to),
        }
        record = _run_worker(spec)
        record["method"] = method
        if args.price_per_hour is not None and record.get("runtime_s") is not None:
            record["cost"] = record["runtime_s"] / 3600 * args.price_per_hour
        records.append(record)
        status = "[red]failed[/red]: " + record.get("error", "") if record.get("status") != "ok" else "done"
        console.print(f"    {status}")
    results = {
        "model": args.model,
        "task": args.task,
        "dataset": args.data,
        "settings": {
            "steps": args.steps,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "max_length": args.max_length,
            "eval_data": eval_source,
            "reference_data": args.reference_data,
            "lr": {r["method"]: r.get("lr") for r in records},
            "price_per_hour": args.price_per_hour,
        },
        "total_runtime_s": time.perf_counter() - start,
        "methods": records,
    }
    from deltatune import report

    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    report.write(results, args.out)
    report.print_table(results)
    console.print(
        f"\nresults: {os.path.join(args.out, 'results.json')}, report: {os.path.join(args.out, 'report.md')}, "
        f"plots: {args.out}/*.png"
    )
    return results


def _lr_overrides(text: str) -> dict[str, float]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--lr takes method=value pairs, e.g. lora=1e-3,full=5e-5; got {part!r}"
            ) from None
    return out


def build_parser() -> argparse.ArgumentParser:
    from deltatune.cli import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="deltatune compare", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="model folder or hub name (default: embedded MiniLM)"
    )
    parser.add_argument("--data", default="builtin:spam", help="training data file or builtin:spam|quotes")
    parser.add_argument(
        "--eval-data", default=None, help="held-out data (default: the built-in eval split, or a fraction)"
    )
    parser.add_argument(
        "--eval-fraction", type=float, default=0.0, help="hold out this fraction of --data instead"
    )
    parser.add_argument("--task", default="seq-cls", help="seq-cls (default) or causal-lm")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, from {', '.join(registry.names())} (default {','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument("--peers", default="", help="'peft' adds PEFT's LoRA with the same settings")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default 60)")
    parser.add_argument("--epochs", type=float, default=None, help="passes over the data, instead of --steps")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per training step")
    parser.add_argument(
        "--max-length", type=int, default=64, help="examples are truncated to this many tokens"
    )
    parser.add_argument(
        "--lr", type=_lr_overrides, default={}, help="per-method learning rates: lora=1e-3,full=5e-5"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the data order, the split and the weights"
    )
    parser.add_argument(
        "--reference-data",
        default="builtin:quotes:eval",
        help="text whose model behaviour measures forgetting (default: built-in sample)",
    )
    parser.add_argument(
        "--price-per-hour", type=float, default=None, help="adds a cost column: runtime x price"
    )
    parser.add_argument(
        "--latency-reps", type=int, default=40, help="batch-1 forward passes timed per number"
    )
    parser.add_argument("--out", default="compare-results", help="output folder (default compare-results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--report-to",
        default="",
        help="also log each method's run to tensorboard,mlflow,wandb (comma-separated; optional extras)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return _worker_main(args.worker)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.methods += [PEERS[p] for p in filter(None, args.peers.split(",")) if p in PEERS]
    unknown_peers = [p for p in filter(None, args.peers.split(",")) if p not in PEERS]
    if args.steps is None and args.epochs is None:
        args.steps = 60
    errors = validate(args) + [f"unknown peer {p!r}; the peer is 'peft'" for p in unknown_peers]
    if errors:
        print("deltatune compare: nothing was run:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 2
    try:
        compare(args)
    except ConfigError as e:
        print(f"deltatune compare: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
