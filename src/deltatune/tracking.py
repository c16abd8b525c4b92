"""Experiment tracking: send a run's metrics to TensorBoard, MLflow or Weights & Biases as well.

`metrics.jsonl` in the run folder is always written (and is what `deltatune ui` reads); `report_to` adds
the libraries' own clients, each an optional extra:

- `tensorboard`: event files in `<run>/tensorboard/` through `torch.utils.tensorboard.SummaryWriter`
  (`tensorboard --logdir runs/`).
- `mlflow`: a run in the experiment `$MLFLOW_EXPERIMENT_NAME` (default `deltatune`) at `$MLFLOW_TRACKING_URI`,
  or, when that is unset, in a local `./mlruns/` folder (MLflow's SQLite store `mlruns/mlflow.db`, artifacts
  beside it; MLflow 3 no longer writes its plain-file store): `mlflow ui --backend-store-uri
  sqlite:///mlruns/mlflow.db`.
- `wandb`: a W&B run in the project `$WANDB_PROJECT` (default `deltatune`), offline (files under
  `<run>/wandb/`, upload later with `wandb sync`) unless this machine is logged in (`WANDB_API_KEY` or
  `wandb login`); `WANDB_MODE` still decides when set.

Metric names are grouped: `eval_*` under `eval/`, everything else under `train/` (`train_loss` ->
`train/loss`, `lr` -> `train/lr`). The resolved config goes in as parameters, the trainable and total
parameter counts as well. Under torchrun only rank 0 creates loggers (the caller's job: `make_loggers` is
called on the main process only).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import math
import os
import time
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# backend -> (module that must import, the extra that installs it)
BACKENDS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
}


class TrackingError(RuntimeError):
    """A tracking backend is unknown, not installed or failed to start; the message says what to do."""


def install_command(name: str) -> str:
    return f"pip install 'deltatune[{BACKENDS[name][1]}]'"


def as_list(names: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """`report_to` as a list: `None` -> [], `"tensorboard,mlflow"` -> two names."""
    if names is None:
        return []
    if isinstance(names, str):
        return [n.strip() for n in names.split(",") if n.strip()]
    return [str(n).strip() for n in names]


def check(names: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Every problem with a `report_to` list (empty: fine): unknown names, backends that aren't installed."""
    errors = []
    if names is not None and not isinstance(names, (str, list, tuple)):
        return [f"report_to: expected a list of trackers, got {names!r}"]
    for name in as_list(names):
        if name not in BACKENDS:
            close = difflib.get_close_matches(str(name), BACKENDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"report_to: unknown tracker {name!r}{hint}; choose from {', '.join(BACKENDS)}")
        elif importlib.util.find_spec(BACKENDS[name][0]) is None:
            errors.append(f"report_to: {name} is not installed; install it with: {install_command(name)}")
    return errors


def metric_name(key: str) -> str:
    """`eval_accuracy` -> `eval/accuracy`, `train_loss` -> `train/loss`, `lr` -> `train/lr`."""
    if key.startswith("eval_"):
        return "eval/" + key[5:]
    return "train/" + key.removeprefix("train_")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become dotted keys (`fields.text`), lists and None become strings."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple, dict)) or value is None:
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class Tracker(Protocol):
    name: str

    def state(self) -> dict[str, Any]: ...  # what a resumed run needs to go on (tracking.json)
    def log_config(self, config: dict[str, Any], extra: dict[str, Any]) -> None: ...
    def log(self, step: int, values: dict[str, float]) -> None: ...
    def close(self, status: str) -> None: ...


