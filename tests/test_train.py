"""Training: config validation, the loop end to end, exact resume, SIGTERM, NaN stop, Trainer, bad input."""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import classification_data, tiny_bert_folder, tiny_opt_folder, trainable_weights

from deltatune.config import ConfigError
from deltatune.train import (
    TrainConfig,
    TrainingError,
    config_from_dict,
    latest_checkpoint,
    load_train_config,
    run,
)
from deltatune.train.loop import _loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny_bert_folder(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def emails(tmp_path_factory):
    return classification_data(tmp_path_factory.mktemp("data") / "emails.jsonl")


def make_config(out, model, data, **overrides) -> TrainConfig:
    values = {
        "model": model,
        "data": data,
        "eval_fraction": 0.25,
        "batch_size": 4,
        "max_steps": 6,
        "save_every": 0,
        "log_every": 1,
        "eval_at_start": False,
        "progress": False,
        "max_length": 32,
        "output_dir": str(out),
        "method_args": {"r": 2, "lora_alpha": 4},
        "lr": 1e-2,
    }
    return config_from_dict(values | overrides)


# ---- configs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))), ids=os.path.basename
)
def test_every_shipped_config_validates(path):
    with open(path) as f:
        assert f.readline().startswith("#"), "every shipped config starts with a how-to-run comment"
    try:
        config = load_train_config(path)
    except ConfigError as e:  # a QLoRA config is valid once the quantized base (methods/quant.py) exists
        assert (
            "needs deltatune.methods.quant" in str(e)
            and importlib.util.find_spec("deltatune.methods.quant") is None
        )
        return
    assert config.method in os.path.basename(path) or config.task == "causal-lm"


def test_overrides_with_dotted_keys_and_yaml_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: lora\nlr: 1e-3\nmethod_args:\n  r: 8\n")
    config = load_train_config(
        str(path), ["method_args.lora_alpha=32", "fields.text=body", "lr=2e-4", "eval_data="]
    )
    assert config.lr == 2e-4 and isinstance(config.lr, float)
    assert config.method_args == {"r": 8, "lora_alpha": 32}
    assert config.fields.text == "body" and config.fields.label == "label"
    assert load_train_config(str(path)).lr == 1e-3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["batchsize=4"], "unknown key 'batchsize' (did you mean 'batch_size'?)"),
        (["fields.txt=body"], "unknown key 'fields.txt' (did you mean 'fields.text'?)"),
        (["batch_size=abc"], "batch_size: expected int, got str 'abc'"),
        (["max_steps=1.5"], "max_steps: expected int, got float 1.5"),
        (["lr=abc"], "\n  lr: expected float, got str 'abc', or 'abc' is not one of 'auto'"),
        (["schedule=cos"], "schedule: 'cos' is not one of 'linear', 'cosine', 'constant'"),
        (["method=lorra"], "method: unknown 'lorra' (did you mean 'lora'?)"),
        (["method_args.rank=4"], "unknown LoraConfig key 'rank'"),
        (["data=missing.jsonl"], "data: data file not found: 'missing.jsonl'"),
        (["eval_data=builtin:hams"], "unknown built-in data set 'builtin:hams'"),
        (["model=./no/such/model"], "model: folder not found"),
        (["base_dtype=bf16"], "set precision=bf16"),
        (["packing=true"], "packing: only for task causal-lm"),
        (["batch_size=0"], "batch_size: must be at least 1"),
        (["eval_fraction=0.2", "eval_data=builtin:spam:eval"], "set one of them, not both"),
        (["lr"], "is not key=value"),
        (['output_dir="a\\0b"'], r"output_dir: 'a\x00b' holds a NUL character"),  # was ValueError in makedirs
    ],
)
def test_bad_config_is_rejected_with_a_clear_message(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_train_config(None, overrides)
    assert message in str(e.value)


def test_automatic_choices_with_the_training_data_as_eval_data_are_refused_up_front(tmp_path):
    # every example equals an eval example, so none may be validated on: after tokenizing, the run failed
    # with "val_fraction=0.2 of 24 training examples leaves no validation examples"
    data = classification_data(tmp_path / "d.jsonl")
    for overrides in (
        [f"data={data}", f"eval_data={tmp_path}/./d.jsonl", "lr=auto"],
        ["eval_data=builtin:spam:train", "early_stopping=true"],
    ):
        with pytest.raises(ConfigError, match="is the training data itself"):
            load_train_config(None, overrides)
    load_train_config(None, ["eval_data=builtin:spam:eval", "early_stopping=true"])
    load_train_config(None, [f"data={data}", f"eval_data={data}"])  # allowed (a warning says what it means)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_train_config(None, ["batchsize=4", "data=missing.jsonl", "method=lorra", "max_steps=x"])
    for part in ("batchsize", "missing.jsonl", "lorra", "max_steps"):
        assert part in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 works on CUDA")
def test_fp16_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        load_train_config(None, ["precision=fp16"])


# ---- runs -------------------------------------------------------------------------------------------------
def test_a_run_trains_evaluates_checkpoints_and_saves_an_adapter(tmp_path, bert, emails):
    from transformers import AutoModelForSequenceClassification

    from deltatune import PeftModel

    config = make_config(
        tmp_path / "run", bert, emails, max_steps=8, save_every=3, eval_every=4, eval_at_start=True
    )
    summary = run(config)
    assert summary["status"] == "completed" and summary["steps"] == 8
    for key in (
        "train_loss",
        "eval_loss",
        "eval_accuracy",
        "eval_f1",
        "runtime_s",
        "samples_per_s",
        "steps_per_s",
    ):
        assert isinstance(summary[key], float), key
    assert summary["peak_mem_mb"] > 50 and 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["before"]["eval_loss"] > summary["eval_loss"]
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "eval_loss" in m] == [0, 4, 8]
    assert [m["step"] for m in lines if "train_loss" in m] == list(range(1, 9))
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-3", "step-6"]  # keep_checkpoints=2
    assert json.loads((run_dir / "adapter" / "label_map.json").read_text()) == {"high": 0, "low": 1}
    assert (run_dir / "adapter" / "tokenizer.json").exists()
    base = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2)
    loaded = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    assert loaded(input_ids=torch.tensor([[3, 4, 5]])).logits.shape == (1, 2)


