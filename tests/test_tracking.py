"""Tracking backends: what was logged is read back through each library's own reader."""

from __future__ import annotations

import glob
import os
import struct

import pytest

from deltatune import tracking

CONFIG = {
    "method": "lora",
    "lr": 0.003,
    "method_args": {"r": 4},
    "fields": {"text": "text"},
    "eval_data": None,
}
EXTRA = {"trainable_params": 1234, "total_params": 99999}
STEPS = [
    (0, {"eval_loss": 0.9, "eval_accuracy": 0.5}),
    (1, {"train_loss": 0.7, "lr": 0.003, "samples_per_s": 12.5}),
    (2, {"train_loss": 0.6, "lr": 0.0015, "samples_per_s": 13.0, "grad_norm": float("nan")}),
    (2, {"eval_loss": 0.4, "eval_accuracy": 0.75}),
]


def _log_all(trackers: tracking.Trackers, status: str = "completed") -> None:
    trackers.log_config(CONFIG, EXTRA)
    for step, values in STEPS:
        trackers.log(step, values)
    trackers.close(status)


def test_check_names_and_install_command(monkeypatch):
    assert tracking.check(["tensorboard", "mlflow", "wandb"]) == []
    assert tracking.check(["tensorbord"]) == [
        "report_to: unknown tracker 'tensorbord' (did you mean 'tensorboard'?); choose from tensorboard, mlflow, wandb"
    ]
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name)
    )
    assert tracking.check(["wandb"]) == [
        "report_to: wandb is not installed; install it with: pip install 'deltatune[wandb]'"
    ]
    with pytest.raises(tracking.TrackingError, match=r"pip install 'deltatune\[wandb\]'"):
        tracking.make_trackers(["wandb"], "unused")


def test_metric_names():
    assert tracking.metric_name("train_loss") == "train/loss"
    assert tracking.metric_name("lr") == "train/lr"
    assert tracking.metric_name("eval_accuracy") == "eval/accuracy"
    assert tracking.flatten(CONFIG)["method_args.r"] == 4
    assert tracking.flatten(CONFIG)["eval_data"] == "null"


