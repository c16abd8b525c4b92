"""The serving benchmarks: serve_load's phases send the same requests; serve_mixed runs end to end."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _serve_load():
    spec = importlib.util.spec_from_file_location(
        "serve_load", os.path.join(ROOT, "benchmarks", "serve_load.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_adapter_mixes_send_the_same_requests_under_other_names():
    """The base-only, 8- and 64-adapter phases draw the same prompts and max_tokens (only `model` differs), so
    "8 adapters / base tokens/s" measures the adapters and not two different draws."""
    load = _serve_load()
    words = ["<s>", "<pad>", "</s>", "<unk>", *(f"t{i}" for i in range(4, 500))]
    plans = {
        key: load.workload(16, 2, names, words, 16, (8, 64), (0.1, 192))
        for key, names in {
            "base": ["base"],
            "8": [f"task{i}" for i in range(8)],
            "64": [f"task{i}" for i in range(64)],
        }.items()
    }
    strip = {
        k: [[{f: b[f] for f in b if f != "model"} for b in c] for c in plan] for k, plan in plans.items()
    }
    assert strip["base"] == strip["8"] == strip["64"]
    assert {b["model"] for c in plans["8"] for b in c} == {f"task{i}" for i in range(8)}
    assert {b["model"] for c in plans["base"] for b in c} == {"base"}
    lengths = [b["max_tokens"] for c in plans["base"] for b in c]
    assert len(set(lengths)) > 5 and all(8 <= n <= 64 or n == 192 for n in lengths)
    # Another number of clients is another draw.
    other = load.workload(17, 2, ["base"], words, 16)
    assert [b["prompt"] for b in other[0]] != [b["prompt"] for b in plans["base"][0]]


def test_serve_mixed_runs_and_reports_paired_rounds(tmp_path):
    """benchmarks/serve_mixed.py on a small model: every round sends the same tokens with and without adapters."""
    out = tmp_path / "mixed.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "serve_mixed.py"), "--small", "--clients", "4"]
        + ["--requests", "1", "--rounds", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "8 adapters / base tokens/s: median" in proc.stdout
    (pair,) = json.loads(out.read_text())["rounds"]
    assert pair["base"]["tokens"] == pair["8 adapters"]["tokens"] > 0
    assert pair["ratio"] > 0


def test_serve_load_refuses_settings_out_of_range_before_building_anything(monkeypatch, capsys):
    """`--clients 0` and `--requests 0` ended in a ZeroDivisionError after the model was built; `--long-share 2`
    ran a benchmark whose every request was long."""
    load = _serve_load()
    monkeypatch.setattr(load, "main_async", lambda args: pytest.fail("the benchmark started"))
    for argv, message in [
        (["--clients", "16", "0"], "--clients must each be at least 1, got [16, 0]"),
        (["--requests", "0"], "--requests must be at least 1, got 0"),
        (["--long-share", "2"], "--long-share must be from 0 to 1, got 2.0"),
    ]:  # in this process (a fresh interpreter per case took 5 s of imports)
        monkeypatch.setattr(sys, "argv", ["serve_load.py", *argv])
        with pytest.raises(SystemExit) as stopped:
            load.main()
        assert stopped.value.code == 2 and message in capsys.readouterr().err
    # the script as a user runs it
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "serve_load.py"), "--max-tokens", "9", "8"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--max-tokens LO HI must have 1 <= LO <= HI, got 9 8" in proc.stderr
    assert "serving" not in proc.stderr  # no server started
