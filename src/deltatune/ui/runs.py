"""Find and read the runs under a folder: train output folders and compare folders, read-only.

A train run holds `train_config.yaml`, `metrics.jsonl`, `summary.json`, `checkpoints/`, `adapter/`; a compare
folder holds `results.json` and one train run per method. Anything half-written (a run still starting, a
last line still being appended) or foreign (a file that isn't what its name says) is listed with what could
be read and a `problems` list, never an error for the whole list.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any

import yaml

TRAIN_MARKERS = ("train_config.yaml", "metrics.jsonl", "summary.json")
RUNNING_WINDOW_S = 120.0  # a run without summary.json whose files changed this recently is taken as running
MAX_DEPTH = 4
SKIP = {"checkpoints", "adapter", "tensorboard", "wandb", "mlruns", "__pycache__", "node_modules"}


class RunNotFound(LookupError):
    pass


def resolve(root: str, rel: str) -> str:
    """The folder `rel` under `root`; refuses anything that leaves `root` (.., absolute paths, links out)."""
    root_real = os.path.realpath(root)
    try:
        path = os.path.realpath(os.path.join(root_real, rel or "."))
    except ValueError:  # a NUL in the name, which no folder can have
        raise RunNotFound(f"no run folder {rel!r}") from None
    if path != root_real and not path.startswith(root_real + os.sep):
        raise RunNotFound(f"{rel!r} is not inside the runs folder")
    if not os.path.isdir(path):
        raise RunNotFound(f"no run folder {rel!r}")
    return path


def _rel(root: str, path: str) -> str:
    rel = os.path.relpath(path, os.path.realpath(root))
    return "" if rel == "." else rel.replace(os.sep, "/")


MAX_NESTING = 32  # deeper values are dropped: no run file nests so, and the JSON encoder recurses on them


def plain(value: Any, depth: int = 0) -> Any:
    """`value` (parsed from a run's JSON or YAML) as what a JSON response can hold: NaN and infinities (which
    Python's json reads and writes) become None, YAML's bytes, dates and sets text or lists, and anything
    nested deeper than MAX_NESTING None; a file edited by hand or half-written thus never makes a 500."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int)):
        return value
    if depth >= MAX_NESTING:
        return None
    if isinstance(value, dict):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v, depth + 1) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def read_json(path: str, problems: list[str]) -> Any:
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            return plain(json.load(f))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deeply
        problems.append(f"{name} is unreadable ({type(e).__name__}: {str(e)[:120]})")
        return None


def read_yaml(path: str, problems: list[str]) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            data = plain(yaml.safe_load(f))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as e:
        problems.append(
            f"train_config.yaml is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        )
        return None
    if not isinstance(data, dict):
        problems.append("train_config.yaml is not a deltatune train config (not a mapping)")
        return None
    if not {"method", "model", "data"} & set(map(str, data)):
        problems.append("train_config.yaml is not a deltatune train config (no method, model or data)")
        return None
    return data


def read_metrics(path: str, start: int = 0) -> tuple[list[dict[str, Any]], int, int]:
    """Rows of `metrics.jsonl` from line `start` on: (rows, next line to read, lines that aren't JSON rows).

    A last line without its newline is still being written: it is left for the next read.
    """
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
    except OSError:  # missing; or a folder, which train_run reports
        return [], start, 0
    lines = text.split("\n")[:-1]  # what follows the last newline is still being written
    rows, bad = [], 0
    for line in lines[start:]:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            bad += 1
            continue
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, (int, float)) and math.isfinite(step):
            rows.append({k: plain(v) for k, v in row.items() if _finite_or_text(v)})
        else:
            bad += 1
    return rows, max(len(lines), start), bad


