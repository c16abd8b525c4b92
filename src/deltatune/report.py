"""The report of `deltatune compare`: a terminal table that fits the terminal, `report.md`, and PNG plots.

Everything said is computed from the numbers: a metric that wasn't measured shows `-` (never 0), a difference
is called "within noise" when it is inside the measured spread (the seeds' standard deviations; with one seed
the binomial standard error of an accuracy on its eval rows; the interquartile range of repeated timings), and
plot captions are derived from the data they caption.
"""

from __future__ import annotations

import json
import math
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


def _num(value: Any, fmt: str = ".4f") -> str:
    return "-" if not isinstance(value, (int, float)) or isinstance(value, bool) else format(value, fmt)


def _spread(record: dict[str, Any], key: str) -> float | None:
    return (record.get("spread") or {}).get(key)


def quality_key(task: str) -> str:
    return "eval_perplexity" if task == "causal-lm" else "eval_accuracy"


def quality_cell(record: dict[str, Any], task: str) -> str:
    """Eval accuracy (`89.3%`, with seeds `89.3 ± 1.2%`) or perplexity; `-` when it wasn't measured."""
    key = quality_key(task)
    value = record.get(key)
    if not isinstance(value, (int, float)):
        return "-"
    spread = _spread(record, key)
    if task == "causal-lm":
        return f"{value:.2f}" + (f" ± {spread:.2f}" if spread is not None else "")
    if spread is not None:
        return f"{100 * value:.1f} ± {100 * spread:.1f}%"
    return f"{100 * value:.1f}%"


# ---- noise ----------------------------------------------------------------------------------------------
def quality_noise(record: dict[str, Any], task: str) -> float | None:
    """The standard error of a method's eval quality: the seeds' spread when there are seeds, else (accuracy)
    the binomial standard error on the eval rows. None when unknown."""
    key = quality_key(task)
    value = record.get(key)
    if not isinstance(value, (int, float)):
        return None
    spread = _spread(record, key)
    if spread is not None and len(record.get("seeds") or []) > 1:
        return spread
    n = record.get("eval_rows")
    if task != "causal-lm" and n:
        return math.sqrt(max(value * (1 - value), 1.0 / n) / n)
    return None


def within_noise(a: float, sa: float | None, b: float, sb: float | None, k: float = 2.0) -> bool | None:
    """Whether |a - b| is inside k standard errors of the difference (None: no noise estimate)."""
    if sa is None and sb is None:
        return None
    return abs(a - b) <= k * math.hypot(sa or 0.0, sb or 0.0)


def interval_overlap(a: list[float] | None, b: list[float] | None) -> bool | None:
    """Whether two [low, high] ranges (interquartile ranges of repeated timings) overlap."""
    if not a or not b:
        return None
    return a[0] <= b[1] and b[0] <= a[1]


def _speed_iqr(record: dict[str, Any]) -> list[float] | None:
    """The samples/s range from the step times' quartiles."""
    q, batch = record.get("step_time_s"), record.get("global_batch")
    if not q or not batch or not q.get("p25"):
        return None
    return [batch / q["p75"], batch / q["p25"]]


def _latency_change(record: dict[str, Any], key: str, base_key: str) -> tuple[float, bool | None] | None:
    lat, iqr = record.get("latency_ms") or {}, record.get("latency_iqr_ms") or {}
    if not lat.get(key) or not lat.get(base_key):
        return None
    change = 100 * (lat[key] / lat[base_key] - 1)
    return change, interval_overlap(iqr.get(key), iqr.get(base_key))


# ---- the table ------------------------------------------------------------------------------------------
def _settings_cell(record: dict[str, Any]) -> str:
    args = record.get("method_args") or {}
    short = {
        "r": "r",
        "lora_alpha": "α",
        "num_layers": "layers",
        "reduction_factor": "reduction",
        "use_rslora": "rslora",
        "target_modules": "targets",
    }
    parts = [f"{short[k]} {v}" for k, v in args.items() if k in short and v not in (None, False)]
    return ", ".join(parts)


def rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (strings), ratios against full fine-tuning where it ran."""
    ref = _reference(results)
    causal = results["task"] == "causal-lm"
    on_val = results["settings"].get("evaluated_on") == "validation split"
    quality = ("val" if on_val else "eval") + (" ppl" if causal else " acc")
    header = [
        "method",
        quality,
        "train loss",
        "eval loss",
        "lr",
        "steps",
        "samples/s",
        "vs full",
        "peak MB",
        "vs full",
        "trainable",
        "checkpoint",
        "latency b1 vs base",
        "forgetting",
        "settings",
    ]
    if any("cost" in r for r in results["methods"]):
        header.append("cost")
    table = []
    for r in results["methods"]:
        if r.get("status") != "ok":
            table.append([r["method"], f"FAILED: {r.get('error', '?')}"] + [""] * (len(header) - 2))
            continue
        latency = "-"
        change = _latency_change(r, "b1", "base_b1")
        if change:
            latency = f"{change[0]:+.0f}%" + ("~" if change[1] else "")
        merged = _latency_change(r, "b1_merged", "base_b1")
        if merged:
            latency += f"; merged {merged[0]:+.0f}%" + ("~" if merged[1] else "")
        forgetting = r.get("forgetting") or {}
        if "reference_ppl_change" in forgetting:
            forget = f"ppl {100 * forgetting['reference_ppl_change']:+.1f}%"
        elif "embedding_cosine_distance" in forgetting:
            forget = f"cos {forgetting['embedding_cosine_distance']:.3f}"
        else:
            forget = "-"
        if r.get("base_restored"):
            forget += ", base kept"
        lr = _num(r.get("lr"), ".2g") + (" auto" if r.get("lr_chosen_by") == "auto" else "")
        steps = _num(r.get("steps"), ".0f")
        if r.get("best_step") is not None:
            steps = f"{r['best_step']:.0f}/{steps}"
        row = [
            r["method"],
            quality_cell(r, results["task"]),
            _num(r.get("train_loss")),
            _num(r.get("eval_loss")),
            lr,
            steps,
            _num(r.get("samples_per_s"), ".1f"),
            _pct(r.get("samples_per_s"), ref and ref.get("samples_per_s")) if ref is not r else "",
            _num(r.get("peak_mem_mb"), ".0f"),
            _pct(r.get("peak_mem_mb"), ref and ref.get("peak_mem_mb")) if ref is not r else "",
            _count(r.get("trainable_params")),
            _size(r.get("checkpoint_bytes")),
            latency,
            forget,
            _settings_cell(r),
        ]
        if "cost" in header:
            row.append(_num(r.get("cost")))
        table.append(row)
    return header, table


# Columns dropped first when the terminal is narrow (the full table is always in report.md).
_DROP_ORDER = (
    "settings",
    "eval loss",
    "forgetting",
    "cost",
    "steps",
    "trainable",
    "vs full",
    "lr",
    "checkpoint",
)


def fit_columns(header: list[str], table: list[list[str]], width: int) -> list[int]:
    """Indexes of the columns to show so that the table fits `width` characters."""
    keep = list(range(len(header)))

    def needed(cols: list[int]) -> int:
        widths = [max([len(header[c])] + [len(row[c]) for row in table if len(row) > c]) for c in cols]
        return sum(widths) + 3 * len(cols) + 1

    for name in _DROP_ORDER:
        if needed(keep) <= width:
            break
        for c in [c for c in keep if header[c] == name][::-1]:
            keep.remove(c)
            if needed(keep) <= width:
                break
    return keep


def print_table(results: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    header, table = rows(results)
    failed = [row for row in table if row[1].startswith("FAILED")]
    shown = fit_columns(header, [row for row in table if row not in failed], console.width)
    t = Table(
        title=f"{os.path.basename(str(results['model']))} on {results['dataset']} ({results['task']})",
        caption="all columns in report.md" if len(shown) < len(header) else None,
    )
    for c in shown:
        t.add_column(header[c], justify="left" if header[c] in ("method", "settings") else "right")
    for row in table:
        if row in failed:
            t.add_row(row[0], *([row[1]] + [""] * (len(shown) - 2)))
        else:
            t.add_row(*(row[c] for c in shown))
    console.print(t)
    for line in findings(results):
        console.print(line, highlight=False)


def findings(results: dict[str, Any]) -> list[str]:
    """The article's kind of sentence per method against full fine-tuning, each difference marked "within
    noise" when it is."""
    ref = _reference(results)
    task = results["task"]
    out = []
    if ref is None:
        return out
    key = quality_key(task)
    for r in _ok(results):
        if r is ref:
            continue
        parts = []
        if isinstance(r.get(key), (int, float)) and isinstance(ref.get(key), (int, float)):
            if task == "causal-lm":
                diff = f"perplexity {r[key] - ref[key]:+.2f}"
            else:
                diff = f"accuracy {100 * (r[key] - ref[key]):+.1f} points"
            same = within_noise(r[key], quality_noise(r, task), ref[key], quality_noise(ref, task))
            parts.append(diff + (" (within noise)" if same else "" if same is None else " (beyond noise)"))
        if r.get("samples_per_s") and ref.get("samples_per_s"):
            same = interval_overlap(_speed_iqr(r), _speed_iqr(ref))
            parts.append(
                f"{_pct(r['samples_per_s'], ref['samples_per_s'])} samples/s"
                + (" (within noise)" if same else "")
            )
        if r.get("peak_mem_mb") and ref.get("peak_mem_mb"):
            parts.append(f"{_pct(r['peak_mem_mb'], ref['peak_mem_mb'])} peak memory")
        if r.get("checkpoint_bytes") and ref.get("checkpoint_bytes"):
            parts.append(f"checkpoint {ref['checkpoint_bytes'] / max(r['checkpoint_bytes'], 1):.0f}x smaller")
        out.append(f"{r['method']} vs full fine-tuning: " + ", ".join(parts))
    return out