def test_output_folder_holding_a_run_is_refused_unless_overwrite_or_resume(tmp_path, bert, emails):
    config = make_config(tmp_path / "run", bert, emails, max_steps=2)
    run(config)
    with pytest.raises(ConfigError, match="already holds a run .*--resume.*--overwrite"):
        run(config)
    assert run(config, overwrite=True)["status"] == "completed"
    with pytest.raises(TrainingError, match=r"nothing to resume: .*; the run there completed \(2 steps"):
        run(config, resume=True)  # save_every=0: a completed run without checkpoints
    run(make_config(tmp_path / "saved", bert, emails, max_steps=2, save_every=1))
    relabelled = tmp_path / "relabelled.jsonl"
    relabelled.write_text(Path(emails).read_text().replace('"low"', '"lo"'))
    with pytest.raises(ConfigError, match="differ from the run being resumed"):
        run(make_config(tmp_path / "saved", bert, str(relabelled), max_steps=2, save_every=1), resume=True)


def test_a_refused_resume_keeps_the_run_s_settings_and_a_rank_change_names_both_ranks(tmp_path, bert, emails):
    """--resume with another rank was a RuntimeError traceback from load_state_dict, and every refused
    --resume (other rank, batch size, labels) had already replaced train_config.yaml with its own settings."""
    out = tmp_path / "run"
    run(make_config(out, bert, emails, max_steps=2, save_every=1))
    saved = (out / "train_config.yaml").read_text()
    other_rank = make_config(
        out, bert, emails, max_steps=3, save_every=1, method_args={"r": 4, "lora_alpha": 4}
    )
    with pytest.raises(TrainingError) as e:
        run(other_rank, resume=True)
    assert str(e.value).startswith(f"{out / 'checkpoints' / 'step-2'} was saved with LoRA rank 2 (")
    assert "but this run's config has rank 4: resume with the rank the run was started with" in str(e.value)
    assert (out / "train_config.yaml").read_text() == saved
    with pytest.raises(TrainingError, match="was written with batch_size=4; this run has batch_size=2"):
        run(make_config(out, bert, emails, max_steps=3, save_every=1, batch_size=2), resume=True)
    assert (out / "train_config.yaml").read_text() == saved
    assert run(make_config(out, bert, emails, max_steps=3, save_every=1), resume=True)["steps"] == 3
    assert (
        load_train_config(str(out / "train_config.yaml")).max_steps == 3
    )  # an accepted resume: its settings


