"""The report of `deltatune compare`: a terminal table, `report.md`, and PNG plots."""

from __future__ import annotations

import json
import os
from typing import Any

PEER_COLORS = {"peft-lora": "#9467bd"}


def color(method: str) -> str:
    """A method's colour in the plots (the registry's), a peer's, or grey."""
    from deltatune.methods import registry

    if method in registry.METHODS:
        return registry.METHODS[method].color
    return PEER_COLORS.get(method, "#333333")


def _ok(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in results["methods"] if r.get("status") == "ok"]


def _reference(results: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in _ok(results) if r["method"] == "full"), None)


def _pct(value: float | None, ref: float | None) -> str:
    if value is None or not ref:
        return ""
    return f"{100 * (value / ref - 1):+.1f}%"


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def _count(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (strings), ratios against full fine-tuning where it ran."""
    ref = _reference(results)
    causal = results["task"] == "causal-lm"
    quality = "eval ppl" if causal else "eval acc"
    header = [
        "method",
        "train loss",
        "eval loss",
        quality,
        "runtime s",
        "samples/s",
        "vs full",
        "steps/s",
        "peak MB",
        "vs full",
        "trainable",
        "checkpoint",
        "latency ms b1 / b32 (b1 vs base)",
        "forgetting",
    ]
    if any("cost" in r for r in results["methods"]):
        header.append("cost")
    table = []
    for r in results["methods"]:
        if r.get("status") != "ok":
            table.append([r["method"], f"FAILED: {r.get('error', '?')}"] + [""] * (len(header) - 2))
            continue
        lat = r.get("latency_ms", {})
        latency = f"{lat.get('b1', 0):.1f} / {lat.get('b32', 0):.0f}"
        if lat.get("base_b1"):
            latency += f" ({100 * (lat['b1'] / lat['base_b1'] - 1):+.0f}%)"
        if "b1_merged" in lat:
            latency += (
                f"; merged {lat['b1_merged']:.1f} ({100 * (lat['b1_merged'] / lat['base_b1'] - 1):+.0f}%)"
            )
        forgetting = r.get("forgetting", {})
        forget = (
            f"ppl {100 * forgetting['reference_ppl_change']:+.1f}%"
            if "reference_ppl_change" in forgetting
            else f"cos {forgetting.get('embedding_cosine_distance', 0):.4f}"
        )
        if r.get("base_restored"):
            forget += ", base kept"
        q = r.get("eval_perplexity") if causal else r.get("eval_accuracy")
        row = [
            r["method"],
            f"{r['train_loss']:.4f}",
            f"{r.get('eval_loss') or 0:.4f}",
            "-" if q is None else (f"{q:.2f}" if causal else f"{100 * q:.1f}%"),
            f"{r['runtime_s']:.1f}",
            f"{r['samples_per_s']:.1f}",
            _pct(r["samples_per_s"], ref and ref["samples_per_s"]) if ref is not r else "",
            f"{r['steps_per_s']:.2f}",
            f"{r['peak_mem_mb']:.0f}",
            _pct(r["peak_mem_mb"], ref and ref["peak_mem_mb"]) if ref is not r else "",
            _count(r["trainable_params"]),
            _size(r["checkpoint_bytes"]),
            latency,
            forget,
        ]
        if "cost" in header:
            row.append(f"{r.get('cost', 0):.4f}")
        table.append(row)
    return header, table


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    header, table = rows(results)
    t = Table(title=f"deltatune compare — {results['model']} on {results['dataset']} ({results['task']})")
    for h in header:
        t.add_column(h, justify="left" if h == "method" else "right")
    for row in table:
        t.add_row(*row)
    console = Console()
    console.width = max(console.width, 190)
    console.print(t)
    for line in headlines(results):
        console.print(line)


def headlines(results: dict[str, Any]) -> list[str]:
    """The article's kind of sentence per method: "lora: +96% samples/s, -57.6% memory vs full"."""
    ref = _reference(results)
    if ref is None:
        return []
    out = []
    for r in _ok(results):
        if r is ref:
            continue
        out.append(
            f"{r['method']}: {_pct(r['samples_per_s'], ref['samples_per_s'])} samples/s, "
            f"{_pct(r['steps_per_s'], ref['steps_per_s'])} steps/s, {_pct(r['peak_mem_mb'], ref['peak_mem_mb'])} "
            f"peak memory, checkpoint {ref['checkpoint_bytes'] / max(r['checkpoint_bytes'], 1):.0f}x smaller "
            "than full fine-tuning's"
        )
    return out


def write(results: dict[str, Any], out: str) -> list[str]:
    """Write `report.md` and the PNG plots into `out`; returns the plot file names."""
    plots = plot(results, out)
    header, table = rows(results)
    settings = results["settings"]
    lines = [
        "# deltatune compare",
        "",
        f"Model `{results['model']}`, data `{results['dataset']}` ({results['task']}), "
        f"{settings['steps'] or settings['epochs']} {'steps' if settings['steps'] else 'epochs'} per method, "
        f"batch {settings['batch_size']}, seed {settings['seed']}; each method in its own process.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    lines += [""] + [f"- {h}" for h in headlines(results)]
    lines += [
        "",
        "Learning rates (each method's own default unless overridden): "
        + ", ".join(f"{m} {lr:g}" for m, lr in settings["lr"].items() if lr is not None),
        "",
        "Peak memory is the process's peak RSS on CPU (`torch.cuda.max_memory_allocated` on GPU). Latency is the "
        "median forward time at batch 1 and 32; LoRA also after merging into the base. Forgetting: the mean "
        "cosine distance of pooled embeddings of reference text before vs after fine-tuning (encoders), or the "
        'change of the reference text\'s perplexity (causal LM); "base kept" means disabling the adapter gives '
        "the base model's output exactly.",
        "",
    ]
    estimated = [r for r in _ok(results) if r.get("memory_estimate_mb") and r.get("baseline_mem_mb")]
    if estimated:
        lines += [
            "Memory against `deltatune estimate` (fp32 weights, gradients and AdamW states, activations at the "
            "padded length, no checkpointing). The measured peak is taken less the process's baseline (Python, "
            "torch, transformers imported); what remains above the estimate is the process's own overhead "
            "(the memory-mapped checkpoint, the tokenizer and data, allocator caches), about the same for "
            "every method, so differences between methods are what the estimate predicts:",
            "",
            "| method | peak RSS MB | baseline MB | peak - baseline | estimate MB | overhead MB |",
            "|---|---|---|---|---|---|",
        ]
        for r in estimated:
            used = r["peak_mem_mb"] - r["baseline_mem_mb"]
            lines.append(
                f"| {r['method']} | {r['peak_mem_mb']:.0f} | {r['baseline_mem_mb']:.0f} | {used:.0f} | "
                f"{r['memory_estimate_mb']:.0f} | {used - r['memory_estimate_mb']:.0f} |"
            )
        lines.append("")
    lines += [f"![{name}]({name})" for name in plots]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return plots


def plot(results: dict[str, Any], out: str) -> list[str]:
    """Bar charts of each metric, a latency chart and the loss curves, as PNG files in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = _ok(results)
    if not ok:
        return []
    names = [r["method"] for r in ok]
    colors = [color(n) for n in names]
    causal = results["task"] == "causal-lm"
    metrics = [
        (
            "eval_perplexity" if causal else "eval_accuracy",
            "eval perplexity (lower is better)" if causal else "eval accuracy",
            False,
        ),
        ("train_loss", "final train loss (smoothed)", False),
        ("runtime_s", "runtime (s)", False),
        ("samples_per_s", "samples / s", False),
        ("steps_per_s", "steps / s", False),
        ("peak_mem_mb", "peak memory (MB)", False),
        ("trainable_params", "trainable parameters (log)", True),
        ("checkpoint_bytes", "checkpoint size, bytes (log)", True),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (key, title, log) in zip(axes.flat, metrics):
        values = [r.get(key) or 0 for r in ok]
        bars = ax.bar(names, values, color=colors)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        if key == "eval_accuracy":
            ax.set_ylim(0, 1)
        ax.bar_label(bars, labels=[_label(v, key) for v in values], fontsize=8)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"deltatune compare — {os.path.basename(str(results['model']))} on {results['dataset']}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "metrics.png"), dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    for ax, batch in zip(axes, ("b1", "b32")):
        labels, values, cols = [], [], []
        for r, c in zip(ok, colors):
            lat = r.get("latency_ms", {})
            base = lat.get(f"base_{batch}")
            if not base:
                continue
            for key, label in ((batch, r["method"]), (f"{batch}_merged", f"{r['method']}\nmerged")):
                if key in lat:
                    labels.append(label)
                    values.append(100 * (lat[key] / base - 1))
                    cols.append(c)
        bars = ax.bar(labels, values, color=cols)
        ax.axhline(0, color="black", linewidth=1)
        ax.bar_label(bars, labels=[f"{v:+.1f}%" for v in values], fontsize=8)
        ax.set_ylabel("latency vs the base model (%)")
        ax.set_title(f"inference slow-down vs the base, batch {batch[1:]}")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.suptitle(
        "each method timed in turns with the base model in its own process (median); adapters add "
        "latency, merged LoRA does not",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(os.path.join(out, "latency.png"), dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 5))
    for r, c in zip(ok, colors):
        steps, losses = _loss_curve(os.path.join(out, r["method"], "metrics.jsonl"))
        if steps:
            ax.plot(steps, losses, label=r["method"], color=c)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (smoothed)")
    ax.set_title("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_curves.png"), dpi=90)
    plt.close(fig)
    return ["metrics.png", "latency.png", "loss_curves.png"]


def _label(value: float, key: str) -> str:
    if key == "eval_accuracy":
        return f"{100 * value:.1f}%"
    if key == "checkpoint_bytes":
        return _size(value)
    if key == "trainable_params":
        return _count(value)
    return f"{value:.3g}"


def _loss_curve(path: str) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    if not os.path.isfile(path):
        return steps, losses
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if "train_loss_smoothed" in rec:
                steps.append(rec["step"])
                losses.append(rec["train_loss_smoothed"])
    return steps, losses
