"""The benchmark's workers run and report what the tables need (timings themselves are not asserted)."""

from __future__ import annotations

import pytest

from deltatune import bench


@pytest.mark.parametrize("case", ["bound", "lora", "peft", "full", "lora-std"])
def test_train_case_reports_step_and_memory(case):
    row = bench.run_train_case(case, "tiny", steps=1, warmup=0, device="cpu", batch=2, seq=16)
    assert row["step_s"] > 0 and row["peak_mb"] > 0
    assert row["loss"] == ("standard" if case in ("peft", "lora-std") else "chunked")
    expected_trainable = {"bound": 0, "lora": 2 * 2 * (8 * 64 + 64 * 8), "peft": 2 * 2 * (8 * 64 + 64 * 8)}
    if case in expected_trainable:
        assert row["trainable_params"] == expected_trainable[case]


def test_latency_rows_cover_every_variant():
    rows = bench.run_latency("tiny", rounds=1, device="cpu", shapes=[(1, 8), (8, 8)], with_peft=True)
    cases = {(r["case"], r["batch"]) for r in rows}
    assert {(c, 8) for c in bench.LATENCY_CASES} <= cases
    assert ("mixed8", 1) not in cases
    assert all(r["ms"] > 0 for r in rows)
    assert [r["vs_base"] for r in rows if r["case"] == "base"] == [1.0, 1.0]