def test_a_resume_reads_back_a_torn_metrics_line_and_refuses_damaged_labels_or_lr_search(
    tmp_path, bert, emails
):
    """A run killed while appending to metrics.jsonl leaves a half line: --resume ended in a JSONDecodeError
    traceback ("a bug"); so did a damaged label_map.json, and for `lr: auto` a damaged lr_search.json."""
    out = tmp_path / "run"
    run(make_config(out, bert, emails, max_steps=2, save_every=1))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('["not a row"]\n{"step": "2"}\n{"step": 2, "train_lo')
    labels = (out / "label_map.json").read_text()
    for damaged in ('{"low": 0, "hi', "[1, 2]", "\xff"):
        (out / "label_map.json").write_text(damaged)
        with pytest.raises(
            ConfigError, match="label_map.json, the labels of the run being resumed, is damaged"
        ):
            run(make_config(out, bert, emails, max_steps=3, save_every=1), resume=True)
    (out / "label_map.json").write_text(labels)
    assert run(make_config(out, bert, emails, max_steps=3, save_every=1), resume=True)["steps"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and max(r["step"] for r in rows) == 3
    from deltatune.train.run import _read_lr_search

    for damaged in ('{"lr": 0.0', '{"lr": NaN}', '["lr"]', ""):
        (out / "lr_search.json").write_text(damaged)
        with pytest.raises(
            ConfigError, match="lr_search.json, the learning rate `lr: auto` chose .* is damaged"
        ):
            _read_lr_search(str(out / "lr_search.json"))
    (out / "lr_search.json").write_text('{"lr": 0.001, "trials": []}')
    assert _read_lr_search(str(out / "lr_search.json"))["lr"] == 0.001


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("state.json", b"[1]", "state.json is not a JSON object with the step it was written at"),
        ("state.json", b"{bad", "state.json can't be read"),
        ("training_state.pt", b"garbage", "training_state.pt can't be read: UnpicklingError: Unsupported"),
        ("training_state.pt", None, "training_state.pt can't be read: RuntimeError: PytorchStreamReader"),
    ],
)
def test_resuming_from_a_damaged_checkpoint_is_a_one_line_error_that_keeps_the_run(
    tmp_path, bert, emails, name, content, message, capsys
):
    """A damaged state.json or training_state.pt was an AttributeError / UnpicklingError traceback ("a bug")."""
    from deltatune.cli import main

    out = tmp_path / "run"
    run(make_config(out, bert, emails, max_steps=2, save_every=2))
    damaged = out / "checkpoints" / "step-2" / name
    damaged.write_bytes(damaged.read_bytes()[:200] if content is None else content)
    before = sorted(p.name for p in out.iterdir())
    args = [f"{k}={v}" for k, v in {"model": bert, "data": emails, "output_dir": out}.items()]
    args += ["eval_fraction=0.25", "batch_size=4", "max_steps=3", "max_length=32", "progress=false"]
    args += ["method_args.r=2", "method_args.lora_alpha=4"]
    assert main(["train", *args, "--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        f"deltatune train: error: the checkpoint {out / 'checkpoints' / 'step-2'} is damaged ("
    )
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert sorted(p.name for p in out.iterdir()) == before and damaged.exists()


class SignalAtForward:
    """Calls `action` on the k-th training-mode forward of the whole model (a global hook)."""

    def __init__(self, k: int, action):
        self.k, self.action, self.calls = k, action, 0

    def __enter__(self):
        def hook(module, args, output):
            if module.training and type(module).__name__.endswith(
                ("ForSequenceClassification", "ForCausalLM")
            ):
                self.calls += 1
                if self.calls == self.k:
                    return self.action(output)
            return output

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def sigterm(output):
    os.kill(os.getpid(), signal.SIGTERM)
    return output


def test_resume_after_sigterm_ends_with_the_same_weights(tmp_path, bert, emails):
    # grad_accum=2 and batch 4 over 18 examples: the stop falls mid-epoch and steps straddle epochs.
    options = {"max_steps": 9, "grad_accum": 2, "schedule": "cosine", "warmup_steps": 2, "save_every": 4}
    run(make_config(tmp_path / "straight", bert, emails, **options))
    config = make_config(tmp_path / "stopped", bert, emails, **options)
    with SignalAtForward(11, sigterm):  # during step 6
        summary = run(config)
    assert summary["status"] == "interrupted" and summary["steps"] == 6 and summary["signal"] == "SIGTERM"
    assert latest_checkpoint(str(tmp_path / "stopped")).endswith("step-6")
    assert not (tmp_path / "stopped" / "adapter").exists()
    assert run(config, resume=True)["resumed_from_step"] == 6
    straight, resumed = trainable_weights(tmp_path / "straight"), trainable_weights(tmp_path / "stopped")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 10)) + [9]  # no step logged twice; the final eval at the end


