"""`deltatune compare`: the article's experiment — every method on the same model and data, side by side.

Each method trains in its own process (so its peak memory is its own) on the same data, batch and seed.
By default every choice is made on a validation split held out of the training data (stratified by label;
never the eval data, which is only reported): each method's learning rate by a short search around its
default (`lr: auto`), and its training length by early stopping on the validation loss, with the best
weights restored. `--fast` keeps fixed short runs (60 steps at each method's default rate). `--seeds N`
repeats each method with N seeds and reports mean and spread. Then, in that process, the trained result
is measured: checkpoint size, inference latency at batch 1
and 32 (LoRA also merged), and forgetting — how far the model's original behaviour moved. The parent
writes `results.json`, `report.md` and PNG plots, and prints a table with ratios against full
fine-tuning, like the article's "+96% samples/s, -57.6% memory".
"""

from __future__ import annotations

import argparse
import contextlib
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
from deltatune.vocab import IGNORE_INDEX, fix_pad_token, load_tokenizer

DEFAULT_METHODS = ("full", "top-layers", "houlsby", "pfeiffer", "lora")
PEERS = {"peft": "peft-lora"}
TASKS = ("seq-cls", "causal-lm")


# ---- validation, before anything runs -------------------------------------------------------------------


def validate(args: argparse.Namespace) -> list[str]:
    """Every problem with the request, each saying what to do (empty: fine)."""
    from deltatune.data import check_source

    errors = []
    if not args.methods:
        errors.append(f"--methods names no method; give one or more of {', '.join(registry.names())}")
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
        else:
            if args.task in TASKS:
                problem = _task_fits(path, args.task)
                if problem:
                    errors.append(problem)
            try:
                load_tokenizer(path)
            except (ValueError, OSError) as e:
                errors.append(str(e))
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
    if args.epochs is not None and not 0 < args.epochs < float("inf"):
        errors.append(f"--epochs must be a positive number, got {args.epochs}")
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--max-length", args.max_length),
        ("--latency-reps", args.latency_reps),
    ):
        if value < 1:
            errors.append(f"{flag} must be at least 1, got {value}")
    if not 0 <= args.eval_fraction < 1:
        errors.append(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
    if args.price_per_hour is not None and not 0 < args.price_per_hour < float("inf"):
        errors.append(f"--price-per-hour must be a positive number, got {args.price_per_hour}")
    for method in args.lr:
        if method not in args.methods:
            errors.append(f"--lr names {method!r}, which is not among --methods")
    # as `train` checks its `lr` (each method's run found it only when it came to train)
    bad = {m: lr for m, lr in args.lr.items() if isinstance(lr, float) and not 0 < lr <= 10}
    if bad:
        errors.append(
            "--lr must be positive and at most 10 (AdamW's are usually 1e-5 to 1e-2), got "
            + ", ".join(f"{m}={lr:g}" for m, lr in bad.items())
        )
    errors += tracking.check(getattr(args, "report_to", None))
    if not 0 <= args.val_fraction < 1:
        errors.append(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.seeds < 1:
        errors.append(f"--seeds must be at least 1, got {args.seeds}")
    from deltatune.train.config import MAX_SEED

    if not 0 <= args.seed <= MAX_SEED - max(args.seeds - 1, 0):
        errors.append(
            f"--seed must be an integer from 0 to {MAX_SEED} (2**32 - 1)"
            + (f" less --seeds - 1 ({args.seeds - 1})" if args.seeds > 1 else "")
            + f", got {args.seed}"
        )
    if args.patience < 1:
        errors.append(f"--patience must be at least 1, got {args.patience}")
    needs_split = args.early_stopping or any(v == "auto" for v in args.lr.values())
    if needs_split and not args.val_fraction:
        errors.append(
            "--val-fraction 0 leaves nothing to choose the lr or the length on: give --lr default and --steps, or --fast"
        )
    if "peft-lora" in args.methods:
        try:
            import peft  # noqa: F401
        except ImportError:
            errors.append("--peers peft: peft is not installed (pip install peft)")
    from deltatune.checkpoint import unwritable

    if not errors and not getattr(args, "worker", None) and (why := unwritable(args.out)):
        errors.append(f"--out {args.out}: {why}; pick a folder the results can be written in")
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


def _round_robin(fns: dict[str, Any], reps: int) -> dict[str, tuple[float, float, float]]:
    """(25th percentile, median, 75th percentile) ms of each function, timed in turns so that they all see
    the same machine noise."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps + 1):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            if rep:  # the first round warms up
                times[key].append(time.perf_counter() - start)
    out = {}
    for key, values in times.items():
        q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
        out[key] = (q[0] * 1000, statistics.median(values) * 1000, q[2] * 1000)
    return out


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
            "eval_at_start": spec.get("eval_at_start", True),
            "progress": False,
            "val_fraction": spec.get("val_fraction", 0.2),
            "early_stopping": spec.get("early_stopping", False),
            "patience": spec.get("patience", 3),
            "method_args": spec.get("method_args") or {},
            "report_to": spec.get("report_to") or [],
        }
    )
    wrap = _peft_wrap if method == "peft-lora" else None
    baseline_mb = _rss_mb()
    cuda_before_mb = torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    summary = run(cfg, overwrite=True, wrap=wrap, on_progress=_emit if spec["progress"] else None)
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
            "total_steps",
            "lr",
            "lr_chosen_by",
            "lr_search",
            "validation",
            "evaluated_on",
            "stopped_early",
            "best_step",
            "val_loss",
            "val_accuracy",
            "val_curve",
            "step_time_s",
            "global_batch",
            "eval_rows",
        )
        if k in summary
    }
    if "before" in summary:  # the untrained model (the new head on the frozen base), on the same eval rows
        record["untrained"] = summary["before"]
    record["method_args"] = {**registry.get(train_method).args, **(spec.get("method_args") or {})}
    record["seed"] = spec["seed"]
    adapter = summary["adapter_dir"]
    record["checkpoint_bytes"] = _folder_bytes(adapter)
    # the peak is CUDA's allocated memory when the run trained on a GPU, else the process's RSS: the baseline
    # it is measured against must be of the same kind
    on_cuda = torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0
    record["memory_kind"] = "cuda" if on_cuda else "rss"
    record["baseline_mem_mb"] = cuda_before_mb if on_cuda else baseline_mb
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
        latency, spread = {}, {}
        for batch_name, batch in (("b1", b1), ("b32", b32)):
            reps = spec["latency_reps"] if batch_name == "b1" else max(3, spec["latency_reps"] // 8)
            got = _round_robin({k: (lambda m=m, b=batch: m(**b)) for k, m in variants.items()}, reps)
            for key, (p25, ms, p75) in got.items():
                name = f"base_{batch_name}" if key == "base" else f"{batch_name}{key}"
                latency[name], spread[name] = ms, [p25, p75]
    record["latency_ms"] = latency
    record["latency_iqr_ms"] = spread  # 25th and 75th percentile of the timed rounds
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

PROGRESS_PREFIX = "@deltatune-progress "
AGGREGATED = (
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "eval_f1",
    "eval_perplexity",
    "val_loss",
    "val_accuracy",
    "runtime_s",
    "samples_per_s",
    "steps_per_s",
    "peak_mem_mb",
    "lr",
    "steps",
    "best_step",
    "checkpoint_bytes",
)


def _emit(event: dict[str, Any]) -> None:
    """A worker's progress line on stdout, read by the parent's progress bar."""
    print(PROGRESS_PREFIX + json.dumps(event), flush=True)


def _run_worker(spec: dict[str, Any], on_event: Any = None) -> dict[str, Any]:
    """Run one method (one seed) in its own process; `on_event` gets its progress events as they come."""
    import tempfile

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
        "TQDM_DISABLE": "1",
    }
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: a chatty stderr can't block the worker
        proc = subprocess.Popen(
            [sys.executable, "-m", "deltatune.compare", "--worker", spec_path],
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            bufsize=1,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(PROGRESS_PREFIX) and on_event:
                with contextlib.suppress(ValueError):
                    on_event(json.loads(line[len(PROGRESS_PREFIX) :]))
        proc.wait()
        err.seek(0)
        stderr = err.read()
    if os.path.isfile(record_path):
        with open(record_path) as f:
            return json.load(f)
    tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or [
        f"exit code {proc.returncode}"
    ]
    return {"method": spec["method"], "status": "failed", "error": tail[0][-300:]}


def _worker_main(spec_path: str) -> int:
    import logging
    import traceback

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
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


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from the same method run with several seeds: each metric is the mean over the seeds that
    ran, `spread[metric]` its sample standard deviation, `per_seed[metric]` the values; latency medians are
    averaged too. Non-numeric fields come from the first seed. A single run is returned as it is."""
    ok = [r for r in runs if r.get("status") == "ok"]
    if len(runs) == 1:
        return runs[0]
    if not ok:
        return {**runs[0], "seeds": [r.get("seed") for r in runs]}
    record = dict(ok[0])
    record["seeds"] = [r.get("seed") for r in ok]
    record["failed_seeds"] = [
        {"seed": r.get("seed"), "error": r.get("error")} for r in runs if r.get("status") != "ok"
    ]
    record["per_seed"], record["spread"] = {}, {}
    for key in AGGREGATED:
        values = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
        if len(values) != len(ok):
            continue
        record[key] = statistics.fmean(values)
        record["per_seed"][key] = values
        record["spread"][key] = statistics.stdev(values) if len(values) > 1 else 0.0
    for field in ("latency_ms",):
        keys = set.intersection(*(set(r.get(field) or {}) for r in ok))
        record[field] = {k: statistics.fmean(r[field][k] for r in ok) for k in sorted(keys)}
    untrained = [r["untrained"] for r in ok if r.get("untrained")]
    if untrained:
        record["untrained"] = {
            k: statistics.fmean(u[k] for u in untrained)
            for k in untrained[0]
            if all(k in u for u in untrained)
        }
    return record


def result_line(record: dict[str, Any], task: str) -> str:
    """The line printed as a method finishes."""
    from deltatune import report

    method = record["method"]
    if record.get("status") != "ok":
        return f"{method}: FAILED: {record.get('error', '?')}"
    parts = []
    quality = report.quality_cell(record, task)
    if quality:
        where = "val" if record.get("evaluated_on") == "validation split" else "eval"
        name = "ppl" if task == "causal-lm" else "acc"
        parts.append(f"{where} {name} {quality}")
        base = (record.get("untrained") or {}).get("eval_accuracy")
        if base is not None and task != "causal-lm":
            parts[-1] += f" (untrained {100 * base:.1f}%)"
    if record.get("train_loss") is not None:
        parts.append(f"train loss {record['train_loss']:.3f}")
    if record.get("lr") is not None:
        parts.append(f"lr {record['lr']:.2g}" + (" (auto)" if record.get("lr_chosen_by") == "auto" else ""))
    steps = f"{record.get('steps', 0):.0f} steps"
    if record.get("best_step") is not None:
        steps += f", best at {record['best_step']:.0f}" + (
            " (stopped early)" if record.get("stopped_early") else " (did not stop: raise --epochs)"
        )
    parts.append(steps)
    parts.append(f"{record.get('samples_per_s', 0):.1f} samples/s")
    parts.append(f"{record.get('runtime_s', 0):.0f} s")
    return f"{method}: " + ", ".join(parts)


class _Progress:
    """A bar per method for what its worker is doing now (lr search, training), with ETA and live loss;
    plain lines when not on a terminal or with --no-progress."""

    def __init__(self, console: Any, enabled: bool):
        self.console, self.enabled, self.phase = console, enabled and console.is_terminal, None
        self.progress = None
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TextColumn("{task.fields[loss]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )

    def __enter__(self) -> _Progress:
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress:
            self.progress.stop()

    def start(self, label: str) -> None:
        self.label, self.phase, self.task, self.val = label, None, None, ""

    def __call__(self, event: dict[str, Any]) -> None:
        phase = event.get("phase", "training")
        if event["event"] == "val":
            self.val = f" val loss {event['val_loss']:.3f}"
            return
        if phase != self.phase:
            if self.progress and self.task is not None:
                self.progress.remove_task(self.task)
            self.phase, self.val = phase, ""
            if self.progress:
                self.task = self.progress.add_task(f"{self.label} {phase}", total=event["total"], loss="")
            else:
                self.console.print(f"    {phase}: {event['total']} steps at most", highlight=False)
        if self.progress:
            self.progress.update(
                self.task,
                completed=event["step"],
                loss=f"epoch {event.get('epoch', 0):.1f} loss {event['loss']:.3f}{self.val}",
            )

    def done(self) -> None:
        if self.progress and self.task is not None:
            self.progress.remove_task(self.task)
        self.task = None


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Run every method and write the results; returns the results dict. The `--out` folder is locked meanwhile
    (`checkpoint.FolderLock`): a second compare into it is refused, not interleaved with this one."""
    from deltatune import checkpoint

    os.makedirs(args.out, exist_ok=True)
    lock = checkpoint.FolderLock()
    if not lock.acquire(args.out):
        raise ConfigError(
            f"nothing was run: --out {args.out} is in use: another deltatune compare or train is writing there now; "
            "wait for it to end, or pick another --out"
        )
    try:
        return _compare(args)
    finally:
        lock.release()


def _compare(args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console

    from deltatune.builtin_data import default_eval

    console = Console(stderr=True)
    # What the eval_* numbers are measured on: only ever reported, never used to choose anything.
    eval_data = args.eval_data or (None if args.eval_fraction else default_eval(args.data))
    # Texts for the latency batches (any text of the task does).
    latency_texts = eval_data or args.data
    fast = args.fast
    seeds = [args.seed + k for k in range(args.seeds)]
    automatic = args.early_stopping or "auto" in args.lr.values()
    split_used = bool(args.val_fraction) and (automatic or (eval_data is None and not args.eval_fraction))
    if split_used:
        console.print(
            f"validation split: {args.val_fraction:.0%} of {args.data}, stratified by label"
            if args.task == "seq-cls"
            else f"validation split: {args.val_fraction:.0%} of {args.data}, at random",
            highlight=False,
        )
    if eval_data is None and not args.eval_fraction:
        console.print("no eval data (--eval-data): evaluating on the validation split", highlight=False)
    records = []
    start = time.perf_counter()
    with _Progress(console, not args.no_progress) as progress:
        for i, method in enumerate(args.methods, start=1):
            default_lr = registry.get("lora" if method == "peft-lora" else method).lr
            lr = args.lr[method]
            length = (
                f"{args.steps} steps"
                if args.steps
                else f"up to {args.epochs:g} epochs, early stopping (patience {args.patience})"
                if args.early_stopping
                else f"{args.epochs:g} epochs"
            )
            lr_text = f"lr auto around {default_lr:g}" if lr == "auto" else f"lr {lr:g}"
            console.print(
                f"[bold][{i}/{len(args.methods)}] {method}[/bold]  {lr_text}, {length}, batch {args.batch_size}"
                + (f", seeds {seeds[0]}..{seeds[-1]}" if len(seeds) > 1 else ""),
                highlight=False,
            )
            runs = []
            for seed in seeds:
                spec = {
                    "method": method,
                    "out": os.path.join(args.out, method)
                    if len(seeds) == 1
                    else os.path.join(args.out, method, f"seed-{seed}"),
                    "model": args.model,
                    "task": args.task,
                    "data": args.data,
                    "eval_data": args.eval_data,
                    "eval_fraction": args.eval_fraction,
                    "eval_source": latency_texts,
                    "reference_data": args.reference_data,
                    "max_length": args.max_length,
                    "batch_size": args.batch_size,
                    "steps": args.steps,
                    "epochs": args.epochs,
                    "lr": lr,
                    "seed": seed,
                    "progress": not args.no_progress,
                    "latency_reps": args.latency_reps,
                    "val_fraction": args.val_fraction if split_used else 0.0,
                    "early_stopping": args.early_stopping,
                    "patience": args.patience,
                    "report_to": tracking.as_list(args.report_to),
                }
                progress.start(method if len(seeds) == 1 else f"{method} seed {seed}")
                record = _run_worker(spec, progress)
                progress.done()
                if method in getattr(args, "lr_default", ()) and record.get("lr_chosen_by") == "given":
                    record["lr_chosen_by"] = "default"  # the worker's train run was handed it as a number
                record["method"], record["run_dir"] = method, os.path.relpath(spec["out"], args.out)
                runs.append(record)
            record = aggregate(runs)
            if args.price_per_hour is not None and record.get("runtime_s") is not None:
                record["cost"] = record["runtime_s"] / 3600 * args.price_per_hour
            records.append(record)
            style = "red" if record.get("status") != "ok" else "green"
            console.print(f"    [{style}]{result_line(record, args.task)}[/{style}]", highlight=False)
    results = {
        "model": args.model,
        "task": args.task,
        "dataset": args.data,
        "settings": {
            "mode": "fast" if fast else "tuned",
            "steps": args.steps,
            "epochs": args.epochs,
            "early_stopping": args.early_stopping,
            "patience": args.patience if args.early_stopping else None,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "seeds": seeds,
            "max_length": args.max_length,
            "eval_data": eval_data,
            "eval_fraction": args.eval_fraction or None,
            "evaluated_on": eval_data
            or (
                f"{args.eval_fraction:.0%} of {args.data}, held out"
                if args.eval_fraction
                else "validation split"
            ),
            "validation": {"fraction": args.val_fraction, "of": args.data} if split_used else None,
            "reference_data": args.reference_data,
            "lr": {r["method"]: r.get("lr") for r in records},
            "lr_auto": [r["method"] for r in records if r.get("lr_chosen_by") == "auto"],
            "price_per_hour": args.price_per_hour,
        },
        "total_runtime_s": time.perf_counter() - start,
        "methods": records,
    }
    from deltatune import checkpoint, report
    from deltatune.errors import DeltatuneError

    results_path = os.path.join(args.out, "results.json")
    try:
        checkpoint.atomic_write_text(results_path, json.dumps(results, indent=2))
    except OSError as e:
        raise DeltatuneError(
            f"every method ran, but {results_path} could not be written ({checkpoint.write_failure(e, args.out)}); "
            f"each method's run folder in {args.out} holds its summary.json"
        ) from e
    try:
        report.write(results, args.out)
    except OSError as e:  # a report.md or a plot that is a folder, a full disk, ...
        raise DeltatuneError(
            f"the results are in {results_path}, but the report and plots could not be written "
            f"({checkpoint.write_failure(e, args.out)}); fix that, then make them from results.json with "
            "deltatune.report.write(results, out) without running the methods again"
        ) from e
    report.print_table(results)
    console.print(
        f"\ntotal {results['total_runtime_s'] / 60:.1f} min; results: {os.path.join(args.out, 'results.json')}, "
        f"report: {os.path.join(args.out, 'report.md')}, plots: {args.out}/*.png",
        highlight=False,
    )
    return results


def _lr_overrides(text: str) -> dict[str, float | str]:
    """`lora=1e-3,full=auto` -> {"lora": 1e-3, "full": "auto"}; a value without a method applies to all
    (`--lr auto`, `--lr default`, `--lr 1e-4`)."""
    out: dict[str, float | str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            name, value = "*", name
        if value in ("auto", "default"):
            out[name] = value
            continue
        try:
            out[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--lr takes a rate, 'auto' or 'default', for all methods or per method "
                f"(lora=1e-3,full=auto); got {part!r}"
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
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="a fixed number of optimizer steps per method (no early stopping)",
    )
    parser.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="passes over the training data: the most with early stopping (default 15), else exactly",
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=3,
        help="early stopping: epochs without a better validation loss (default 3)",
    )
    parser.add_argument(
        "--no-early-stopping", action="store_true", help="train all --epochs, keep the last weights"
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="fraction of --data held out (stratified) for choosing lr and length, never trained on (default 0.2)",
    )
    parser.add_argument(
        "--fast",
        action="store_true",
        help="the quick look: 60 steps per method at its default lr, no search, no early stopping",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="run each method with this many seeds; mean and spread (default 1)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example (default 64)")
    parser.add_argument(
        "--lr",
        type=_lr_overrides,
        default={},
        help="learning rates: auto (default: searched per method on the validation split), default (each "
        "method's own), a number, or per method: lora=1e-3,full=auto",
    )
    parser.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
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


def resolve(args: argparse.Namespace) -> list[str]:
    """Turn parsed options into what `compare` runs (method list, run length, early stopping, each method's
    learning rate) and return every problem with them (empty when they are good). Used by `main` and by the
    web board's launch form, so that both run and refuse exactly the same things."""
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.methods += [PEERS[p] for p in filter(None, args.peers.split(",")) if p in PEERS]
    unknown_peers = [p for p in filter(None, args.peers.split(",")) if p not in PEERS]
    if args.fast and args.steps is None and args.epochs is None:
        args.steps = 60
    if args.steps is None and args.epochs is None:
        args.epochs = 15.0
    args.early_stopping = not args.fast and args.steps is None and not args.no_early_stopping
    every = args.lr.pop("*", None)
    args.lr_default = set()  # the methods that run at their registry default (`--lr default`, `--fast`)
    for method in args.methods:
        value = args.lr.get(method, every)
        if value == "default" or (value is None and args.fast):
            args.lr.pop(method, None)
            value = registry.get("lora" if method == "peft-lora" else method).lr
            args.lr_default.add(method)
        args.lr[method] = value if value is not None else "auto"
    return validate(args) + [f"unknown peer {p!r}; the peer is 'peft'" for p in unknown_peers]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return _worker_main(args.worker)
    errors = resolve(args)
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
