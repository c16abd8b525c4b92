"""`deltatune train` / `deltatune compare` launched from the UI: checked first, then run as a subprocess.

The request is checked with the commands' own validation (`load_train_config`, `compare.validate`), so a form
with a missing model or data file gets the CLI's own message and nothing starts. A job runs the real command
line (`python -m deltatune train|compare ...`) in its own process group with its output (stdout and stderr,
progress bars included) in `<runs>/.deltatune-ui/jobs/<id>.log`; stopping it sends SIGTERM to the group, so
`train` saves a checkpoint and can be resumed, and compare's per-method workers stop with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from deltatune.errors import ConfigError

KINDS = ("train", "compare")


class JobError(ValueError):
    """The request can't start: the message is what the command line would print."""


@dataclass
class Job:
    id: str
    kind: str
    argv: list[str]
    out: str
    log_path: str
    started: float = field(default_factory=time.time)
    proc: subprocess.Popen | None = None
    returncode: int | None = None
    stopped: bool = False
    ended: float | None = None

    @property
    def status(self) -> str:
        if self.proc is not None and self.returncode is None:
            self.returncode = self.proc.poll()
            if self.returncode is not None:
                self.ended = time.time()
        if self.returncode is None:
            return "stopping" if self.stopped else "running"
        if self.stopped:
            return "stopped"
        return "completed" if self.returncode == 0 else "failed"

    def info(self) -> dict[str, Any]:
        status = self.status
        return {
            "id": self.id,
            "kind": self.kind,
            "command": "deltatune " + " ".join(_quote(a) for a in self.argv),
            "out": self.out,
            "status": status,
            "returncode": self.returncode,
            "started": self.started,
            "ended": self.ended,
        }


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _text(form: dict[str, Any], key: str) -> str:
    value = form.get(key)
    return "" if value is None else str(value).strip()


def _names(form: dict[str, Any], key: str) -> list[str]:
    """A list field of the form (`methods`, `report_to`): a list of names or one comma-separated string."""
    value = form.get(key) or []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise JobError(f"{key} must be a list of names, got {str(value)[:80]}")
    return [v.strip() for v in value if v.strip()]


def train_argv(form: dict[str, Any], runs_root: str) -> tuple[list[str], str]:
    """The `deltatune train` command line for a form, and its output folder; checked like the CLI does."""
    from deltatune.train import load_train_config

    if _text(form, "resume"):
        from deltatune.ui.runs import resolve

        run = resolve(runs_root, _text(form, "resume"))
        config = os.path.join(run, "train_config.yaml")
        if not os.path.isfile(config):
            raise JobError(f"{_text(form, 'resume')!r} has no train_config.yaml to resume")
        return ["train", "--config", config, "--resume"], run
    overrides = []
    for key in ("model", "data", "method", "task", "eval_data"):
        if _text(form, key):
            overrides.append(f"{key}={_text(form, key)}")
    if _text(form, "steps"):
        overrides.append(f"max_steps={_text(form, 'steps')}")
    for key in ("lr", "batch_size", "max_length", "log_every", "save_every", "eval_every"):
        if _text(form, key):
            overrides.append(f"{key}={_text(form, key)}")
    report_to = _names(form, "report_to")
    if report_to:
        overrides.append(f"report_to=[{','.join(report_to)}]")
    out = _output_dir(form, runs_root, _text(form, "method") or "lora")
    overrides.append(f"output_dir={out}")
    try:
        load_train_config(_text(form, "config") or None, overrides)
    except ConfigError as e:
        raise JobError(f"deltatune train: error: {e}") from None
    if os.path.exists(out) and os.listdir(out):
        raise JobError(f"deltatune train: error: output_dir {out!r} already exists; pick another name")
    argv = ["train"] + (["--config", _text(form, "config")] if _text(form, "config") else []) + overrides
    return argv, out