def test_sigterm_while_the_model_loads_exits_143_and_leaves_no_run_behind(
    tmp_path, bert, emails, monkeypatch, capsys
):
    """SIGTERM before the loop's handler (loading the model, tokenizing) killed the process by the default
    action, leaving train_config.yaml and label_map.json: the rerun was refused as 'already holds a run'. The
    folders made for output_dir go too (an empty `new/` was left behind)."""
    import importlib

    from deltatune import cli

    run_module = importlib.import_module("deltatune.train.run")
    real = run_module.build_model

    def build_then_sigterm(*args, **kwargs):
        model = real(*args, **kwargs)
        assert (tmp_path / "new" / "run" / "train_config.yaml").exists()  # the run's files were made by now
        os.kill(os.getpid(), signal.SIGTERM)
        return model

    monkeypatch.setattr(run_module, "build_model", build_then_sigterm)
    # Without run's own handler the signal lands here (and the test fails) instead of killing pytest.
    before = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        argv = [
            f"model={bert}",
            f"data={emails}",
            f"output_dir={tmp_path / 'new' / 'run'}",
            "max_steps=1",
            "progress=false",
        ]
        assert cli.main(["train", *argv]) == 128 + signal.SIGTERM
    finally:
        placeholder = signal.signal(signal.SIGTERM, before)
    assert "stopped by SIGTERM before training began" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert placeholder.__name__ == "<lambda>"  # run's handler was undone
    monkeypatch.setattr(run_module, "build_model", real)
    assert cli.main(["train", *argv]) == 0  # the rerun needs no --overwrite


def test_nan_loss_stops_and_keeps_the_last_checkpoint_loadable(tmp_path, bert, emails):
    config = make_config(tmp_path / "run", bert, emails, max_steps=8, save_every=2)

    def poison(output):
        output.logits = output.logits * float("nan")
        return output

    with SignalAtForward(5, poison), pytest.raises(TrainingError, match="NaN or infinite at step 5") as e:
        run(config)
    assert "step-4" in str(e.value) and "--resume" in str(e.value)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step-2", "step-4"]
    assert not (tmp_path / "run" / "adapter").exists()
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step-4" / "trainable.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert run(config, resume=True)["steps"] == 8


