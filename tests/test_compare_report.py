"""What `deltatune compare` says: seeds aggregated, nothing shown for what wasn't measured, findings and
captions computed from the numbers (with noise), a table that fits a narrow terminal; one small end-to-end
run with several seeds and no eval data."""

from __future__ import annotations

import io
import json
import statistics

import pytest
from rich.console import Console
from tiny_models import bert_cls, save_with_tokenizer

from deltatune import compare, report


def _record(method, acc, sps=100.0, **extra):
    return {
        "method": method,
        "status": "ok",
        "eval_accuracy": acc,
        "eval_loss": 0.3,
        "train_loss": 0.2,
        "samples_per_s": sps,
        "steps_per_s": sps / 8,
        "runtime_s": 10.0,
        "peak_mem_mb": 900.0,
        "trainable_params": 1000,
        "total_params": 10000,
        "checkpoint_bytes": 4000,
        "eval_rows": 300,
        "latency_ms": {"b1": 10.0, "base_b1": 10.0, "b32": 100.0, "base_b32": 100.0},
        **extra,
    }


def _results(records, task="seq-cls", **settings):
    return {
        "model": "m",
        "task": task,
        "dataset": "d",
        "settings": {
            "batch_size": 8,
            "seed": 0,
            "steps": 60,
            "epochs": None,
            "lr": {},
            "evaluated_on": "e.jsonl",
        }
        | settings,
        "methods": records,
    }


def test_seeds_aggregate_to_mean_and_sample_std():
    runs = [
        _record("lora", acc, sps, seed=seed, lr=lr, latency_ms={"b1": b1, "base_b1": 10.0})
        for seed, acc, sps, lr, b1 in (
            (0, 0.80, 100.0, 1e-3, 11.0),
            (1, 0.90, 110.0, 3e-3, 13.0),
            (2, 0.85, 90.0, 1e-3, 12.0),
        )
    ]
    agg = compare.aggregate(runs)
    assert agg["seeds"] == [0, 1, 2] and agg["failed_seeds"] == []
    assert agg["eval_accuracy"] == pytest.approx(0.85)
    assert agg["spread"]["eval_accuracy"] == pytest.approx(statistics.stdev([0.8, 0.9, 0.85]))
    assert agg["per_seed"]["samples_per_s"] == [100.0, 110.0, 90.0] and agg["samples_per_s"] == pytest.approx(
        100
    )
    assert agg["lr"] == pytest.approx(5e-3 / 3) and agg["latency_ms"]["b1"] == pytest.approx(12.0)
    assert report.quality_cell(agg, "seq-cls") == "85.0 ± 5.0%"
    # a failed seed is left out of the mean and listed
    failed = {"method": "lora", "status": "failed", "error": "boom", "seed": 3}
    agg = compare.aggregate(runs[:2] + [failed])
    assert agg["eval_accuracy"] == pytest.approx(0.85) and agg["failed_seeds"] == [
        {"seed": 3, "error": "boom"}
    ]
    assert compare.aggregate([runs[0]]) is runs[0]  # one seed: as it was


def test_nothing_unmeasured_is_shown_as_zero():
    r = _record("lora", None)
    for key in ("eval_accuracy", "eval_loss", "train_loss", "latency_ms"):
        r.pop(key)
    header, table = report.rows(_results([r]))
    row = dict(zip(header, table[0]))
    assert row["eval acc"] == "-" and row["eval loss"] == "-" and row["train loss"] == "-"
    assert row["latency b1 vs base"] == "-"
    assert not any(cell.startswith(("0.0", "0%", "0.0%")) for cell in table[0])
    on_val = report.rows(_results([_record("lora", 0.9)], evaluated_on="validation split"))[0]
    assert "val acc" in on_val and "eval acc" not in on_val


def test_findings_say_within_noise_only_when_it_is():
    full = _record("full", 0.900, step_time_s={"p25": 0.10, "median": 0.11, "p75": 0.12}, global_batch=8)
    # 300 eval rows: the standard error of each accuracy is ~1.7 points, of the difference ~2.4
    close = _record("lora", 0.895, step_time_s={"p25": 0.11, "median": 0.115, "p75": 0.13}, global_batch=8)
    far = _record("houlsby", 0.70, step_time_s={"p25": 0.03, "median": 0.035, "p75": 0.04}, global_batch=8)
    lines = report.findings(_results([full, close, far]))
    assert lines[0].startswith("lora") and "accuracy -0.5 points (within noise)" in lines[0]
    assert "samples/s (within noise)" in lines[0]
    assert "accuracy -20.0 points (beyond noise)" in lines[1] and "samples/s (within noise)" not in lines[1]
    # with seeds, the seeds' spread is the noise
    seeded = dict(close, seeds=[0, 1, 2], spread={"eval_accuracy": 0.0001}, eval_accuracy=0.85)
    full_seeded = dict(full, seeds=[0, 1, 2], spread={"eval_accuracy": 0.0001})
    assert "(beyond noise)" in report.findings(_results([full_seeded, seeded]))[0]


