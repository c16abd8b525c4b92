"""The command line and the tools around the happy path (issue 19): fast `--help` with every option's help
and default, one spelling of dtypes, "did you mean" for other tools' key names, files written with the
user's umask, portable base names, a merged classifier that keeps its label names (through
`transformers.pipeline`), `generate` on a classifier, `inspect` on a run folder, `max_steps` semantics, and a
failed run that leaves nothing behind."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import stat
import subprocess
import sys
import time

import pytest
import tiny_models
import torch
from train_helpers import classification_data, tiny_bert_folder

from deltatune import LoraConfig, cli, dtypes, get_peft_model
from deltatune.embedded import DEFAULT_MODEL, minilm_path, portable_name
from deltatune.errors import CheckpointError, ConfigError
from deltatune.train.config import load_train_config

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src"))
ENV = {**os.environ, "PYTHONPATH": SRC}
# Commands whose modules import torch/fastapi before parsing their options: none (each parses first).
HEAVY: set[str] = set()


# ---- --help ------------------------------------------------------------------------------------------------------
def test_help_answers_fast_without_importing_torch():
    script = (
        "import sys, time\n"
        "from deltatune import cli\n"
        "out = {}\n"
        f"for name in [c for c in cli.COMMANDS if c not in {sorted(HEAVY)!r}]:\n"
        "    try:\n"
        "        cli.main([name, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'fastapi') if m in sys.modules), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "[]"  # no heavy import behind any --help
    for args in (
        ["--help"],
        ["train", "--help"],
        ["inspect", "--help"],
        ["serve", "--help"],
        ["bench", "--help"],
        ["ui", "--help"],
    ):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "deltatune", *args], capture_output=True, text=True, env=ENV, timeout=60
        )
        elapsed = time.perf_counter() - start
        assert proc.returncode == 0 and "usage: deltatune" in proc.stdout
        assert elapsed < 3.0, (
            f"deltatune {' '.join(args)} took {elapsed:.2f}s"
        )  # ~0.2 s; generous on shared CPUs


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Each command's parser, caught as `main` builds it (parse_args is stopped before anything runs)."""
    found = {}

    class Stop(Exception):
        pass

    original = argparse.ArgumentParser.parse_args
    intermixed = argparse.ArgumentParser.parse_intermixed_args
    known_intermixed = argparse.ArgumentParser.parse_known_intermixed_args

    def capture(self, *args, **kwargs):
        found[self.prog.split()[-1]] = self
        raise Stop

    argparse.ArgumentParser.parse_args = capture
    argparse.ArgumentParser.parse_intermixed_args = capture
    argparse.ArgumentParser.parse_known_intermixed_args = capture
    try:
        for name in cli.COMMANDS:
            if name in HEAVY:
                continue
            with contextlib.suppress(Stop), contextlib.redirect_stdout(io.StringIO()):
                module = __import__(cli.COMMANDS[name][0], fromlist=["_"])
                (getattr(module, f"{name}_main", None) or module.main)(["--help"])
    finally:
        argparse.ArgumentParser.parse_args = original
        argparse.ArgumentParser.parse_intermixed_args = intermixed
        argparse.ArgumentParser.parse_known_intermixed_args = known_intermixed
    return found


def test_every_option_has_help_with_its_default():
    parsers = _parsers()
    assert set(parsers) == set(cli.COMMANDS) - HEAVY
    missing, no_default = [], []
    for name, parser in parsers.items():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            if not action.help:
                missing.append(f"{name} {action.option_strings or action.dest}")
                continue
            shown = parser._get_formatter()._get_help_string(action) % vars(action)
            empty = action.default is None or action.default in ("", {}, [])
            has_value = action.option_strings and action.nargs != 0 and not empty
            if has_value and "default" not in shown.lower():
                no_default.append(f"{name} {action.option_strings}")
    assert missing == [] and no_default == []


def test_dtype_names_and_aliases_are_accepted_everywhere():
    for name, canon in [("fp32", "fp32"), ("float32", "fp32"), ("bfloat16", "bf16"), ("FP16", "fp16")]:
        assert dtypes.argument(name) == canon
    assert dtypes.torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(argparse.ArgumentTypeError, match="use fp32, bf16 or fp16"):
        dtypes.argument("int4")
    config = load_train_config(None, ["precision=bfloat16", "base_dtype=float32"])
    assert (config.precision, config.base_dtype) == ("bf16", "fp32")