def test_sigterm_to_a_real_process_then_resume(tmp_path, bert, emails):
    out = tmp_path / "run"
    args = [
        f"model={bert}",
        f"data={emails}",
        "eval_fraction=0.25",
        "batch_size=4",
        "max_steps=150",
        "lr=1e-2",
    ]
    args += ["max_length=32", "log_every=1", "save_every=0", "eval_at_start=false", "method_args.r=2"]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "deltatune", "train", f"output_dir={out}", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    # The signal goes only once training has logged steps (its handler is installed by then): on a loaded
    # machine the start (imports, model, tokenization) can take far longer than usual.
    metrics, deadline = out / "metrics.jsonl", time.time() + 600

    def started() -> bool:
        return metrics.exists() and len(metrics.read_text().splitlines()) >= 3

    while time.time() < deadline and proc.poll() is None and not started():
        time.sleep(0.05)
    if not started():
        proc.kill()
        pytest.fail(f"training logged no steps (exit {proc.poll()}): {proc.communicate()[1][-2000:]}")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "--resume" in stderr and "Traceback" not in stderr
    with open(os.path.join(latest_checkpoint(str(out)), "state.json")) as f:
        assert 3 <= json.load(f)["step"] < 150
    config = load_train_config(str(out / "train_config.yaml"))
    assert run(config, resume=True)["steps"] == 150
    straight = load_train_config(None, [f"output_dir={tmp_path / 'straight'}", *args])
    run(straight)
    a, b = trainable_weights(tmp_path / "straight"), trainable_weights(out)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_bf16_base_autocast_accumulation_and_checkpointing(tmp_path, bert, emails):
    config = make_config(
        tmp_path / "run",
        bert,
        emails,
        base_dtype="bf16",
        precision="bf16",
        gradient_checkpointing=True,
        grad_accum=2,
        max_steps=2,
    )
    summary = run(config)
    assert summary["status"] == "completed" and summary["global_batch"] == 8
    weights = trainable_weights(tmp_path / "run")
    assert all(t.dtype == torch.float32 for t in weights.values())
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b), (
        "gradients reached every block through checkpointing"
    )