def test_captions_and_axes_come_from_the_numbers():
    full, lora, houlsby = _record("full", 0.91), _record("lora", 0.905), _record("houlsby", 0.80)
    results = _results([full, lora, houlsby])
    caption = report.accuracy_caption(results)
    assert caption.startswith("accuracy 80.0%–91.0%; best full") and "within noise of it: lora" in caption
    assert "houlsby" not in caption.split("within noise of it:")[1]
    low, high = report.value_range([0.87, 0.905, 0.91], floor=0.0, ceiling=1.0, extra=[0.43])
    assert 0.3 < low < 0.43 and 0.91 < high <= 1.0
    low, high = report.value_range([0.87, 0.905, 0.91], floor=0.0, ceiling=1.0)
    assert low > 0.8 and high < 0.95  # an 87-91% spread is not drawn on 0-1
    # latency: a change inside the timings' interquartile ranges is called noise, one outside is not
    lora["latency_ms"] |= {"b1": 10.6, "b1_merged": 10.1}
    lora["latency_iqr_ms"] = {"b1": [10.2, 11.0], "base_b1": [9.6, 10.5], "b1_merged": [9.8, 10.4]}
    houlsby["latency_ms"] |= {"b1": 13.0}
    houlsby["latency_iqr_ms"] = {"b1": [12.7, 13.4], "base_b1": [9.7, 10.3]}
    text = report.latency_caption(results, "b1")
    assert "beyond noise: houlsby +30%" in text
    assert "within noise (interquartile ranges overlap): lora +6%, lora merged +1%" in text


def test_table_fits_a_narrow_terminal():
    records = [_record(m, 0.9, method_args={"r": 8, "lora_alpha": 16}) for m in ("full", "houlsby", "lora")]
    buffer = io.StringIO()
    report.print_table(_results(records), Console(file=buffer, width=80))
    lines = buffer.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "all columns in report.md" in buffer.getvalue() and "eval acc" in buffer.getvalue()
    wide = io.StringIO()
    report.print_table(_results(records), Console(file=wide, width=250))
    assert "settings" in wide.getvalue() and "all columns" not in wide.getvalue()


def test_compare_with_seeds_and_no_eval_data(tmp_path):
    """No eval data: the validation split is what is evaluated (and said so); two seeds are aggregated."""
    import random

    rng = random.Random(0)
    data = tmp_path / "train.jsonl"
    with open(data, "w") as f:
        for i in range(24):
            label = i % 2
            words = " ".join(f"w{rng.randint(3, 40) + 40 * label}" for _ in range(rng.randint(4, 10)))
            f.write(json.dumps({"text": words, "label": ["ham", "spam"][label]}) + "\n")
    model = save_with_tokenizer(bert_cls(num_labels=2), tmp_path / "bert")
    out = tmp_path / "out"
    argv = [
        "--model",
        model,
        "--data",
        data,
        "--reference-data",
        data,
        "--methods",
        "lora",
        "--steps",
        "2",
        "--lr",
        "default",
        "--seeds",
        "2",
        "--out",
        out,
        "--no-progress",
        "--latency-reps",
        "2",
        "--batch-size",
        "4",
        "--max-length",
        "16",
    ]
    assert compare.main([str(a) for a in argv]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (
        results["settings"]["eval_data"] is None and results["settings"]["evaluated_on"] == "validation split"
    )
    (lora,) = results["methods"]
    assert lora["status"] == "ok" and lora["seeds"] == [0, 1]
    assert lora["evaluated_on"] == "validation split" and lora["validation"]["rows"] == 4
    assert lora["eval_accuracy"] == pytest.approx(statistics.fmean(lora["per_seed"]["eval_accuracy"]))
    assert "eval_accuracy" in lora["spread"] and (out / "lora" / "seed-1" / "adapter").is_dir()
    assert "val acc" in (out / "report.md").read_text()


@pytest.mark.parametrize("kind", ["rss", "cuda"])
def test_memory_table_measures_the_peak_against_a_baseline_of_its_own_kind(tmp_path, kind):
    """On a GPU the peak is CUDA's allocated memory and its baseline the CUDA memory before the run (0 here):
    subtracting the process's RSS from it gave negative 'peak - baseline' rows (seen on an H200)."""
    baseline = 0.0 if kind == "cuda" else 500.0
    records = [
        _record(m, 0.9, peak_mem_mb=peak, memory_estimate_mb=est, baseline_mem_mb=baseline, memory_kind=kind)
        for m, peak, est in (("full", 1400.0, 800.0), ("lora", 1000.0, 300.0))
    ]
    report.write(_results(records), str(tmp_path))
    text = (tmp_path / "report.md").read_text()
    header = "| method | peak CUDA allocated MB |" if kind == "cuda" else "| method | peak RSS MB |"
    assert header in text
    used = 1400 - baseline
    assert f"| full | 1400 | {baseline:.0f} | {used:.0f} | 800 | {used - 800:.0f} |" in text