class TensorBoardTracker:
    """Scalars, and the config as a text summary, in `<run_dir>/tensorboard/`."""

    name = "tensorboard"

    def __init__(self, run_dir: str, run_name: str, previous: dict[str, Any] | None = None, step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = os.path.join(run_dir, "tensorboard")
        # resumed: the same folder, and events past the checkpoint's step are dropped (as in metrics.jsonl)
        self.writer = SummaryWriter(
            log_dir=self.log_dir, purge_step=step + 1 if previous is not None else None
        )

    def state(self) -> dict[str, Any]:
        return {"log_dir": self.log_dir}

    def log_config(self, config: dict[str, Any], extra: dict[str, Any]) -> None:
        import yaml

        text = yaml.safe_dump({**config, **extra}, sort_keys=False)
        self.writer.add_text("config", "```\n" + text + "```", 0)
        for key, value in _numbers(extra).items():
            self.writer.add_scalar(f"model/{key}", value, 0)
        self.writer.flush()

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in _numbers(values).items():
            self.writer.add_scalar(metric_name(key), value, step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.add_text("status", status, 0)
        self.writer.close()


def mlflow_tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI`, or a SQLite store in `./mlruns/` (created)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    os.makedirs("mlruns", exist_ok=True)
    return "sqlite:///" + os.path.abspath(os.path.join("mlruns", "mlflow.db"))


class MlflowTracker:
    """One MLflow run through `MlflowClient` (no global active run): params, metrics, the config file."""

    name = "mlflow"

    def __init__(self, run_dir: str, run_name: str, previous: dict[str, Any] | None = None, step: int = 0):
        import mlflow

        for noisy in ("mlflow", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.tracking_uri = mlflow_tracking_uri()
        self.client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "deltatune")
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            location = None
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                location = os.path.abspath(os.path.join("mlruns", "artifacts"))
            experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        self.resumed = False
        if previous and previous.get("tracking_uri") == self.tracking_uri and previous.get("run_id"):
            try:  # resumed: the interrupted run goes on (metrics past the checkpoint are logged again)
                old = self.client.get_run(previous["run_id"])
            except mlflow.exceptions.MlflowException:
                old = None  # deleted meanwhile: a new run
            if old is not None and old.info.lifecycle_stage == "active":
                self.client.update_run(old.info.run_id, status="RUNNING")
                self.run_id, self.experiment_id, self.resumed = old.info.run_id, old.info.experiment_id, True
                return
        run = self.client.create_run(
            experiment_id, run_name=run_name, tags={"deltatune.run_dir": os.path.abspath(run_dir)}
        )
        self.run_id = run.info.run_id
        self.experiment_id = experiment_id

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.tracking_uri}

    def log_config(self, config: dict[str, Any], extra: dict[str, Any]) -> None:
        import yaml
        from mlflow.entities import Param

        flat = flatten({**config, **extra})
        params = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "train_config.yaml")

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(metric_name(k), v, now, step) for k, v in _numbers(values).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str) -> None:
        state = {"completed": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, state)


def wandb_mode() -> str:
    """`$WANDB_MODE` when set; else `online` if this machine has a W&B key, `offline` if not."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    import netrc

    try:
        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        hosts = netrc.netrc(path).hosts if os.path.isfile(path) else {}
    except (netrc.NetrcParseError, OSError):
        hosts = {}
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return "online" if base in hosts else "offline"


class WandbTracker:
    """One W&B run (offline unless logged in) with its files under `<run_dir>/wandb/`."""

    name = "wandb"

    def __init__(self, run_dir: str, run_name: str, previous: dict[str, Any] | None = None, step: int = 0):
        import wandb

        self.mode = wandb_mode()
        resume = {"id": previous["id"], "resume": "allow"} if previous and previous.get("id") else {}
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "deltatune"),
            name=run_name,
            dir=run_dir,
            mode=self.mode,
            reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True),
            **resume,
        )

    def state(self) -> dict[str, Any]:
        return {"id": self.run.id}

    def log_config(self, config: dict[str, Any], extra: dict[str, Any]) -> None:
        self.run.config.update({**config, **extra}, allow_val_change=True)
        for key, value in _numbers(extra).items():
            self.run.summary[key] = value

    def log(self, step: int, values: dict[str, float]) -> None:
        numbers = {metric_name(k): v for k, v in _numbers(values).items()}
        if numbers:
            self.run.log(numbers, step=step)

    def close(self, status: str) -> None:
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == "completed" else 1)
        import wandb

        # W&B's service process writes the run's files after `finish` returns; shutting it down waits for
        # them, so the offline run is complete on disk when training returns (unless another run is open).
        if wandb.run is None:
            wandb.teardown()


TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


class Trackers:
    """The chosen trackers, called together; one that fails while logging is dropped with a warning
    (training goes on, `metrics.jsonl` has everything)."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _each(self, what: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, what)(*args)
            except Exception as e:  # a tracker must never stop training
                logger.warning(
                    "%s: %s failed (%s: %s); not logging to it any more",
                    tracker.name,
                    what,
                    type(e).__name__,
                    e,
                )
                self.trackers.remove(tracker)

    def log_config(self, config: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        self._each("log_config", config, dict(extra or {}))

    def log(self, step: int, values: dict[str, Any]) -> None:
        self._each("log", step, values)

    def close(self, status: str) -> None:
        self._each("close", status)
        self.trackers = []


STATE_FILE = "tracking.json"


def make_trackers(
    names: str | list[str] | tuple[str, ...] | None,
    run_dir: str,
    run_name: str | None = None,
    resume_step: int | None = None,
) -> Trackers:
    """Start one tracker per name (call on the main process only). The run is named after the last two
    parts of `run_dir` (`runs/lora`, `compare-results/lora`) unless `run_name` is given. Each tracker's
    run id goes to `<run_dir>/tracking.json`; with `resume_step` (a resumed training run, at that step)
    the same MLflow run and W&B run go on instead of new ones, and TensorBoard drops events past the step.

    Raises:
        TrackingError: a name is unknown or its library isn't installed (with the install command), or a
            backend failed to start.
    """
    errors = check(names)
    if errors:
        raise TrackingError("; ".join(errors))
    parts = os.path.abspath(run_dir).split(os.sep)
    run_name = run_name or "/".join(p for p in parts[-2:] if p)
    path = os.path.join(run_dir, STATE_FILE)
    previous: dict[str, Any] = {}
    if resume_step is not None and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                previous = json.load(f)
        except (OSError, ValueError):
            logger.warning("%s is unreadable: the trackers start new runs", path)
    started: list[Tracker] = []
    for name in dict.fromkeys(as_list(names)):
        try:
            earlier = previous.get(name) if resume_step is not None else None
            if resume_step is not None and earlier is None:
                earlier = {}  # resumed, but this tracker wasn't used before: still the same TensorBoard folder
            started.append(TRACKERS[name](run_dir, run_name, earlier, resume_step or 0))
        except Exception as e:
            Trackers(started).close("failed")
            raise TrackingError(f"report_to: {name} could not start: {type(e).__name__}: {e}") from e
    state = {**previous, **{t.name: t.state() for t in started}}
    from deltatune.checkpoint import atomic_write_text

    os.makedirs(run_dir, exist_ok=True)
    atomic_write_text(path, json.dumps(state, indent=2))
    return Trackers(started)