METHODS = ["lora", "dora", "full", "top-layers", "houlsby", "pfeiffer", "qlora-int8", "qlora-nf4"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_through_get_peft_model(tmp_path, bert, emails, method):
    module = {"full": "layers", "top-layers": "layers", "houlsby": "bottleneck", "pfeiffer": "bottleneck"}
    module |= {"qlora-int8": "quant", "qlora-nf4": "quant"}
    if importlib.util.find_spec(f"deltatune.methods.{module.get(method, 'lora')}") is None:
        pytest.skip(f"{method} is not in this checkout yet")
    args = {"r": 2, "lora_alpha": 4} if "lora" in method else {}
    config = make_config(
        tmp_path / "run", bert, emails, method=method, method_args=args, max_steps=2, lr=None
    )
    summary = run(config)
    assert summary["status"] == "completed" and summary["trainable_params"] > 0
    assert os.path.isfile(tmp_path / "run" / "adapter" / "adapter_config.json")


def test_causal_lm_masks_the_prompt_out_of_the_loss(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.data import collate, load_datasets

    folder = tiny_opt_folder(tmp_path / "opt")
    data_path = tmp_path / "pc.jsonl"
    rows = [{"prompt": "w1 w2 w3 w4", "completion": "w5 w6"}, {"prompt": "w7", "completion": "w8 w9 w10"}]
    data_path.write_text("\n".join(json.dumps(r) for r in rows))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = collate(load_datasets(str(data_path), tokenizer, task="causal-lm").train, tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(folder)
    labels = batch.pop("labels")
    logits = model(**batch).logits
    loss, count = _loss(logits, labels, classify=False)
    assert count == (2 + 1) + (3 + 1)  # completion tokens and EOS, never the prompt or the padding
    torch.testing.assert_close(loss / count, model(**batch, labels=labels).loss)
    prompt_positions = logits.clone()
    prompt_positions[0, :3] += 100 * torch.randn_like(prompt_positions[0, :3])  # predict prompt tokens 2..4
    torch.testing.assert_close(_loss(prompt_positions, labels, classify=False)[0], loss)
    completion_position = logits.clone()
    completion_position[0, 4] += 100 * torch.randn_like(completion_position[0, 4])  # predicts w6
    assert not torch.allclose(_loss(completion_position, labels, classify=False)[0], loss)
    config = make_config(
        tmp_path / "run",
        folder,
        str(data_path),
        task="causal-lm",
        eval_fraction=0.0,
        eval_data=str(data_path),
        batch_size=2,
        max_steps=3,
        method_args={"r": 2, "lora_alpha": 4},
    )
    summary = run(config)
    assert summary["eval_perplexity"] > 1 and "eval_accuracy" not in summary


def test_a_classifier_base_whose_head_has_other_classes_is_a_one_line_error(tmp_path, bert):
    # the tiny BERT is saved with a 2-class head: 3 classes failed in from_pretrained with a RuntimeError
    data = tmp_path / "three.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"w{5 + i} w{9 + i}", "label": "abc"[i % 3]}) + "\n" for i in range(9))
    )
    config = make_config(tmp_path / "r", bert, str(data), eval_fraction=0.0, val_fraction=0.0, max_steps=1)
    with pytest.raises(
        ConfigError, match=r"a head for 2 classes, but this run has 3 classes \(\['a', 'b', 'c'\]\)"
    ):
        run(config)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("method, longest", [("lora", 64), ("prompt-tuning", 64 - 20)])
def test_max_length_beyond_the_models_positions_is_cut_to_them(tmp_path, caplog, method, longest):
    """Rows longer than OPT's 64-position table ended in an IndexError traceback inside the model."""
    folder = tiny_opt_folder(tmp_path / "opt")
    data_path = tmp_path / "long.jsonl"
    rows = [{"text": " ".join(f"w{(i + j) % 90 + 1}" for j in range(150))} for i in range(8)]
    data_path.write_text("\n".join(json.dumps(r) for r in rows))
    config = make_config(
        tmp_path / "run", folder, str(data_path), task="causal-lm", batch_size=2, max_steps=1, max_length=1000
    )
    config = dataclasses.replace(config, method=method, method_args={})
    with caplog.at_level("WARNING"):
        summary = run(config)
    assert summary["train_loss"] > 0
    assert f"max_length 1000 is more than {str(folder)!r} takes (64 positions" in caplog.text
    assert f"sequences are cut at {longest} tokens" in caplog.text


@pytest.mark.parametrize("method", ["lora", "full"])
def test_chunked_loss_trains_exactly_like_the_standard_loss(tmp_path, method):
    """The fused chunked head + cross-entropy (the default for causal LM) ends with the standard loss's weights."""
    folder = tiny_opt_folder(tmp_path / "opt")
    weights, losses = {}, {}
    for loss in ("chunked", "standard"):
        config = make_config(
            tmp_path / loss,
            folder,
            "builtin:quotes",
            task="causal-lm",
            eval_fraction=0.0,
            max_steps=3,
            method=method,
            loss=loss,
            max_length=16,
            method_args={"r": 2, "lora_alpha": 4} if method == "lora" else {},
        )
        losses[loss] = run(config)["train_loss"]
        weights[loss] = trainable_weights(tmp_path / loss)
    assert losses["chunked"] == pytest.approx(losses["standard"], abs=1e-5)
    assert weights["chunked"].keys() == weights["standard"].keys()
    for key, value in weights["chunked"].items():
        torch.testing.assert_close(value, weights["standard"][key], atol=2e-5, rtol=1e-4)


def test_causal_lm_packing_on_builtin_quotes(tmp_path):
    folder = tiny_opt_folder(tmp_path / "opt")
    config = make_config(
        tmp_path / "run",
        folder,
        "builtin:quotes",
        task="causal-lm",
        eval_fraction=0.0,
        packing=True,
        max_length=16,
        max_steps=2,
        method_args={},
    )
    summary = run(config)
    assert summary["status"] == "completed" and summary["eval_perplexity"] > 1


def test_a_wrapped_model_trains_under_transformers_trainer(tmp_path, bert):
    import datasets
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    from deltatune import LoraConfig, get_peft_model

    base = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, task_type="SEQ_CLS"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(3, 90, (6,), generator=g).tolist(), "labels": i % 2} for i in range(16)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        remove_unused_columns=False,
        label_names=["labels"],
    )
    Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows)).train()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert changed and changed <= trainable
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_optimizer_is_fused_adamw_with_the_default_loops_update():
    """The trainer's AdamW runs fused where torch has it (CPU/CUDA float tensors) and gives the default
    per-tensor loop's update to float rounding; a parameter it can't take (float64 on "meta") falls back."""
    from deltatune.train.loop import fused_kwargs

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 5)), torch.nn.Parameter(torch.randn(5))]
    assert fused_kwargs(params) == {"fused": True}
    assert fused_kwargs([torch.nn.Parameter(torch.zeros(2, device="meta"))]) == {}
    assert fused_kwargs([torch.nn.Parameter(torch.zeros(2, dtype=torch.int32), requires_grad=False)]) == {}
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, **fused_kwargs(params))
    plain = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, copies, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for p, q in zip(params, copies):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("text", ["", "# lr: 1e-4\n", "\n\n"])