def test_tensorboard_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_all(tracking.make_trackers(["tensorboard"], str(tmp_path), "run-a"))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/samples_per_s", "eval/loss", "eval/accuracy"} <= set(scalars)
    assert "train/grad_norm" not in scalars  # a NaN is not logged
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("train/loss")] == [(1, 0.7), (2, 0.6)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/accuracy")] == [(0, 0.5), (2, 0.75)]
    assert acc.Scalars("model/trainable_params")[0].value == 1234
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "method: lora" in config_text and "trainable_params: 1234" in config_text


def test_mlflow_run_read_back(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trackers = tracking.make_trackers(["mlflow"], str(tmp_path / "run-b"), "run-b")
    run_id = trackers.trackers[0].run_id
    _log_all(trackers, status="interrupted")
    assert os.path.isfile(tmp_path / "mlruns" / "mlflow.db")  # a local ./mlruns by default
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.run_name == "run-b" and run.info.status == "KILLED"
    assert run.data.params["method"] == "lora" and run.data.params["method_args.r"] == "4"
    assert run.data.params["trainable_params"] == "1234"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [
        (1, 0.7),
        (2, 0.6),
    ]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/accuracy")] == [
        (0, 0.5),
        (2, 0.75),
    ]
    assert client.get_metric_history(run_id, "train/grad_norm") == []
    local = client.download_artifacts(run_id, "train_config.yaml", str(tmp_path))
    with open(local) as f:
        assert "method: lora" in f.read()

    # $MLFLOW_TRACKING_URI wins: from another folder, the run goes to that store and no ./mlruns appears
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    trackers = tracking.make_trackers(["mlflow"], str(tmp_path / "run-c"), "run-c")
    assert trackers.trackers[0].tracking_uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    other = trackers.trackers[0].run_id
    trackers.close("completed")
    assert not os.path.exists(tmp_path / "elsewhere" / "mlruns")
    assert client.get_run(other).info.status == "FINISHED"


def read_wandb_records(path: str) -> list:
    """The records of a W&B `.wandb` file: W&B's header, then LevelDB-log records holding protobufs."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    records, pos, block, pending = [], 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_files_read_back(tmp_path, monkeypatch):
    import json

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert tracking.wandb_mode() == "offline"
    trackers = tracking.make_trackers(["wandb"], str(tmp_path), "run-c")
    assert trackers.trackers[0].mode == "offline"
    _log_all(trackers)
    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, config, summary = {}, {}, {}
    for record in read_wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for key, value in items.items():
                if not key.startswith("_"):
                    history.setdefault(key, []).append((items["_step"], value))
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in record.summary.update})
    assert history["train/loss"] == [(1, 0.7), (2, 0.6)]
    assert history["eval/accuracy"] == [(0, 0.5), (2, 0.75)]
    assert "train/grad_norm" not in history
    assert config["method"] == "lora" and config["trainable_params"] == 1234
    assert config["method_args"] == {"r": 4}
    assert summary["trainable_params"] == 1234 and summary["status"] == "completed"


def test_a_failing_tracker_is_dropped_not_fatal(caplog):
    class Broken:
        name = "broken"

        def log(self, step, values):
            raise OSError("disk full")

    class Good:
        name = "good"
        seen: list = []

        def log(self, step, values):
            self.seen.append(step)

        def close(self, status):
            pass

    trackers = tracking.Trackers([Broken(), Good()])
    trackers.log(1, {"train_loss": 1.0})
    trackers.log(2, {"train_loss": 0.5})
    assert Good.seen == [1, 2] and len(trackers.trackers) == 1
    assert "broken: log failed (OSError: disk full)" in caplog.text


def test_train_reports_to_tensorboard(tmp_path):
    """`report_to` in a train config: every metrics.jsonl row reaches TensorBoard, with the config."""
    import json

    import train_helpers
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from deltatune.train import config_from_dict, run

    out = tmp_path / "run"
    summary = run(
        config_from_dict(
            {
                "model": train_helpers.tiny_bert_folder(tmp_path / "bert"),
                "data": train_helpers.classification_data(tmp_path / "cls.jsonl"),
                "eval_fraction": 0.25,
                "max_steps": 4,
                "batch_size": 4,
                "log_every": 1,
                "eval_every": 2,
                "progress": False,
                "report_to": ["tensorboard"],
                "output_dir": str(out),
            }
        )
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    for key, tag in (
        ("train_loss", "train/loss"),
        ("grad_norm", "train/grad_norm"),
        ("lr", "train/lr"),
        ("tokens_per_s", "train/tokens_per_s"),
        ("peak_mem_mb", "train/peak_mem_mb"),
        ("eval_accuracy", "eval/accuracy"),
    ):
        logged = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows if key in r], key
    assert acc.Scalars("model/trainable_params")[0].value == summary["trainable_params"]
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "report_to:\n- tensorboard" in config_text and f"output_dir: {out}" in config_text


def test_report_to_errors_before_anything_runs(tmp_path, monkeypatch, capsys):
    from deltatune import compare
    from deltatune.errors import ConfigError
    from deltatune.train import load_train_config

    with pytest.raises(ConfigError, match=r"report_to: unknown tracker 'mlfow' \(did you mean 'mlflow'\?\)"):
        load_train_config(None, ["report_to=[mlfow]"])
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda n: None if n == "mlflow" else real(n))
    with pytest.raises(
        ConfigError, match=r"mlflow is not installed; install it with: pip install 'deltatune\[mlflow\]'"
    ):
        load_train_config(None, ["report_to=[mlflow]"])
    assert compare.main(["--report-to", "mlflow", "--out", str(tmp_path / "c")]) == 2
    assert "pip install 'deltatune[mlflow]'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_crashed_run_closes_its_tracker_run_and_resume_continues_it(tmp_path, monkeypatch):
    """A run that raises mid-training ends its MLflow run as FAILED (not left RUNNING); `--resume` goes on
    in that same MLflow run, so its metric history is one run's, step after step."""
    import json

    import mlflow
    import train_helpers

    from deltatune.train import config_from_dict, loop, run

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    cfg = config_from_dict(
        {
            "model": train_helpers.tiny_bert_folder(tmp_path / "bert"),
            "data": train_helpers.classification_data(tmp_path / "cls.jsonl"),
            "eval_fraction": 0.25,
            "max_steps": 4,
            "batch_size": 4,
            "log_every": 1,
            "save_every": 2,
            "progress": False,
            "report_to": ["mlflow"],
            "output_dir": str(out),
        }
    )
    real_clip, calls = loop._clip, []

    def clip_then_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash in step 3")
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(loop, "_clip", clip_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg)
    state = json.loads((out / "tracking.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=state["mlflow"]["tracking_uri"])
    run_id = state["mlflow"]["run_id"]
    assert client.get_run(run_id).info.status == "FAILED"
    assert loop._OPEN == []

    monkeypatch.setattr(loop, "_clip", real_clip)
    run(cfg, resume=True)
    assert json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4]
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


def test_resumed_trackers_continue_the_same_runs(tmp_path, monkeypatch):
    """`make_trackers(..., resume_step=N)` reopens the W&B run by its id and drops TensorBoard events past N."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    first = tracking.make_trackers(["tensorboard", "wandb"], str(tmp_path), "run-r")
    wandb_id = first.trackers[1].run.id
    for step in (1, 2, 3):
        first.log(step, {"train_loss": 1.0 / step})
    first.close("interrupted")
    again = tracking.make_trackers(["tensorboard", "wandb"], str(tmp_path), "run-r", resume_step=2)
    assert again.trackers[1].run.id == wandb_id
    again.log(3, {"train_loss": 0.25})
    again.close("completed")
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    fresh = tracking.make_trackers(["wandb"], str(tmp_path), "run-r")  # not a resume: a new run
    assert fresh.trackers[0].run.id != wandb_id
    fresh.close("completed")
