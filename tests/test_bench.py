"""The benchmark's workers run and report what the tables need (timings themselves are not asserted)."""

from __future__ import annotations

import pytest

from deltatune import bench


@pytest.mark.parametrize("case", ["bound", "lora", "peft", "full", "lora-std"])
def test_memory_case_reports_peak_and_trainable_params(case):
    row = bench.run_train_memory(case, "tiny", steps=1, device="cpu", batch=2, seq=16)
    assert row["peak_mb"] > 0 and row["alone_step_s"] > 0
    assert row["loss"] == ("standard" if case in ("peft", "lora-std") else "chunked")
    expected_trainable = {"bound": 0, "lora": 2 * 2 * (8 * 64 + 64 * 8), "peft": 2 * 2 * (8 * 64 + 64 * 8)}
    if case in expected_trainable:
        assert row["trainable_params"] == expected_trainable[case]


def test_interleaved_timing_and_paired_ratios():
    timing = bench.run_train_timing(
        ["bound", "lora", "peft"], "tiny", rounds=2, device="cpu", batch=2, seq=16
    )
    assert {k: len(v) for k, v in timing["times"].items()} == {"bound": 2, "lora": 2, "peft": 2}
    memory = [
        {"case": c, "loss": "standard" if c == "peft" else "chunked", "peak_mb": m}
        for c, m in (("bound", 100.0), ("lora", 110.0), ("peft", 125.0))
    ]
    fake = {"times": {"bound": [1.0, 2.0], "lora": [1.1, 2.0], "peft": [1.2, 2.6]}}
    rows = {r["case"]: r for r in bench._train_rows(fake, memory)}
    assert rows["lora"]["x_bound"] == pytest.approx((1.1 + 1.0) / 2)
    assert rows["lora"]["throughput_vs_peft"] == pytest.approx((1.2 / 1.1 + 1.3) / 2)
    assert rows["lora"]["mem_vs_peft"] == pytest.approx(110 / 125 - 1)


def test_latency_rows_cover_every_variant():
    rows = bench.run_latency("tiny", rounds=1, device="cpu", shapes=[(1, 8), (8, 8)], with_peft=True)
    cases = {(r["case"], r["batch"]) for r in rows}
    assert {(c, 8) for c in bench.LATENCY_CASES} <= cases
    assert ("mixed8", 1) not in cases
    assert all(r["ms"] > 0 for r in rows)
    assert [r["vs_base"] for r in rows if r["case"] == "base"] == [1.0, 1.0]