def test_a_config_file_without_settings_is_refused_not_read_as_all_defaults(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="holds no settings \\(it is empty or only comments\\)"):
        load_train_config(str(path))


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/null and /dev/zero")
def test_a_config_that_is_not_a_regular_file_is_read_or_refused_in_one_line(tmp_path):
    """`--config /dev/null` said 'config file not found'; a pipe (`--config <(...)`) is read; /dev/zero is cut."""
    with pytest.raises(ConfigError, match="^'/dev/null' holds no settings"):
        load_train_config("/dev/null")
    with pytest.raises(ConfigError, match="^'/dev/zero' is not a regular file and gave more than"):
        load_train_config("/dev/zero")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("lr: 0.003\n"), daemon=True)
    writer.start()
    assert load_train_config(str(fifo)).lr == 0.003
    writer.join()


def test_an_nf4_base_without_bitsandbytes_is_a_config_error_before_any_model_loads(monkeypatch, tmp_path):
    """`deltatune train --config configs/qlora-nf4.yaml` without bitsandbytes loaded the data and the model, then
    ended in "unexpected ImportError; this is a bug in deltatune" with a traceback."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    message = (
        "the NF4 base needs bitsandbytes, which is not installed; install it with: pip install "
        "'bitsandbytes>=0.46' (or pip install 'deltatune[quant]'); or use qlora-int8"
    )
    for overrides, key in ((["method=qlora-nf4"], "method qlora-nf4"), (["quantize=nf4"], "quantize: nf4")):
        with pytest.raises(ConfigError, match=re.escape(f"{key}: {message}")):
            load_train_config(None, overrides)
    load_train_config(None, ["method=qlora-int8"])  # needs nothing more


def test_a_runs_peak_memory_is_its_own_not_the_process_that_started_it():
    """`compare` starts one process per method: their peak was `ru_maxrss`, which on Linux keeps the starting
    process's peak across exec, so started from a test session (or a notebook) every method's 'peak' was at
    least that process's size (LoRA's came out at 534-628 MB in the full suite, 401 MB alone)."""
    import subprocess
    import sys

    ballast = bytearray(1536 * 2**20)
    ballast[::4096] = b"\1" * len(range(0, len(ballast), 4096))  # touched: resident
    code = "import torch; from deltatune.train.loop import peak_memory_mb; print(peak_memory_mb(torch.device('cpu')))"
    child = float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    del ballast
    assert 20 < child < 1024, (
        child
    )  # torch and deltatune imported: a few hundred MB, not the parent's 1.5 GB+


def test_print_config_shows_every_setting_as_a_config_that_loads_back_and_trains_nothing(tmp_path, capsys):
    """The settings were listed only in the source (TrainConfig) and configs/*.yaml; `--print-config` checks them
    and prints all of them, defaults included, in the form `--config` takes."""
    from deltatune.train.cli import train_main

    data = classification_data(tmp_path / "d.jsonl", n=8)
    out = tmp_path / "never"
    overrides = [f"data={data}", "method=dora", "lr=3e-4", "method_args.r=4", f"output_dir={out}"]
    assert train_main(["--print-config", *overrides]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("model: embedded:minilm\n") and "\nmethod: dora\n" in printed
    assert "\nlr: 0.0003\n" in printed and "\n  r: 4\n" in printed and "\nsave_every: 50\n" in printed
    keys = {line.split(":")[0] for line in printed.splitlines() if line and not line.startswith(" ")}
    assert keys == {f.name for f in dataclasses.fields(TrainConfig)}  # every setting, not only those given
    (tmp_path / "printed.yaml").write_text(printed)
    assert load_train_config(str(tmp_path / "printed.yaml")) == load_train_config(None, overrides)
    assert not out.exists()  # nothing ran
    # a bad setting is refused as without it
    assert train_main(["--print-config", "method=lorax"]) == 2
    assert "method: unknown 'lorax' (did you mean 'lora'?)" in capsys.readouterr().err
    for flag in ("--resume", "--overwrite"):  # they were accepted and ignored
        with pytest.raises(SystemExit):
            train_main(["--print-config", flag])
        assert "--print-config prints the settings and runs nothing" in capsys.readouterr().err


def test_a_second_run_cant_write_into_the_folder_of_a_run_still_training(tmp_path):
    """Nothing stopped `--overwrite` (or `--resume`, or a new run before the first wrote its config) in the
    folder of a run still training: the second deleted or interleaved with the live run's files."""
    from deltatune import checkpoint

    bert = tiny_bert_folder(tmp_path / "bert")
    data = classification_data(tmp_path / "d.jsonl", n=16)
    out = tmp_path / "run"
    args = [f"model={bert}", f"data={data}", "max_steps=2", "batch_size=4", "progress=false", "save_every=1"]
    run(load_train_config(None, [*args, f"output_dir={out}"]))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    live = checkpoint.FolderLock()  # the lock a run training there holds
    assert live.acquire(str(out)) and live.fd is not None
    try:
        for extra, flags in (([], {}), ([], {"overwrite": True}), (["max_steps=3"], {"resume": True})):
            with pytest.raises(
                ConfigError, match="is in use: another deltatune train or compare is writing there now"
            ):
                run(load_train_config(None, [*args, *extra, f"output_dir={out}"]), **flags)
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing removed or rewritten
    finally:
        live.release()
    # once it has ended (its process exits, or it returns), the folder is free again: resume works
    summary = run(load_train_config(None, [*args, "max_steps=3", f"output_dir={out}"]), resume=True)
    assert summary["status"] == "completed" and summary["steps"] == 3
    free = checkpoint.FolderLock()
    assert free.acquire(str(out)) and free.fd is not None  # the run released its own lock
    free.release()


def _sleep_in_child(started, seconds: float) -> None:
    import time

    started.set()
    time.sleep(seconds)


def test_a_forked_worker_that_outlives_its_run_leaves_no_stale_lock(tmp_path):
    """Tokenizing with num_proc forks workers while the run holds its folder lock; a run killed with SIGKILL
    left them running (orphans), and their copies of the lock's descriptor kept the folder 'in use: another
    deltatune run is training there now' until someone found and killed them."""
    import multiprocessing

    from deltatune import checkpoint

    folder = str(tmp_path)
    run_lock = checkpoint.FolderLock()
    assert run_lock.acquire(folder)
    fork = multiprocessing.get_context("fork")
    started = fork.Event()
    worker = fork.Process(target=_sleep_in_child, args=(started, 60))
    worker.start()
    try:
        assert started.wait(30)
        other = checkpoint.FolderLock()
        assert not other.acquire(folder)  # the run itself still holds it
        run_lock.release()  # the run ends (as its process does at SIGKILL); its forked worker lives on
        assert worker.is_alive()
        assert other.acquire(folder) and other.fd is not None  # free: the worker held no copy
        other.release()
    finally:
        worker.kill()
        worker.join()