def test_bf16_on_a_cpu_without_native_bf16_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(dtypes, "_warned", set())
    monkeypatch.delenv("DELTATUNE_NO_DTYPE_WARNING", raising=False)
    with caplog.at_level("WARNING", logger="deltatune.dtypes"):
        assert dtypes.warn_if_slow("bf16", "cpu") is True
        assert dtypes.warn_if_slow("bfloat16", "cpu") is False  # once
        assert dtypes.warn_if_slow("fp32", "cpu") is False
    assert [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()] != []
    monkeypatch.setattr(dtypes, "_warned", set())
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: True)
    assert dtypes.warn_if_slow("bf16", "cpu") is False


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("learning_rate=1e-4", "'lr'"),
        ("rank=4", "'method_args.r'"),
        ("method_args.rank=4", "'r'"),
        ("method_args.alpha=16", "'lora_alpha'"),
        ("epoch=2", "'epochs'"),
        ("num_train_epochs=2", "'epochs'"),
        ("batch=4", "'batch_size'"),
        ("per_device_train_batch_size=4", "'batch_size'"),
        ("gradient_accumulation_steps=2", "'grad_accum'"),
        ("model_name_or_path=x", "'model'"),
        ("bacth_size=4", "'batch_size'"),  # a typo: the closest name
    ],
)
def test_did_you_mean_covers_common_aliases(override, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean {suggestion}"):
        load_train_config(None, [override])


def test_an_override_yaml_reads_otherwise_says_to_quote_it():
    """`data=*.jsonl` (a glob) is a YAML alias: the error quoted PyYAML's scanner and nothing else."""
    with pytest.raises(ConfigError, match=r"""quote it to give it as text: data='"\*\.jsonl"'$"""):
        load_train_config(None, ["data=*.jsonl"])
    with pytest.raises(ConfigError, match=r"not valid YAML \(.*\)$"):  # no hint where quoting isn't it
        load_train_config(None, ["data=[a"])
    with pytest.raises(ConfigError, match=r"data file not found: '\*\.jsonl'"):  # quoted: read as the text
        load_train_config(None, ['data="*.jsonl"'])


def test_max_steps_zero_is_refused_and_unset_means_epochs():
    with pytest.raises(ConfigError, match=r"max_steps: must be at least 1, got 0; leave it unset \(null\)"):
        load_train_config(None, ["max_steps=0"])
    assert load_train_config(None, ["max_steps=null", "epochs=2"]).max_steps is None
    assert load_train_config(None, []).max_steps is None


def test_estimate_lists_and_runs_every_method(capsys):
    from deltatune.config import METHODS

    for method in METHODS:
        assert cli.main(["estimate", "--params", "1.3e9", "--method", method, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["method"] == method


# ---- files, names, tools ------------------------------------------------------------------------------------------
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(folder) -> dict[str, int]:
    return {
        os.path.relpath(os.path.join(root, n), folder): stat.S_IMODE(os.stat(os.path.join(root, n)).st_mode)
        for root, dirs, files in os.walk(folder)
        for n in files + dirs
    }


def test_files_are_written_with_the_users_umask(tmp_path, umask_022):
    model = get_peft_model(tiny_models.opt(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "a")
    assert set(_modes(tmp_path / "a").values()) == {0o644}
    os.umask(0o077)
    model.save_pretrained(tmp_path / "b")
    assert set(_modes(tmp_path / "b").values()) == {0o600}


def test_portable_base_names():
    assert portable_name(None) == DEFAULT_MODEL
    assert portable_name(minilm_path()) == DEFAULT_MODEL
    assert portable_name("facebook/opt-125m") == "facebook/opt-125m"
    assert portable_name("models/mine") == "models/mine"


LABELS = {"negative": 0, "neutral": 1, "positive": 2}


@pytest.fixture
def classifier(tmp_path):
    """A tiny BERT base folder and a trained-looking LoRA classification adapter with its label map."""
    base = tiny_models.save_with_tokenizer(tiny_models.bert_cls(num_labels=3), tmp_path / "base")
    model = get_peft_model(
        tiny_models.bert_cls(num_labels=3), LoraConfig(r=2, task_type="SEQ_CLS", base_model_name_or_path=base)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "classifier" in name and name.endswith("weight"):
                p.normal_(0, 1.0)
    adapter = tmp_path / "run" / "adapter"
    model.save_pretrained(adapter)
    (adapter / "label_map.json").write_text(json.dumps(LABELS))
    tiny_models.tokenizer().save_pretrained(adapter)
    return base, str(adapter)


def test_an_empty_out_is_refused_in_one_line_before_anything_loads(tmp_path, classifier, capsys, monkeypatch):
    """`merge --out ''` loaded both models, made its temp folder in the working folder's parent and failed
    renaming it to '' ('No such file or directory: /tmp/.merge-...'); compare and demo said the same."""
    base, adapter = classifier
    monkeypatch.chdir(tmp_path)
    for out in ("", "  "):
        assert cli.main(["merge", "--adapter", adapter, "--out", out]) == 2
        err = capsys.readouterr().err
        assert (
            err
            == f"deltatune merge: error: --out {out!r} names no folder; give the folder to write the merged model in\n"
        )
    with pytest.raises(SystemExit) as e:  # demo's argparse error
        cli.main(["demo", "--steps", "1", "--out", ""])
    assert e.value.code == 2 and "--out : names no folder (it is empty)" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["base", "run"] and not any(
        n.startswith(".merge-") for n in os.listdir(tmp_path.parent)
    )


def test_merged_classifier_keeps_label_names_through_pipeline(tmp_path, classifier, umask_022, capsys):
    from transformers import pipeline

    base, adapter = classifier
    out = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", adapter, "--out", str(out), "--dtype", "float32"]) == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755  # not mkdtemp's 0700
    assert all(mode == 0o644 for name, mode in _modes(out).items())
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert config["label2id"] == LABELS
    classify = pipeline("text-classification", model=str(out), device="cpu")
    answers = classify(["w3 w4 w5", "w10 w11"])
    assert {a["label"] for a in answers} <= set(LABELS)
    capsys.readouterr()
    # `generate` on a classification adapter classifies, with the same names.
    assert cli.main(["generate", "--adapter", adapter, "--prompt", "w3 w4 w5", "--prompt", "w10 w11"]) == 0
    captured = capsys.readouterr()
    rows = [line.split("\t") for line in captured.out.splitlines()]
    assert [r[0] for r in rows] == [a["label"] for a in answers] and [r[2] for r in rows] == [
        "w3 w4 w5",
        "w10 w11",
    ]
    assert "classification adapter" in captured.err


def test_generate_refuses_empty_prompts_too_many_tokens_and_a_base_without_tokenizer(
    tmp_path, classifier, capsys
):
    base, adapter = classifier
    for argv, message in [
        (
            ["--adapter", adapter, "--prompt", "w1", "--prompt", ""],
            "the prompt '' gives no tokens with this tokenizer",
        ),
    ]:
        assert cli.main(["generate", *argv]) == 2
        assert message in capsys.readouterr().err
    lm = tmp_path / "lm"
    tiny_models.save_with_tokenizer(tiny_models.opt(), lm)
    get_peft_model(tiny_models.opt(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "a"
    )
    argv = ["generate", "--base", str(lm), "--adapter", str(tmp_path / "a"), "--prompt", "w1 w2"]
    limit = tiny_models.opt().config.max_position_embeddings
    assert cli.main([*argv, "--max-new-tokens", str(limit)]) == 2  # was an IndexError from the position table
    assert (
        f"a prompt of 2 tokens and {limit} new tokens go beyond this model's {limit} positions: ask for at most "
        f"{limit - 2} new tokens" in capsys.readouterr().err
    )
    assert cli.main([*argv, "--max-new-tokens", str(limit - 2)]) == 0
    capsys.readouterr()
    for name in os.listdir(lm):  # the model without its tokenizer: transformers makes an empty one silently
        if name not in ("config.json", "model.safetensors", "generation_config.json"):
            os.remove(lm / name)
    assert cli.main(argv) == 2
    assert f"{lm} has no tokenizer files (tokenizer.json" in capsys.readouterr().err
    from deltatune.serve import Engine

    with pytest.raises(ConfigError, match="has no tokenizer files"):
        Engine(str(lm), device="cpu")


@pytest.mark.parametrize(
    "option, message",
    [
        (
            ["--seed", str(10**23)],
            f"--seed must be an integer from 0 to 4294967295 (2**32 - 1), got {10**23}",
        ),
        (["--seed", "-1"], "--seed must be an integer from 0 to 4294967295 (2**32 - 1), got -1"),
        # a prompt typed in a Latin-1 terminal: Python gets the byte 0xe9 as the lone surrogate '\udce9'
        (
            ["--prompt", "caf\udce9"],
            "--prompt 'caf\\udce9' is not UTF-8 text (at character 3): pass the prompt",
        ),
    ],
)
def test_generate_refuses_a_seed_torch_cant_take_and_a_prompt_that_is_not_utf8_before_loading(
    tmp_path, capsys, option, message
):
    """`--seed 10**23` was "ValueError: Overflow when unpacking long long" and a non-UTF-8 prompt a tokenizers
    TypeError, both tracebacks after the models had loaded."""
    argv = ["generate", "--adapter", str(tmp_path / "not-loaded"), "--prompt", "w1", *option]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"deltatune generate: error: {message}") and err.count("\n") == 1, err


def test_a_model_folder_without_tokenizer_files_is_refused_where_transformers_makes_an_empty_one(tmp_path):
    from transformers import AutoTokenizer

    from deltatune.vocab import load_tokenizer

    folder = tiny_bert_folder(tmp_path / "bert")
    assert (
        load_tokenizer(folder)("w1 w2")["input_ids"]
        == AutoTokenizer.from_pretrained(folder)("w1 w2")["input_ids"]
    )
    for name in os.listdir(folder):
        if name.startswith(("tokenizer", "special_tokens", "vocab")):
            os.remove(os.path.join(folder, name))
    empty = AutoTokenizer.from_pretrained(folder)  # no error: every sentence becomes [CLS] [UNK] [SEP]
    assert empty("w1 w2")["input_ids"] == empty("anything else")["input_ids"]
    with pytest.raises(ConfigError, match="has no tokenizer files"):
        load_tokenizer(folder)
    from deltatune.train.run import _load_tokenizer

    with pytest.raises(ConfigError, match="has no tokenizer files"):  # `deltatune train`'s
        _load_tokenizer(argparse.Namespace(model=folder))
    out = tmp_path / "compare"
    assert (
        cli.main(["compare", "--model", folder, "--methods", "lora", "--steps", "1", "--out", str(out)]) == 2
    )
    assert (
        not out.exists()
    )  # refused before any work (each method's run failed with it, and compare said rc 0)


def test_inspect_shows_label_names_and_takes_a_run_folder_for_its_adapter(classifier, capsys, tmp_path):
    """A run folder (what `deltatune train` wrote) was refused by the tools with "use its adapter/", while `serve
    --adapters` takes it: the tools now take it too, for its `adapter/`."""
    _, adapter = classifier
    assert cli.main(["inspect", adapter]) == 0
    direct = capsys.readouterr().out
    assert "labels       3: negative, neutral, positive" in direct
    run_folder = os.path.dirname(adapter)
    assert cli.main(["inspect", run_folder]) == 0
    assert capsys.readouterr().out == direct  # the same adapter, the same report
    merged = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", run_folder, "--out", str(merged)]) == 0
    assert json.loads((merged / "config.json").read_text())["id2label"] == {
        "0": "negative",
        "1": "neutral",
        "2": "positive",
    }
    capsys.readouterr()
    answers = []
    for given in (adapter, run_folder):
        assert cli.main(["generate", "--adapter", given, "--prompt", "what a lovely day"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].endswith("\twhat a lovely day\n")
    # a run that never finished has no adapter/: said so, with how to resume it
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "train_config.yaml").write_text("method: lora\n")
    assert cli.main(["inspect", str(unfinished)]) == 1
    assert "is a training run folder with no adapter yet (the run did not finish)" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="adapter folder not found"):
        from deltatune.tools import adapter_dir

        adapter_dir(os.path.join(run_folder, "nope"))


def test_a_run_failed_before_its_first_step_leaves_nothing_and_records_a_portable_base(
    tmp_path, capsys, monkeypatch
):
    base = tiny_bert_folder(tmp_path / "bert")
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"text": "w1 w2", "label": "a"}\n{"text": "w3"}\n')
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    args = ["train", "model=bert", "data=data.jsonl", "output_dir=run", "max_steps=1", "progress=false"]
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 2 and "deltatune train: error:" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    classification_data(bad)
    assert cli.main(args) == 0  # the rerun needs no --overwrite
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "bert"
    assert base.endswith("bert")


def test_auto_dtypes_pick_what_the_machine_computes_fast(monkeypatch):
    from deltatune.train.config import resolve_dtypes

    config = load_train_config(None, ["precision=auto", "base_dtype=auto"])
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: False)
    slow = resolve_dtypes(config, torch.device("cpu"))
    assert (slow.precision, slow.base_dtype) == ("fp32", "fp32")
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: True)
    fast = resolve_dtypes(config, torch.device("cpu"))
    assert (fast.precision, fast.base_dtype) == ("bf16", "bf16")
    explicit = load_train_config(None, ["precision=bf16", "base_dtype=auto"])
    assert resolve_dtypes(explicit, torch.device("cpu")).base_dtype == "bf16"
    kept = load_train_config(None, ["precision=fp32", "base_dtype=auto"])
    assert resolve_dtypes(kept, torch.device("cpu")).base_dtype == "fp32"
    shipped = load_train_config(
        os.path.join(os.path.dirname(__file__), "..", "configs", "opt-quotes-lora.yaml")
    )
    assert (shipped.precision, shipped.base_dtype) == ("auto", "auto")


def test_train_options_may_come_between_overrides(capsys):
    """`deltatune train lr=1 --overwrite learning_rate=2`: the options are parsed wherever they are, so the
    overrides after them reach the config check (not argparse's "unrecognized arguments")."""
    assert cli.main(["train", "method=lora", "--overwrite", "learning_rate=1e-4"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'lr'" in err and "unrecognized arguments" not in err


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, capsys):
    """`demo --out FILE` trained, then ended in a ValueError traceback called a bug; `merge --out` under a file
    loaded and merged both models first."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--steps", "1", "--out", str(a_file)])
    assert e.value.code == 2
    assert f"--out {a_file}: is a file, not a folder; give a folder" in capsys.readouterr().err
    argv = ["merge", "--base", "nowhere", "--adapter", "nowhere", "--out", str(a_file / "merged")]
    assert cli.main(argv) == 2
    assert (
        f"can't write into {str(a_file)!r} (is a file, not a folder); pick another --out"
        in capsys.readouterr().err
    )
    model = get_peft_model(tiny_models.opt(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(CheckpointError, match="is a file; save_pretrained needs a directory"):
        model.save_pretrained(a_file)


def test_train_options_spelt_like_compare_s_and_a_run_folder_as_config_say_what_was_meant(tmp_path, capsys):
    """`deltatune train --max-steps 3` (compare's style) ended in argparse's bare "unrecognized arguments";
    `--config runs/mine` (the run folder, not its train_config.yaml) named no file to use."""
    for argv, meant in (
        (["--max-steps", "3"], "max_steps=3"),
        (["--max-steps=3", "lr=1e-3"], "max_steps=3"),
        (["--epochs"], "epochs=..."),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(["train", *argv])
        assert e.value.code == 2
        assert f"; train settings are key=value overrides: {meant}" in capsys.readouterr().err
    (tmp_path / "train_config.yaml").write_text("method: lora\n")
    assert cli.main(["train", "--config", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"is a folder; give a YAML file (a run's settings: '{tmp_path}/train_config.yaml')" in err


def test_an_unknown_train_option_is_said_to_be_a_setting_only_when_it_names_one(capsys):
    """`--learning-rate 1e-3` (transformers' name) was said to mean learning_rate=1e-3, itself an unknown key, and
    `--verbose` verbose=..., a setting train doesn't have: the override is named by the key it would set."""
    for argv, said in (
        (["--learning-rate", "1e-3"], "--learning-rate; train settings are key=value overrides: lr=1e-3"),
        (["--Num-Train-Epochs=2"], "--Num-Train-Epochs=2; train settings are key=value overrides: epochs=2"),
        (
            ["--fields.text", "body"],
            "--fields.text; train settings are key=value overrides: fields.text=body",
        ),
        (
            ["--verbose"],
            "--verbose; train settings are key=value overrides, and none is named 'verbose' (see configs/)",
        ),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(["train", *argv])
        assert e.value.code == 2
        assert capsys.readouterr().err.endswith(f"deltatune train: error: unrecognized arguments: {said}\n")


def test_demo_removes_its_temp_adapter_and_keeps_one_given_out(tmp_path, monkeypatch, capsys):
    """Without `--out` the demo left a `deltatune-demo-*` folder in /tmp on every run, though the README and its
    help say `--out` is what keeps the adapter."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert cli.main(["demo", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert (
        "3. saved the adapter to a temp folder (" in out
        and "removed at the end; --out FOLDER keeps it" in out
    )
    assert "5. merged into the base" in out
    # the README: reloaded onto a fresh base "(same outputs)" and merged "(same outputs again)"
    diffs = [float(line.rsplit("= ", 1)[1]) for line in out.splitlines() if "max |diff| = " in line]
    assert len(diffs) == 2 and diffs[0] == 0.0 and diffs[1] < 1e-5, out
    assert "trainable params: 74,498 || " in out
    assert os.listdir(scratch) == []
    kept = tmp_path / "kept"
    assert cli.main(["demo", "--steps", "1", "--out", str(kept)]) == 0
    assert f"3. saved the adapter to {kept}: " in capsys.readouterr().out
    assert sorted(os.listdir(kept)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_merge_and_demo_that_cannot_write_end_in_one_line_and_leave_nothing(tmp_path, classifier):
    """Under `ulimit -f` (as on a full disk) safetensors raises its own SafetensorError, which `merge` and `demo`
    showed as a traceback ("a bug in deltatune"); `demo --out NEW` also left the empty folder it had made, and
    both left the parent folders they had made for --out."""
    base, adapter = classifier
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4_000, resource.RLIM_INFINITY)); "
        "from deltatune.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    for argv, said in (
        (
            ["merge", "--base", base, "--adapter", adapter, "--out", str(tmp_path / "m" / "merged")],
            "merged model",
        ),
        (["demo", "--steps", "1", "--out", str(tmp_path / "d" / "e" / "demo")], "adapter"),
    ):
        proc = subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=ENV, timeout=300
        )
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith(f"deltatune {argv[0]}: error: could not ") and f"the {said} to " in line, line
        assert "file-size limit, ulimit -f" in line
    assert sorted(os.listdir(tmp_path)) == ["base", "run"]  # no m/, d/ or .merge-* temp folder


def test_demo_out_in_a_busy_folder_reports_the_adapters_size(tmp_path, capsys):
    """`demo --out .` in a folder holding other files reported their size as the adapter's (5178 KiB with a 5 MB
    file beside it, where the adapter is 295 KiB): the size summed every file in the folder."""
    (tmp_path / "big.bin").write_bytes(b"x" * 5_000_000)
    (tmp_path / "sub").mkdir()
    assert cli.main(["demo", "--steps", "1", "--out", str(tmp_path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("3. saved"))
    adapter = sum(os.path.getsize(tmp_path / f) for f in ("adapter_config.json", "adapter_model.safetensors"))
    assert f": {adapter / 1024:.0f} KiB;" in line
    assert adapter < 1_000_000


def test_a_label_map_nested_too_deeply_ends_in_one_line(classifier, capsys):
    """json.load raises RecursionError on deep nesting: `inspect` printed a traceback and "this is a bug"."""
    _, adapter = classifier
    with open(os.path.join(adapter, "label_map.json"), "w") as f:
        f.write("[" * 100000 + "]" * 100000)
    assert cli.main(["inspect", adapter]) == 1
    err = capsys.readouterr().err
    assert err.startswith("deltatune inspect: error: ") and "nests too deeply" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("tokenizer.json", ""),
        ("tokenizer.json", "[1]"),
        ("tokenizer_config.json", "[1]"),
        ("tokenizer.json", "{x"),
    ],
)
def test_damaged_tokenizer_files_of_an_adapter_end_in_one_line(classifier, capsys, name, text):
    """An empty, torn or list-shaped tokenizer.json / tokenizer_config.json in the adapter folder was a
    JSONDecodeError, TypeError or AttributeError traceback reported as a bug."""
    _, adapter = classifier
    with open(os.path.join(adapter, name), "w") as f:
        f.write(text)
    assert cli.main(["generate", "--adapter", adapter, "--prompt", "what a lovely day"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (transformers' weight-loading bar may come before it)
    assert "Traceback" not in err and last.startswith(
        f"deltatune generate: error: the tokenizer files in {adapter} can't be read ("
    ), err


def test_an_adapter_config_edited_to_another_task_is_an_adapter_that_does_not_fit(classifier, capsys):
    """task_type edited from SEQ_CLS to CAUSAL_LM loads the base without its classifier, which the saved
    modules_to_save then matched nowhere: a plain ValueError traceback reported as a bug."""
    _, adapter = classifier
    path = os.path.join(adapter, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, "task_type": "CAUSAL_LM"}, f)
    assert cli.main(["generate", "--adapter", adapter, "--prompt", "what a lovely day"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        f"deltatune generate: error: the adapter in {adapter} does not fit this model"
    ), err