def _finite_or_text(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def locked_folders() -> set[str]:
    """The `dev:inode` keys of everything a process holds an `flock` on, read once from Linux's /proc/locks
    (empty where it can't be read)."""
    try:
        with open("/proc/locks") as f:
            text = f.read()
    except OSError:
        return set()
    lines = (fields for fields in map(str.split, text.splitlines()) if "FLOCK" in fields)
    return {field for fields in lines for field in fields if field.count(":") == 2}  # `maj:min:inode`


def in_use(path: str, locked: set[str] | None = None) -> bool:
    """Whether a process holds the lock `deltatune train` / `compare` take on their output folder while they write
    there (`checkpoint.FolderLock`): a run started from a terminal or another board, or resumed (its summary.json
    still says "interrupted"). Read from /proc/locks (`locked`: what `locked_folders` gave, so that a scan of many
    runs reads it once), not by taking the lock, which would make a run starting at that instant refuse its
    folder as in use; False where /proc/locks can't be read."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return key in (locked_folders() if locked is None else locked)


def _newest_mtime(path: str) -> float:
    newest = os.path.getmtime(path)
    for name in os.listdir(path):
        with contextlib.suppress(OSError):  # removed meanwhile
            newest = max(newest, os.path.getmtime(os.path.join(path, name)))
    return newest


def _checkpoints(path: str) -> list[str]:
    root = os.path.join(path, "checkpoints")
    if not os.path.isdir(root):
        return []
    # ASCII digits only: '²' and '٣' pass str.isdigit, and int() fails on the first or reads another script
    found = [n for n in os.listdir(root) if n.startswith("step-") and n[5:].isascii() and n[5:].isdigit()]
    return sorted(found, key=lambda n: int(n[5:]))


def best_metric(rows: list[dict[str, Any]], summary: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The best eval metric seen: accuracy (highest), else perplexity or loss (lowest)."""
    for key, better in (("eval_accuracy", max), ("eval_perplexity", min), ("eval_loss", min)):
        values = [(r[key], r["step"]) for r in rows if isinstance(r.get(key), (int, float))]
        if not values and summary and isinstance(summary.get(key), (int, float)):
            values = [(summary[key], summary.get("steps"))]
        if values:
            value, step = better(values, key=lambda v: v[0])
            return {"name": key, "value": value, "step": step}
    return None


def train_run(
    root: str, path: str, running: set[str] | None = None, locked: set[str] | None = None
) -> dict[str, Any]:
    """What the run list shows of one train output folder."""
    problems: list[str] = []
    config = read_yaml(os.path.join(path, "train_config.yaml"), problems) or {}
    summary = read_json(os.path.join(path, "summary.json"), problems)
    if summary is not None and not isinstance(summary, dict):
        problems.append("summary.json is not a deltatune summary")
        summary = None
    rows, _next, bad = read_metrics(os.path.join(path, "metrics.jsonl"))
    if bad:
        problems.append(f"metrics.jsonl: {bad} line(s) that aren't metrics rows were skipped")
    if os.path.isdir(os.path.join(path, "metrics.jsonl")):
        problems.append("metrics.jsonl is a folder, not a file")
    if not os.path.isfile(os.path.join(path, "train_config.yaml")):
        problems.append("no train_config.yaml")
    checkpoints = _checkpoints(path)
    mtime = _newest_mtime(path)
    if (running is not None and os.path.realpath(path) in running) or in_use(path, locked):
        status = "running"
    elif summary and summary.get("status"):
        status = str(summary["status"])
    elif time.time() - mtime < RUNNING_WINDOW_S:
        status = "running"
    elif checkpoints:
        status = "stopped"
    else:
        status = "incomplete"
    steps = max((r["step"] for r in rows), default=0)
    return {
        "path": _rel(root, path),
        "name": os.path.basename(path),
        "kind": "train",
        "status": status,
        "method": config.get("method") or (summary or {}).get("method"),
        "model": config.get("model") or (summary or {}).get("model"),
        "data": config.get("data") or (summary or {}).get("data"),
        "task": config.get("task") or (summary or {}).get("task"),
        "best": best_metric(rows, summary),
        "steps": steps,
        "total_steps": (summary or {}).get("total_steps") or config.get("max_steps") or None,
        "checkpoints": checkpoints,
        "resumable": bool(checkpoints) and status != "completed",
        "adapter": os.path.isfile(os.path.join(path, "adapter", "adapter_config.json")),
        "mtime": mtime,
        "age_s": max(0.0, time.time() - mtime),
        "problems": problems,
    }


def compare_run(
    root: str, path: str, running: set[str] | None = None, locked: set[str] | None = None
) -> dict[str, Any]:
    """What the run list shows of one compare folder."""
    problems: list[str] = []
    results = read_json(os.path.join(path, "results.json"), problems)
    if results is not None and not (isinstance(results, dict) and isinstance(results.get("methods"), list)):
        problems.append("results.json is not a deltatune compare result (no 'methods' list)")
        results = None
    methods = [r for r in (results or {}).get("methods", []) if isinstance(r, dict)]
    ok = [r for r in methods if r.get("status", "ok") == "ok"]
    best = None
    for key, better in (("eval_accuracy", max), ("eval_perplexity", min), ("eval_loss", min)):
        values = [(r[key], r.get("method")) for r in ok if isinstance(r.get(key), (int, float))]
        if values:
            value, method = better(values, key=lambda v: v[0])
            best = {"name": key, "value": value, "method": method}
            break
    mtime = _newest_mtime(path)
    sub = [n for n in sorted(os.listdir(path)) if os.path.isfile(os.path.join(path, n, "compare_spec.json"))]
    if (running is not None and os.path.realpath(path) in running) or in_use(path, locked):
        status = "running"
    elif results is not None:
        failed = len(methods) - len(ok)
        status = "completed" if not failed else f"completed, {failed} failed"
    elif time.time() - mtime < RUNNING_WINDOW_S:
        status = "running"
    else:
        status = "incomplete"
    spec: dict[str, Any] = {}
    if results is None and sub:
        spec = read_json(os.path.join(path, sub[0], "compare_spec.json"), problems) or {}
        if not isinstance(spec, dict):
            problems.append(f"{sub[0]}/compare_spec.json is not a deltatune compare spec (not an object)")
            spec = {}
    return {
        "path": _rel(root, path),
        "name": os.path.basename(path),
        "kind": "compare",
        "status": status,
        "method": ", ".join(str(r.get("method")) for r in methods) or ", ".join(sub),
        "model": (results or {}).get("model") or spec.get("model"),
        "data": (results or {}).get("dataset") or spec.get("data"),
        "task": (results or {}).get("task") or spec.get("task"),
        "best": best,
        "runs": sub,
        "mtime": mtime,
        "age_s": max(0.0, time.time() - mtime),
        "problems": problems,
    }


def kind_of(path: str) -> str | None:
    names = set(os.listdir(path))
    if "results.json" in names or any(
        os.path.isfile(os.path.join(path, n, "compare_spec.json")) for n in names if not n.startswith(".")
    ):
        return "compare"
    if names & set(TRAIN_MARKERS) or "checkpoints" in names:
        return "train"
    return None


def scan(root: str, running: set[str] | None = None) -> list[dict[str, Any]]:
    """Every run under `root` (newest first); a top-level folder holding no run is listed as `foreign`."""
    found: list[dict[str, Any]] = []
    root_real = os.path.realpath(root)
    if not os.path.isdir(root_real):
        return found
    locked = locked_folders()  # once for the whole scan

    def walk(path: str, depth: int) -> bool:
        try:
            kind = kind_of(path)
        except OSError:
            return False
        if kind == "compare":
            found.append(compare_run(root_real, path, running, locked))
            return True
        if kind == "train":
            found.append(train_run(root_real, path, running, locked))
            return True
        if depth >= MAX_DEPTH:
            return False
        any_run = False
        try:
            names = sorted(os.listdir(path))
        except OSError:
            return False
        for name in names:
            child = os.path.join(path, name)
            if name.startswith(".") or name in SKIP or not os.path.isdir(child) or os.path.islink(child):
                continue
            if walk(child, depth + 1):
                any_run = True
            elif depth == 0:
                starting = running is not None and os.path.realpath(child) in running
                found.append(
                    {
                        "path": _rel(root_real, child),
                        "name": name,
                        "kind": "starting" if starting else "foreign",
                        "status": "starting" if starting else "not a run",
                        "mtime": os.path.getmtime(child),
                        "age_s": max(0.0, time.time() - os.path.getmtime(child)),
                        "problems": []
                        if starting
                        else ["no train_config.yaml, metrics.jsonl, summary.json or results.json"],
                    }
                )
        return any_run

    walk(root_real, 0)
    found.sort(key=lambda r: -r["mtime"])
    return found


def adapters(root: str) -> list[dict[str, Any]]:
    """Adapter folders saved by train runs under `root`, with the base model each names."""
    out = []
    for run in scan(root):
        paths = []
        if run["kind"] == "train" and run.get("adapter"):
            paths.append((run["path"], os.path.join(root, run["path"], "adapter")))
        elif run["kind"] == "compare":
            for sub in run.get("runs", []):
                folder = os.path.join(root, run["path"], sub, "adapter")
                if os.path.isfile(os.path.join(folder, "adapter_config.json")):
                    paths.append((f"{run['path']}/{sub}", folder))
        for rel, folder in paths:
            problems: list[str] = []
            config = read_json(os.path.join(folder, "adapter_config.json"), problems) or {}
            if not isinstance(config, dict):
                config = {}
            out.append(
                {
                    "run": rel,
                    "path": os.path.realpath(folder),
                    "method": config.get("peft_type"),
                    "task_type": config.get("task_type"),
                    "base_model": config.get("base_model_name_or_path"),
                }
            )
    return out