headlines = findings  # the earlier name


# ---- report.md ------------------------------------------------------------------------------------------
def _how_line(results: dict[str, Any]) -> str:
    s = results["settings"]
    if s.get("steps"):
        length = f"{s['steps']} steps per method"
    elif s.get("early_stopping"):
        length = (
            f"up to {s['epochs']:g} epochs, early stopping on the validation loss (patience {s['patience']})"
        )
    else:
        length = f"{s['epochs']:g} epochs"
    seeds = s.get("seeds") or [s.get("seed")]
    seed_text = (
        f"seeds {seeds[0]}..{seeds[-1]} (mean ± standard deviation)" if len(seeds) > 1 else f"seed {seeds[0]}"
    )
    return (
        f"Model `{results['model']}`, data `{results['dataset']}` ({results['task']}), {length}, batch "
        f"{s['batch_size']}, {seed_text}; each method in its own process. Evaluated on: "
        f"{s.get('evaluated_on') or 'nothing'}."
    )


def write(results: dict[str, Any], out: str) -> list[str]:
    """Write `report.md` and the PNG plots into `out`; returns the plot file names."""
    plots = plot(results, out)
    header, table = rows(results)
    settings = results["settings"]
    lines = ["# deltatune compare", "", _how_line(results), ""]
    validation = next((r.get("validation") for r in _ok(results) if r.get("validation")), None)
    if validation:
        lines += [
            f"Validation split: {validation['rows']} of {validation['rows'] + validation['train_rows']} training "
            f"examples ({validation['fraction']:.0%}, "
            + ("stratified by label" if validation["stratified"] else "at random")
            + "), held out of training and used for every automatic choice (learning rate, early stopping)"
            + (
                "; there was no eval data, so the accuracy shown is on this split, which also chose the settings: "
                "expect it to be optimistic."
                if settings.get("evaluated_on") == "validation split"
                else f"; the eval data (`{settings.get('evaluated_on')}`) was only reported, never used to choose."
            ),
            "",
        ]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    lines += [""]
    untrained = [
        r["untrained"].get("eval_accuracy")
        for r in _ok(results)
        if (r.get("untrained") or {}).get("eval_accuracy") is not None
    ]
    if untrained:
        lines += [
            f"The untrained model (new head, frozen base) scores {100 * min(untrained):.1f}%"
            + (f"–{100 * max(untrained):.1f}%" if max(untrained) - min(untrained) > 1e-9 else "")
            + " on the same rows.",
            "",
        ]
    lines += [f"- {h}" for h in findings(results)]
    lines += [
        "",
        'Latency "~": the change is inside the interquartile range of the repeated timings (noise). Steps '
        '"best/run": early stopping kept the weights of step *best* of the *run* steps.',
        "",
    ]
    searched = [r for r in _ok(results) if r.get("lr_search")]
    if searched:
        budget = sum(r["lr_search"]["budget_steps"] for r in searched)
        lines += [
            "## Learning rates (`lr: auto`)",
            "",
            "Each rate trained the same starting weights with the same seed and data order for "
            f"{searched[0]['lr_search']['steps_per_trial']} steps and was scored by its validation loss; the grid "
            "starts at the method's default x 1/3, x 1, x 3 and extends by x 3 while the best is at an end. "
            "The two best rates (finalists) then trained again, 3x as long, and the lower validation loss there "
            f"was chosen (short trials favour rates that learn fast). Search budget: {budget} steps in all.",
            "",
            "| method | rate → validation loss | finalists, 3x the steps | chosen |",
            "|---|---|---|---|",
        ]
        for r in searched:
            s = r["lr_search"]
            tried = ", ".join(
                (
                    f"**{t['lr']:.2g} → {t['val_loss']:.3f}**"
                    if t["lr"] == s["lr"]
                    else f"{t['lr']:.2g} → {t['val_loss']:.3f}"
                )
                for t in s["trials"]
            )
            finals = ", ".join(
                (
                    f"**{t['lr']:.2g} → {t['val_loss']:.3f}**"
                    if t["lr"] == s["lr"]
                    else f"{t['lr']:.2g} → {t['val_loss']:.3f}"
                )
                for t in s.get("finalists", [])
            )
            edge = " (at the grid's edge)" if s.get("at_grid_edge") else ""
            lines.append(f"| {r['method']} | {tried} | {finals or '-'} | {s['lr']:.2g}{edge} |")
        lines.append("")
    given = {
        m: lr for m, lr in settings["lr"].items() if m not in settings.get("lr_auto", []) and lr is not None
    }
    if given:
        lines += ["Fixed learning rates: " + ", ".join(f"{m} {lr:g}" for m, lr in given.items()), ""]
    lines += [
        "Settings each method ran with: "
        + "; ".join(f"{r['method']}: {_settings_cell(r) or 'defaults'}" for r in _ok(results)),
        "",
        "Peak memory is the process's peak RSS on CPU (`torch.cuda.max_memory_allocated` on GPU). Latency is the "
        "median forward time at batch 1 and 32, timed in turns with the base model in the same process; LoRA also "
        "after merging into the base. Forgetting: the mean cosine distance of pooled embeddings of reference text "
        "before vs after fine-tuning (encoders), or the change of the reference text's perplexity (causal LM); "
        '"base kept" means disabling the adapter gives the base model\'s output exactly.',
        "",
    ]
    estimated = [
        r for r in _ok(results) if r.get("memory_estimate_mb") and r.get("baseline_mem_mb") is not None
    ]
    if estimated:
        cuda = all(r.get("memory_kind") == "cuda" for r in estimated)
        what, baseline = (
            ("CUDA allocated", "the CUDA memory allocated before the run")
            if cuda
            else ("RSS", "the process's baseline (Python, torch, transformers imported)")
        )
        lines += [
            "Memory against `deltatune estimate` (fp32 weights, gradients and AdamW states, activations at the "
            f"padded length, no checkpointing). The measured peak is taken less {baseline}; what remains "
            "above the estimate is the process's own overhead "
            "(the memory-mapped checkpoint, the tokenizer and data, allocator caches), about the same for "
            "every method, so differences between methods are what the estimate predicts:",
            "",
            f"| method | peak {what} MB | baseline MB | peak - baseline | estimate MB | overhead MB |",
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
    from deltatune.checkpoint import atomic_write_text

    atomic_write_text(os.path.join(out, "report.md"), "\n".join(lines) + "\n")  # no .tmp left on a failure
    return plots


# ---- plots ----------------------------------------------------------------------------------------------
def value_range(
    values: list[float],
    errors: list[float] | None = None,
    floor: float | None = None,
    ceiling: float | None = None,
    extra: list[float] | None = None,
) -> tuple[float, float]:
    """An axis range that shows the differences: the values (± their errors, and any reference lines) with a
    margin of a quarter of their span (at least 2% of the largest), clipped to [floor, ceiling]."""
    errors = errors or [0.0] * len(values)
    lows = [v - e for v, e in zip(values, errors)] + list(extra or [])
    highs = [v + e for v, e in zip(values, errors)] + list(extra or [])
    low, high = min(lows), max(highs)
    margin = max((high - low) / 4, 0.02 * max(abs(high), abs(low), 1e-12))
    low, high = low - margin, high + margin
    if floor is not None:
        low = max(low, floor)
    if ceiling is not None:
        high = min(high, ceiling)
    return low, high


def accuracy_caption(results: dict[str, Any]) -> str:
    """What the accuracy panel shows, from its numbers: the range, the best, and which are tied with it."""
    task = results["task"]
    key = quality_key(task)
    ok = [r for r in _ok(results) if isinstance(r.get(key), (int, float))]
    if not ok:
        return "no eval quality was measured"
    pick = min if task == "causal-lm" else max
    best = pick(ok, key=lambda r: r[key])
    tied = [
        r["method"]
        for r in ok
        if r is not best
        and within_noise(r[key], quality_noise(r, task), best[key], quality_noise(best, task))
    ]
    fmt = (lambda v: f"{v:.2f}") if task == "causal-lm" else (lambda v: f"{100 * v:.1f}%")
    text = f"{'perplexity' if task == 'causal-lm' else 'accuracy'} {fmt(min(r[key] for r in ok))}–{fmt(max(r[key] for r in ok))}; best {best['method']}"
    if tied:
        text += f", within noise of it: {', '.join(tied)}"
    elif len(ok) > 1 and quality_noise(best, task) is not None:
        text += ", ahead of the others beyond noise"
    return text


def latency_caption(results: dict[str, Any], batch: str) -> str:
    """What the latency panel shows: each change vs the base, and which are inside the timing noise."""
    noisy, clear, unknown = [], [], []
    for r in _ok(results):
        for key, label in ((batch, r["method"]), (f"{batch}_merged", f"{r['method']} merged")):
            change = _latency_change(r, key, f"base_{batch}")
            if change is None:
                continue
            bucket = unknown if change[1] is None else noisy if change[1] else clear
            bucket.append(f"{label} {change[0]:+.0f}%")
    parts = []
    if clear:
        parts.append("beyond noise: " + ", ".join(clear))
    if noisy:
        parts.append("within noise (interquartile ranges overlap): " + ", ".join(noisy))
    if unknown:
        parts.append("no spread measured: " + ", ".join(unknown))
    return "; ".join(parts) or "no latency measured"


def plot(results: dict[str, Any], out: str) -> list[str]:
    """Bar charts of each metric, a latency chart, the loss curves and the lr search, as PNG files in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = _ok(results)
    if not ok:
        return []
    names = [r["method"] for r in ok]
    colors = [color(n) for n in names]
    task = results["task"]
    causal = task == "causal-lm"
    on_val = results["settings"].get("evaluated_on") == "validation split"
    where = "validation split" if on_val else "eval data"
    metrics = [
        (
            quality_key(task),
            f"{'perplexity' if causal else 'accuracy'} on the {where}"
            + (" (lower is better)" if causal else ""),
            False,
        ),
        ("train_loss", "final train loss (smoothed)", False),
        ("runtime_s", "runtime (s)", False),
        ("samples_per_s", "samples / s (bars: step-time quartiles)", False),
        ("steps_per_s", "steps / s", False),
        ("peak_mem_mb", "peak memory (MB)", False),
        ("trainable_params", "trainable parameters (log)", True),
        ("checkpoint_bytes", "checkpoint size, bytes (log)", True),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8.5))
    for ax, (key, title, log) in zip(axes.flat, metrics):
        measured = [(n, c, r) for n, c, r in zip(names, colors, ok) if isinstance(r.get(key), (int, float))]
        if not measured:
            ax.set_title(title)
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        values = [r[key] for _, _, r in measured]
        errors = [_spread(r, key) or 0.0 for _, _, r in measured]
        yerr: Any = errors if any(errors) else None
        if key == "samples_per_s":
            ranges = [_speed_iqr(r) for _, _, r in measured]
            if all(ranges):
                yerr = [
                    [max(0.0, v - lo) for v, (lo, _) in zip(values, ranges)],
                    [max(0.0, hi - v) for v, (_, hi) in zip(values, ranges)],
                ]
        bars = ax.bar(
            [n for n, _, _ in measured], values, color=[c for _, c, _ in measured], yerr=yerr, capsize=3
        )
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        if key == quality_key(task):
            base = [(r.get("untrained") or {}).get(key) for _, _, r in measured]
            base = [b for b in base if isinstance(b, (int, float))]
            extra = []
            if base:
                ax.axhline(min(base), color="black", linestyle="--", linewidth=1)
                ax.text(
                    0.01,
                    min(base),
                    f" untrained {_label(min(base), key)}",
                    fontsize=8,
                    va="bottom",
                    transform=ax.get_yaxis_transform(),
                )
                extra = [min(base)]
            ax.set_ylim(*value_range(values, errors, floor=0.0, ceiling=None if causal else 1.0, extra=extra))
            ax.set_xlabel(accuracy_caption(results), fontsize=8, wrap=True)
        elif (
            key in ("train_loss", "samples_per_s", "steps_per_s", "peak_mem_mb", "runtime_s")
            and len(values) > 1
        ):
            ax.set_ylim(*value_range(values, errors, floor=0.0))
        ax.bar_label(bars, labels=[_label(v, key) for v in values], fontsize=8)
        ax.tick_params(axis="x", rotation=30)
    seeds = results["settings"].get("seeds") or [results["settings"].get("seed")]
    fig.suptitle(
        f"deltatune compare — {os.path.basename(str(results['model']))} on {results['dataset']}"
        + (f"; error bars: ± std over {len(seeds)} seeds" if len(seeds) > 1 else "; one seed")
        + "; axes start where the values do, not at 0"
    )
    fig.tight_layout()
    fig.savefig(os.path.join(out, "metrics.png"), dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, batch in zip(axes, ("b1", "b32")):
        labels, values, cols, err_lo, err_hi = [], [], [], [], []
        for r, c in zip(ok, colors):
            lat, iqr = r.get("latency_ms") or {}, r.get("latency_iqr_ms") or {}
            base = lat.get(f"base_{batch}")
            if not base:
                continue
            for key, label in ((batch, r["method"]), (f"{batch}_merged", f"{r['method']}\nmerged")):
                if key in lat:
                    v = 100 * (lat[key] / base - 1)
                    labels.append(label)
                    values.append(v)
                    cols.append(c)
                    lo, hi = iqr.get(key) or [lat[key], lat[key]]
                    err_lo.append(max(0.0, v - 100 * (lo / base - 1)))
                    err_hi.append(max(0.0, 100 * (hi / base - 1) - v))
        if not values:
            ax.set_axis_off()
            continue
        bars = ax.bar(labels, values, color=cols, yerr=[err_lo, err_hi], capsize=3)
        ax.axhline(0, color="black", linewidth=1)
        ax.bar_label(bars, labels=[f"{v:+.1f}%" for v in values], fontsize=8)
        ax.set_ylabel("latency vs the base model (%)")
        ax.set_title(f"inference slow-down vs the base, batch {batch[1:]}")
        ax.set_xlabel(latency_caption(results, batch), fontsize=8, wrap=True)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.suptitle(
        "median forward time, each method timed in turns with the base model in its own process; "
        "bars: interquartile range of the timings",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(os.path.join(out, "latency.png"), dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 5))
    for r, c in zip(ok, colors):
        steps, losses, val = _loss_curve(os.path.join(out, r.get("run_dir", r["method"]), "metrics.jsonl"))
        if steps:
            ax.plot(steps, losses, label=f"{r['method']} train", color=c)
        if val:
            ax.plot(
                [s for s, _ in val],
                [v for _, v in val],
                "o--",
                color=c,
                markersize=3,
                label=f"{r['method']} validation",
            )
        if r.get("best_step") is not None and not r.get("seeds"):
            ax.axvline(r["best_step"], color=c, linestyle=":", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss (smoothed) and validation loss; dotted: the step early stopping kept")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_curves.png"), dpi=90)
    plt.close(fig)
    names_out = ["metrics.png", "latency.png", "loss_curves.png"]

    searched = [(r, c) for r, c in zip(ok, colors) if r.get("lr_search")]
    if searched:
        fig, ax = plt.subplots(figsize=(9, 5))
        for r, c in searched:
            trials = [t for t in r["lr_search"]["trials"] if math.isfinite(t["val_loss"])]
            ax.plot(
                [t["lr"] for t in trials], [t["val_loss"] for t in trials], "o-", color=c, label=r["method"]
            )
            chosen = next((t for t in trials if t["lr"] == r["lr_search"]["lr"]), None)
            if chosen:
                ax.plot([chosen["lr"]], [chosen["val_loss"]], "*", color=c, markersize=14)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"validation loss after {searched[0][0]['lr_search']['steps_per_trial']} steps")
        ax.set_title("lr: auto — each method's search (star: chosen)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "lr_search.png"), dpi=90)
        plt.close(fig)
        names_out.append("lr_search.png")
    return names_out


def _label(value: float, key: str) -> str:
    if key == "eval_accuracy":
        return f"{100 * value:.1f}%"
    if key == "checkpoint_bytes":
        return _size(value)
    if key == "trainable_params":
        return _count(value)
    return f"{value:.3g}"


def _loss_curve(path: str) -> tuple[list[int], list[float], list[tuple[int, float]]]:
    steps, losses, val = [], [], []
    if not os.path.isfile(path):
        return steps, losses, val
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if "train_loss_smoothed" in rec:
                steps.append(rec["step"])
                losses.append(rec["train_loss_smoothed"])
            if "val_loss" in rec:
                val.append((rec["step"], rec["val_loss"]))
    return steps, losses, val