def compare_argv(form: dict[str, Any], runs_root: str) -> tuple[list[str], str]:
    """The `deltatune compare` command line for a form, and its output folder; checked like the CLI does."""
    from deltatune import compare

    argv = []
    for key, flag in (
        ("model", "--model"),
        ("data", "--data"),
        ("task", "--task"),
        ("eval_data", "--eval-data"),
        ("steps", "--steps"),
        ("batch_size", "--batch-size"),
        ("max_length", "--max-length"),
        ("lr", "--lr"),
        ("latency_reps", "--latency-reps"),
    ):
        if _text(form, key):
            argv += [flag, _text(form, key)]
    methods = _names(form, "methods")
    if methods:
        argv += ["--methods", ",".join(methods)]
    report_to = _names(form, "report_to")
    if report_to:
        argv += ["--report-to", ",".join(report_to)]
    out = _output_dir(form, runs_root, "compare")
    argv += ["--out", out, "--no-progress"] if form.get("no_progress") else ["--out", out]
    parser = compare.build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        raise JobError("deltatune compare: invalid options: " + " ".join(argv)) from None
    except Exception as e:  # argparse type errors (e.g. a malformed --lr) arrive as ArgumentTypeError
        raise JobError(f"deltatune compare: {e}") from None
    errors = compare.resolve(args)
    if errors:
        raise JobError("deltatune compare: nothing was run:\n  " + "\n  ".join(errors))
    if os.path.exists(out) and os.listdir(out):
        raise JobError(f"deltatune compare: {out!r} already exists; pick another name")
    return ["compare"] + argv, out


def _output_dir(form: dict[str, Any], runs_root: str, default: str) -> str:
    name = _text(form, "name") or f"{default}-{time.strftime('%Y%m%d-%H%M%S')}"
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise JobError(f"the output name {name!r} must be a folder name inside the runs folder")
    return os.path.join(os.path.realpath(runs_root), name)


class Jobs:
    """The jobs started by this UI process."""

    def __init__(self, runs_root: str):
        self.root = os.path.realpath(runs_root)
        self.dir = os.path.join(self.root, ".deltatune-ui", "jobs")
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()

    def start(self, kind: str, form: dict[str, Any]) -> Job:
        if kind not in KINDS:
            raise JobError(f"unknown job kind {kind!r}; use train or compare")
        with self.lock:
            argv, out = (train_argv if kind == "train" else compare_argv)(form, self.root)
            if any(j.out == out and j.status in ("running", "stopping") for j in self.jobs.values()):
                raise JobError(f"{out!r} is already being written by a running job")
            os.makedirs(self.dir, exist_ok=True)
            job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{len(self.jobs) + 1}"
            log_path = os.path.join(self.dir, job_id + ".log")
            env = {
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                "TQDM_MININTERVAL": "0.5",
                "PYTHONWARNINGS": "ignore",
            }
            with open(log_path, "wb") as log:
                log.write(("$ deltatune " + " ".join(_quote(a) for a in argv) + "\n").encode())
                log.flush()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "deltatune", *argv],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,  # its own process group: SIGTERM reaches compare's workers too
                )
            job = Job(job_id, kind, argv, out, log_path, proc=proc)
            self.jobs[job_id] = job
            with open(os.path.join(self.dir, job_id + ".json"), "w") as f:
                json.dump({k: v for k, v in job.info().items() if k != "status"}, f)
            return job

    def get(self, job_id: str) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise KeyError(f"no job {job_id!r}") from None

    def list(self) -> list[dict[str, Any]]:
        return [j.info() for j in sorted(self.jobs.values(), key=lambda j: -j.started)]

    def running_outputs(self) -> set[str]:
        return {os.path.realpath(j.out) for j in self.jobs.values() if j.status in ("running", "stopping")}

    def stop(self, job_id: str) -> Job:
        """SIGTERM to the job's process group: train saves a checkpoint and exits, compare stops."""
        job = self.get(job_id)
        if job.status in ("running",) and job.proc is not None:
            job.stopped = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.proc.pid, signal.SIGTERM)
        return job

    def log(self, job_id: str, offset: int = 0, limit: int = 1 << 20) -> dict[str, Any]:
        job = self.get(job_id)
        status = job.info()  # read the status first: a finished job's log is then complete
        with open(job.log_path, "rb") as f:
            f.seek(max(0, offset))
            data = f.read(limit)
        return {**status, "text": data.decode("utf-8", errors="replace"), "offset": offset + len(data)}

    def close(self) -> None:
        """Stop every job still running (the UI is shutting down)."""
        for job in self.jobs.values():
            if job.status == "running":
                self.stop(job.id)
        for job in self.jobs.values():
            if job.proc is not None:
                try:
                    job.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(job.proc.pid, signal.SIGKILL)
