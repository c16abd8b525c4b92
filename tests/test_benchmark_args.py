"""The benchmark scripts refuse settings out of range up front, with argparse's one-line error naming the flag.

Each case below ended, before, in a traceback (often after the model was built or the benchmark had run: an
`--out` that can't be written was tried only at the end), or started a long run on meaningless settings. The
scripts' `main` is called in this process with the case's argv: only the parsing and the checks run.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")

# (script, argv, what stderr says); {file} is an existing regular file, {dir} an existing folder
CASES = [
    ("attach_cost", ["--adapters", "2", "--loaded", "1"], "--loaded must be at least 2"),
    ("attach_cost", ["--adapters", "-1", "--loaded", "-5"], "--loaded must be at least 2"),
    ("attach_cost", ["--cycles", "0"], "--cycles must be at least 1, got 0"),
    ("lr_sweep", ["--methods", "lora,bogus"], "--methods: unknown 'bogus'; choose from full, top-layers"),
    ("lr_sweep", ["--methods", ""], "--methods: unknown ''"),
    ("lr_sweep", ["--methods", "lora", "--steps", "0"], "--steps must be at least 1, got 0"),
    ("lr_sweep", ["--out", "/proc/x/y.json"], "--out /proc/x/y.json: can't write into /proc/x"),
    ("lr_sweep", ["--out", "{file}/y.json"], "is a file, not a folder"),
    ("lr_sweep", ["--out", "{dir}"], "is a folder; give the name of a file to write"),
    ("dora_norms", ["--rounds", "0"], "--rounds must be at least 1, got 0"),
    ("dora_norms", ["--size", "7b"], "--size '7b': llama has tiny, 125m"),
    ("dora_norms", ["--out", "{dir}"], "is a folder; give the name of a file to write"),
    ("quant_memory", ["--rounds", "0"], "--rounds must be at least 1, got 0"),
    ("quant_memory", ["--steps", "0"], "--steps must be at least 1, got 0"),
    ("quant_memory", ["--batch", "-2"], "--batch must be at least 1, got -2"),
    ("quant_memory", ["--threads", "0"], "--threads must be at least 1, got 0"),
    ("quant_memory", ["--seq", "1"], "--seq must be from 2"),
    ("quant_memory", ["--seq", "4096"], "to 2048 (the model's positions), got 4096"),
    ("quant_memory", ["--case", "bogus"], "argument --case: invalid choice: 'bogus'"),
    ("quant_memory", ["--out", "/proc/x/y.json"], "--out /proc/x/y.json: can't write into /proc/x"),
    ("quant_memory", ["--out", "{dir}"], "is a folder; give the name of a file to write"),
    ("quant_backends", ["--cases", "fp32,bogus"], "--cases: unknown 'bogus'; choose from fp32, nf4-torchao"),
    ("quant_backends", ["--cases", ""], "--cases: unknown ''"),
    ("quant_backends", ["--one", ""], "argument --one: invalid choice: ''"),
    ("quant_backends", ["--rounds", "0"], "--rounds must be at least 1, got 0"),
    ("quant_backends", ["--steps", "0"], "--steps must be at least 1, got 0"),
    ("quant_backends", ["--threads", "-1"], "--threads must be at least 1, got -1"),
    ("quant_backends", ["--tokens", "1"], "--tokens must be at least 2"),
    ("quant_backends", ["--out", "{file}/y.json"], "is a file, not a folder"),
    (
        "data_scale",
        ["--rows", "abc"],
        "--rows must be comma-separated row counts, each 0 (skip) or more, got 'abc'",
    ),
    ("data_scale", ["--rows", "nan"], "--rows must be comma-separated row counts"),
    ("data_scale", ["--rows", "1e4,inf"], "--rows must be comma-separated row counts"),
    ("data_scale", ["--rows", "-5"], "--rows must be comma-separated row counts"),
    ("data_scale", ["--rows", "0", "--max-len", "0"], "--max-len must be at least 17"),
    ("data_scale", ["--steps", "0"], "--steps must be at least 1, got 0"),
    ("data_scale", ["--rows", "0", "--batch", "0"], "--batch must be at least 1, got 0"),
    ("data_scale", ["--rows", "0", "--throughput-rows", "-5"], "--throughput-rows must be 0 (skip) or more"),
    ("data_scale", ["--rows", "0", "--hidden", "12"], "--hidden must be a positive multiple of 8"),
    ("data_scale", ["--method", "bogus"], "--method: unknown 'bogus'; choose from full"),
    ("data_scale", ["--lr", "nan"], "--lr must be a positive number"),
    ("data_scale", ["--rows", "0", "--lr", "0"], "--lr must be a positive number"),
    (
        "data_scale",
        ["--rows", "0", "--seeds", "0,a"],
        "--seeds must be comma-separated whole numbers, got '0,a'",
    ),
    ("data_scale", ["--rows", "0", "--seeds", ""], "--seeds must be comma-separated whole numbers, got ''"),
    ("data_scale", ["--out", "/proc/x/y.json"], "--out /proc/x/y.json: can't write into /proc/x"),
    ("data_scale", ["--work", "{file}"], "is a file, not a folder; pick a folder that can be written"),
    ("serve_mixed", ["--out", "/proc/x/y.json"], "--out /proc/x/y.json: can't write into /proc/x"),
    ("serve_mixed", ["--out", "{dir}"], "is a folder; give the name of a file to write"),
    ("defaults_sweep", ["--only", ""], "--only: unknown variant(s) ''"),
    ("defaults_sweep", ["--data", "{file}", "--eval-data", "{file}", "--seeds", "a"], "--seeds must be"),
    ("defaults_sweep", ["--data", "{file}", "--eval-data", "{file}", "--seeds", ""], "--seeds must be"),
    ("defaults_sweep", ["--data", "{dir}", "--eval-data", "{file}"], "is a folder; give a JSONL file"),
    ("defaults_sweep", ["--data", "{file}", "--eval-data", "{file}", "--out", "/proc/x"], "--out /proc/x: "),
    ("defaults_sweep", ["--data", "{file}", "--eval-data", "{file}", "--out", "{file}/s"], "Not a directory"),
    ("dev_compare", ["--merge"], "--merge OUT RUN1 [RUN2 ...]"),
    ("dev_compare", ["--merge", "{dir}/out"], "--merge OUT RUN1 [RUN2 ...]"),
    (
        "dev_compare",
        ["--merge", "{dir}/out", "{dir}"],
        "has no results.json (not a `deltatune compare` output",
    ),
    ("dev_compare", ["--build-only", "--folder", "{file}/x"], "--folder {file}/x: Not a directory"),
    ("dev_compare", ["--build-only", "--folder", "/proc/x"], "--folder /proc/x: "),
]


@functools.cache
def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script,argv,message", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_benchmark_refuses_before_any_work(script, argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(BENCHMARKS)  # the scripts import their neighbours (_args, serve_load)
    monkeypatch.chdir(tmp_path)  # default outputs (quant_memory.json, fortunes-dev/) would land here
    file = tmp_path / "a-file.jsonl"
    file.write_text('{"text": "a", "label": "b"}\n')
    names = {"file": str(file), "dir": str(tmp_path)}
    argv = [a.format(**names) for a in argv]
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    main = _script(script).main
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert message.format(**names) in err and "Traceback" not in err
    assert len(err.strip().splitlines()[-1]) < 400  # one line of error after the usage


def test_an_existing_file_that_can_be_written_is_a_good_out_in_a_folder_that_takes_no_new_file(
    tmp_path, monkeypatch
):
    """`--out /dev/null` (results not kept), run as an ordinary user: /dev takes no new file, so the check of its
    folder refused it, though the scripts write --out in place (`open(path, "w")`), which works there."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    import _args

    from deltatune import checkpoint

    monkeypatch.setattr(checkpoint, "unwritable", lambda folder: "Permission denied")  # /dev, to a user
    assert _args.unwritable_out(os.devnull) is None
    new = str(tmp_path / "new.json")
    assert _args.unwritable_out(new) == (
        f"--out {new}: can't write into {tmp_path} (Permission denied); pick a folder that can be written"
    )


@pytest.mark.parametrize(
    "script",
    sorted(
        name[:-3]
        for name in os.listdir(BENCHMARKS)
        if name.endswith(".py") and "from _args import" in pathlib.Path(BENCHMARKS, name).read_text()
    ),
)
def test_scripts_find_their_helpers_under_safe_path(script, tmp_path):
    """`python -P` (or PYTHONSAFEPATH=1) leaves the script's folder off sys.path: `from _args import` failed."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-P", os.path.join(BENCHMARKS, f"{script}.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
