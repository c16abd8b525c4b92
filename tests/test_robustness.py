"""Hostile and careless input to the library and the command line (issue 12): adapter names that are
`nn.Module` attributes, malformed `adapter_config.json` files, configs whose ranks don't match the weights
(refused before anything is allocated), YAML alias bombs, and every expected failure of `deltatune train`
ending in one line with a non-zero exit (a full disk, a file-size limit, an interrupted save, bad data, a
missing model), with `--debug` showing the traceback."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import time

import pytest
import tiny_models
import torch
from torch import nn
from train_helpers import classification_data, tiny_bert_folder

from deltatune import LoraConfig, PeftModel, checkpoint, cli, get_peft_model
from deltatune.config import BottleneckConfig, ConfigError, load_config
from deltatune.errors import CheckpointError, short
from deltatune.model import ADAPTER_NAME_RULE, check_adapter_name
from deltatune.train.config import load_train_config

SRC = os.path.join(os.path.dirname(__file__), "..", "src")
MODULE_ATTRIBUTES = [
    "train",
    "to",
    "half",
    "float",
    "cuda",
    "forward",
    "training",
    "_modules",
    "dump_patches",
]


def _lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _delta_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if getattr(m, "is_delta_layer", False)]


# ---- adapter names ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODULE_ATTRIBUTES)
def test_module_attribute_names_are_refused_up_front_everywhere(tmp_path, name):
    saved = get_peft_model(tiny_models.opt(), _lora())
    saved.save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError) as e:
        get_peft_model(tiny_models.opt(), _lora(), adapter_name=name)
    assert str(e.value) == f"invalid adapter name {name!r}: {ADAPTER_NAME_RULE}"

    model = get_peft_model(tiny_models.opt(), _lora())
    before = _delta_layers(model)
    for call in (
        lambda: model.add_adapter(name, _lora()),
        lambda: model.load_adapter(tmp_path / "a", adapter_name=name),
    ):
        with pytest.raises(ValueError, match="not an attribute name of torch.nn.Module"):
            call()
        assert model.adapter_names == ["default"] and _delta_layers(model) == before
    base = tiny_models.opt()
    with pytest.raises(ValueError, match="not an attribute name of torch.nn.Module"):
        PeftModel.from_pretrained(base, tmp_path / "a", adapter_name=name)
    assert _delta_layers(base) == []  # nothing was put into the base


def test_every_module_attribute_is_refused_and_other_names_work_in_every_container():
    reserved = set(dir(nn.ModuleDict())) | set(dir(nn.ParameterDict()))
    for name in reserved:
        with pytest.raises(ValueError):
            check_adapter_name(name)
    for bad in ("", "a.b", "a/b", "..", "__base__", "x\x00y", 3, None):
        with pytest.raises(ValueError):
            check_adapter_name(bad)
    # Names that pass the rule work in LoRA's ModuleDicts and ParameterDicts (DoRA), bottleneck adapters and
    # the classification head's modules_to_save, and in a mixed batch.
    model = get_peft_model(tiny_models.opt(), _lora())
    names = ["Train", "spam-v2", "train_", "my adapter", "ünï", "T0"]
    for name in names:
        model.add_adapter(name, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("cuda_", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True))
    model.eval()
    x = tiny_models.ids(batch=len(names))
    with torch.no_grad():
        mixed = model(x, adapter_names=names).logits
        model.set_adapter("spam-v2")
        alone = model(x).logits
    assert torch.allclose(mixed[1], alone[1], atol=1e-5)
    bottleneck = get_peft_model(tiny_models.bert_cls(), BottleneckConfig(task_type="SEQ_CLS"), "Train")
    bottleneck.add_adapter("half_", BottleneckConfig(task_type="SEQ_CLS"))
    assert bottleneck.adapter_names == ["Train", "half_"]


# ---- adapter_config.json ----------------------------------------------------------------------------------------
@pytest.fixture
def saved_adapter(tmp_path):
    model = get_peft_model(tiny_models.opt(), _lora())
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _edit_config(directory, **changes) -> str:
    path = directory / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rank_pattern": []}, "field 'rank_pattern' must be a mapping of strings to integers, got list []"),
        ({"r": "8"}, "field 'r' must be an integer, got str '8'"),
        ({"r": True}, "field 'r' must be an integer, got bool True"),
        ({"lora_alpha": [1]}, "field 'lora_alpha' must be a number, got list [1]"),
        (
            {"target_modules": {"q": 1}},
            "field 'target_modules' must be a list of strings or a string or null",
        ),
        ({"alpha_pattern": {"q_proj": "x"}}, "field 'alpha_pattern' must be a mapping of strings to numbers"),
        ({"use_dora": "yes"}, "field 'use_dora' must be true/false, got str 'yes'"),
        ({"r": 0}, "r must be a positive integer, got 0"),
        ({"peft_type": "PREFIX"}, "unsupported peft_type 'PREFIX'"),
        # a list was "unhashable type: 'list'"
        ({"peft_type": [1]}, "unsupported peft_type [1]; deltatune reads FULL"),
    ],
)
def test_adapter_config_fields_are_type_checked_naming_file_and_field(saved_adapter, changes, message):
    path = _edit_config(saved_adapter, **changes)
    with pytest.raises(ConfigError) as e:
        PeftModel.from_pretrained(tiny_models.opt(), saved_adapter)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_null_rank_pattern_loads_as_peft_reads_it(saved_adapter):
    _edit_config(saved_adapter, rank_pattern=None, alpha_pattern=None)
    model = PeftModel.from_pretrained(tiny_models.opt(), saved_adapter)
    assert model.peft_config["default"].rank_pattern == {}


def test_binary_or_non_utf8_config_names_the_file(saved_adapter):
    path = saved_adapter / "adapter_config.json"
    for content in (b"\xff\xfe\x00binary\x00\x9c", '{"r": 8, "x": "caf\xe9"}'.encode("latin-1")):
        path.write_bytes(content)
        with pytest.raises(ConfigError, match=f"^{path} is not UTF-8 text"):
            load_config(saved_adapter)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object, not list"):
        load_config(saved_adapter)


def test_absurd_rank_is_refused_from_the_header_before_anything_is_allocated(saved_adapter, monkeypatch):
    _edit_config(saved_adapter, r=300000)
    import deltatune.methods.lora as lora

    model = get_peft_model(tiny_models.opt(), _lora())

    def no_allocation(*args, **kwargs):
        raise AssertionError("a layer was built before the shapes were checked")

    monkeypatch.setattr(lora, "inject_adapter", no_allocation)
    base = tiny_models.opt()
    with pytest.raises(CheckpointError) as e:
        PeftModel.from_pretrained(base, saved_adapter)
    assert "the config's r is 300000, the saved tensors have rank 4" in str(e.value)
    assert str(saved_adapter) in str(e.value)
    with pytest.raises(CheckpointError, match="300000"):
        model.load_adapter(saved_adapter, "other")
    _edit_config(saved_adapter, r=4, rank_pattern={"q_proj": 64})
    with pytest.raises(
        CheckpointError, match=r"rank_pattern\['q_proj'\] is 64, the saved tensors have rank 4"
    ):
        PeftModel.from_pretrained(tiny_models.opt(), saved_adapter)


def test_header_shapes_match_the_tensors(saved_adapter):
    path = str(saved_adapter / checkpoint.WEIGHTS_NAME)
    tensors = checkpoint.load_tensors(path)
    assert checkpoint.tensor_shapes(path) == {k: tuple(v.shape) for k, v in tensors.items()}
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        checkpoint.tensor_shapes(path)


# ---- messages quote user values shortly ----------------------------------------------------------------------
ALIAS_BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
    "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "model: [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n"
)


def test_yaml_alias_bomb_is_refused_in_a_short_message(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 500
    start = time.perf_counter()
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - start < 5
    assert err.startswith(
        "deltatune train: error: YAML aliases (*a) are not allowed in a train config (line 2)"
    )
    assert len(err) < 400 and "Traceback" not in err


def test_a_key_given_twice_is_refused_naming_the_key_and_lines(tmp_path, capsys):
    """YAML keeps the last of two equal keys without a word: `lr: 1e-3 ... lr: 1e-2` trained at 1e-2."""
    path = tmp_path / "twice.yaml"
    path.write_text("lr: 1e-3\nmethod: lora\nlr: 1e-2\n")
    assert cli.main(["train", "--config", str(path)]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert line == (
        f"deltatune train: error: {path}: key 'lr' is given twice (line 1 and line 3); YAML would keep only "
        "the last: give each key once"
    )
    path.write_text("method_args:\n  r: 4\n  lora_alpha: 8\n  r: 8\n")  # in a section too
    with pytest.raises(ConfigError, match=r"key 'r' is given twice \(line 2 and line 4\)"):
        load_train_config(str(path))
    with pytest.raises(ConfigError, match=r"^override 'method_args=\{r: 1, r: 2\}': key 'r' is given twice"):
        load_train_config(None, ["method_args={r: 1, r: 2}"])
    path.write_text(
        "method_args:\n  r: 4\n  lora_alpha: 8\nlr: 1e-3\n"
    )  # the same key in two sections is fine
    assert load_train_config(str(path)).method_args == {"r": 4, "lora_alpha": 8}


def test_short_quotes_are_bounded_in_size_and_time():
    nested: list = ["lol"] * 9
    for _ in range(9):
        nested = [nested] * 9  # 9**10 items if written out
    start = time.perf_counter()
    assert len(short(nested)) <= 200 and len(short("x" * 10**7, 50)) <= 50
    assert short({"r": 8}) == "{'r': 8}"
    assert time.perf_counter() - start < 0.5


def test_huge_values_in_a_config_are_quoted_shortly(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_text(f"method: {'x' * 100_000}\nbatch_size: [{', '.join(['1'] * 50_000)}]\n")
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "method: unknown 'xxx" in err and "batch_size: expected int, got list [1, 1," in err
    assert len(err) < 1500


# ---- the command line: one line, a non-zero exit, --debug shows the traceback ----------------------------------
@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return tiny_bert_folder(tmp_path_factory.mktemp("bert"))


@pytest.fixture
def data_file(tmp_path):
    return classification_data(tmp_path / "data.jsonl")


def _train(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(["train", *args])
    err = capsys.readouterr().err
    return code, err


def _one_line_error(err: str, command: str = "train") -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith(f"deltatune {command}: error: ")]
    assert len(errors) == 1, err
    return errors[0]


def _options(out, model, data, **extra) -> list[str]:
    options = {
        "model": model,
        "data": data,
        "output_dir": str(out),
        "max_steps": 2,
        "batch_size": 4,
        "eval_at_start": "false",
        "progress": "false",
        "save_every": 1,
        "lr": 1e-3,
    }
    options.update(extra)
    return [f"{k}={v}" for k, v in options.items()]


def test_bad_config_bad_data_missing_model_and_non_utf8_config_end_in_one_line(
    tmp_path, capsys, bert_folder, data_file
):
    code, err = _train(capsys, *_options(tmp_path / "r1", bert_folder, data_file, learning_rate=1))
    assert code == 2 and "unknown key 'learning_rate' (did you mean 'lr'?)" in err and "Traceback" not in err
    # a config's problems: the error line, then one indented line per problem (as the README says)
    code, err = _train(
        capsys, *_options(tmp_path / "r1", bert_folder, data_file, learning_rate=1, max_steps=0)
    )
    assert code == 2 and [line for line in err.splitlines() if line.strip()] == [
        "deltatune train: error: invalid training config:",
        "  unknown key 'learning_rate' (did you mean 'lr'?)",
        "  max_steps: must be at least 1, got 0; leave it unset (null) to train for `epochs`",
    ]

    code, err = _train(capsys, *_options(tmp_path / "r2", str(tmp_path / "no-such-model"), data_file))
    assert code == 2 and "model: folder not found:" in err and "Traceback" not in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label":\n')
    code, err = _train(capsys, *_options(tmp_path / "r3", bert_folder, str(bad)))
    line = _one_line_error(err)
    assert code == 2 and str(bad) in line
    assert not (tmp_path / "r3").exists()  # failed before its first step: nothing left behind

    config = tmp_path / "latin1.yaml"
    config.write_bytes("model: caf\xe9\n".encode("latin-1"))
    code, err = _train(capsys, "--config", str(config))
    line = _one_line_error(err)
    assert (
        code == 2
        and line
        == f"deltatune train: error: {config} is not UTF-8 text (byte offset 10: invalid continuation byte); save it as UTF-8"
    )


def test_offline_hub_name_fails_fast_in_one_line(tmp_path, capsys, monkeypatch, data_file):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    code, err = _train(capsys, *_options(tmp_path / "r", "someone/no-such-model-xyz", data_file))
    assert time.perf_counter() - start < 5
    assert code == 2 and "Traceback" not in err
    assert (
        "'someone/no-such-model-xyz' is not a local folder, and the Hugging Face hub can't be reached" in err
    )


def test_debug_flag_and_env_show_the_traceback(tmp_path, capsys, monkeypatch, data_file):
    monkeypatch.setenv(
        "DELTATUNE_DEBUG", "0"
    )  # `--debug` sets it (for child processes): undone after the test
    options = _options(tmp_path / "r", str(tmp_path / "missing"), data_file)
    code, err = _train(capsys, *options, "--debug")
    assert code == 2 and "Traceback (most recent call last)" in err and "ConfigError" in err
    monkeypatch.setenv("DELTATUNE_DEBUG", "1")
    code, err = _train(capsys, *options)
    assert code == 2 and "Traceback (most recent call last)" in err


def test_full_disk_mid_save_removes_the_temp_folder_and_names_the_intact_checkpoint(
    tmp_path, capsys, monkeypatch, bert_folder, data_file
):
    real = checkpoint.atomic_torch_save
    calls = []

    def full_disk_on_second_save(path, obj):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(path, obj)

    monkeypatch.setattr(checkpoint, "atomic_torch_save", full_disk_on_second_save)
    out = tmp_path / "run"
    code, err = _train(capsys, *_options(out, bert_folder, data_file, max_steps=3))
    line = _one_line_error(err)
    assert code == 1
    step1 = out / "checkpoints" / "step-1"
    assert (
        f"could not save the checkpoint {out / 'checkpoints' / 'step-2'}: no space left on the device" in line
    )
    assert f"the newest intact checkpoint is {step1}" in line and "--resume" in line
    assert sorted(os.listdir(out / "checkpoints")) == ["step-1"]  # no .step-2.tmp
    # The message's advice works: free space, resume. What a killed save left behind goes at the next save.
    (out / "checkpoints" / ".step-9.tmp").mkdir()
    monkeypatch.setattr(checkpoint, "atomic_torch_save", real)
    code, err = _train(capsys, "--config", str(out / "train_config.yaml"), "--resume")
    assert code == 0, err
    assert (out / "adapter" / checkpoint.WEIGHTS_NAME).is_file()
    assert sorted(os.listdir(out / "checkpoints")) == ["step-2", "step-3"]


def test_interrupted_save_leaves_no_temp_folder(tmp_path, capsys, monkeypatch, bert_folder, data_file):
    def interrupted(path, obj):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "atomic_torch_save", interrupted)
    out = tmp_path / "run"
    code, err = _train(capsys, *_options(out, bert_folder, data_file))
    assert code == 130 and "Traceback" not in err
    assert not out.exists() or not any(n.endswith(".tmp") for n in os.listdir(out / "checkpoints"))


def test_file_size_limit_mid_save_in_a_subprocess(tmp_path, bert_folder, data_file):
    """RLIMIT_FSIZE is hit while torch writes the optimizer state (a `full` run's is ~110 KB): one line,
    exit 1, no temp folder, and (with no earlier checkpoint) nothing left behind."""
    out = tmp_path / "run"
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, resource.RLIM_INFINITY)); "
        "from deltatune.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    options = _options(out, bert_folder, data_file, method="full", max_steps=1)
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC)}
    proc = subprocess.run(
        [sys.executable, "-c", code, "train", *options], capture_output=True, text=True, env=env, timeout=300
    )
    line = _one_line_error(proc.stderr)
    assert proc.returncode == 1, proc.stderr
    assert "could not save the checkpoint" in line and "file-size limit" in line
    assert "no earlier checkpoint exists" in line
    assert not out.exists()


# ---- found by attacking the product beyond the list ---------------------------------------------------------
def test_more_hostile_adapter_files(saved_adapter):
    from safetensors.torch import load_file, save_file

    path = _edit_config(saved_adapter, target_modules="(.*")
    with pytest.raises(ConfigError, match=f"^{path}: target_modules is not a valid regular expression"):
        PeftModel.from_pretrained(tiny_models.opt(), saved_adapter)
    _edit_config(saved_adapter, target_modules=["q_proj", "v_proj"])
    weights = str(saved_adapter / checkpoint.WEIGHTS_NAME)
    save_file({k: (v * 100).to(torch.int8) for k, v in load_file(weights).items()}, weights)
    base = tiny_models.opt()
    with pytest.raises(CheckpointError, match="holds integer tensors where weights are expected"):
        PeftModel.from_pretrained(base, saved_adapter)
    assert _delta_layers(base) == []  # unloaded again
    (saved_adapter / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="nests too deeply"):
        load_config(saved_adapter)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lr=1e300", "lr: must be positive and at most 10"),
        ("lr=.inf", "lr: must be positive and at most 10"),
        ("epochs=.nan", "epochs: must be a finite number, got nan"),
        ("output_dir=/dev/null", "output_dir: '/dev/null' is a file, not a folder"),
        ("model=[[1]]", "model: expected str, got list [[1]]"),
        (
            "output_dir=/dev/null/run",
            "output_dir: '/dev/null/run' can't be created: '/dev/null' is a file, not a",
        ),
        ("seed=-1", "seed: must be an integer from 0 to 4294967295 (2**32 - 1), got -1"),
        (f"seed={2**32}", "seed: must be an integer from 0 to 4294967295 (2**32 - 1), got 4294967296"),
        (f"seed={10**20}", "seed: must be an integer from 0 to 4294967295"),
        (
            "output_dir=",
            "override 'output_dir=': the value is empty; give a folder",
        ),  # output_dir=$OUT, OUT unset
        ("output_dir=' '", "output_dir: ' ' names no folder"),
        ("output_dir=''", "output_dir: '' names no folder"),
    ],
)
def test_more_hostile_train_settings_are_config_errors(override, message):
    from deltatune.train.config import load_train_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_config(None, [override])


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_dir_that_cannot_be_made_is_a_config_error_before_the_model_loads(
    tmp_path, capsys, monkeypatch, bert_folder, data_file
):
    """A folder under a file, or in a place nothing can be made in (/proc; a read-only mount): it was an
    OSError's strerror ('Not a directory: ...', exit 1) without saying it was output_dir."""
    import importlib

    run_module = importlib.import_module("deltatune.train.run")  # (deltatune.train.run is also the function)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before output_dir was checked")

    monkeypatch.setattr(run_module, "build_model", no_model)
    code, err = _train(capsys, *_options(tmp_path / "data.jsonl" / "run", bert_folder, data_file))
    assert code == 2 and "Traceback" not in err
    assert (
        f"  output_dir: '{tmp_path / 'data.jsonl' / 'run'}' can't be created: '{tmp_path / 'data.jsonl'}' is a file"
        in err
    )
    code, err = _train(capsys, *_options("/proc/deltatune-no-such-run", bert_folder, data_file))
    assert code == 2
    assert _one_line_error(err) == (
        "deltatune train: error: output_dir '/proc/deltatune-no-such-run' can't be written in: No such file or "
        "directory; set another output_dir"
    )


def test_first_hour_mistakes_with_the_wrapped_model_get_clear_errors(tmp_path):
    # a typo in a method name names the PeftModel (not only its base) and suggests the right name
    model = get_peft_model(tiny_models.opt(), LoraConfig(r=2))
    with pytest.raises(AttributeError) as e:
        model.print_trainable_params()
    assert str(e.value) == (
        "'PeftModel' object has no attribute 'print_trainable_params', nor has its base model (OPTForCausalLM); "
        "did you mean 'print_trainable_parameters'?"
    )
    assert not hasattr(model, "merge_and_unlaod") and hasattr(model, "config")  # passthrough still works
    model.save_pretrained(tmp_path / "a")
    # a path where the loaded base model goes
    with pytest.raises(TypeError, match=r"must be a loaded torch.nn.Module, got str 'opt'; load it first"):
        PeftModel.from_pretrained("opt", tmp_path / "a")
    # the base that get_peft_model changed in place, given again: names the cause and the two ways out
    base = tiny_models.opt()
    get_peft_model(base, LoraConfig(r=2))
    with pytest.raises(
        ValueError, match=r"holds an adapter named 'default' already .* change the model .* in place"
    ):
        PeftModel.from_pretrained(base, tmp_path / "a")
    with pytest.raises(ValueError, match=r"load a saved one with load_adapter"):
        PeftModel.from_pretrained(model, tmp_path / "a")


def test_another_architecture_s_adapter_is_a_checkpoint_that_does_not_fit(tmp_path, capsys):
    """`deltatune merge/generate/inspect --base <a Llama> --adapter <a BERT adapter>` ended in "unexpected
    ValueError; this is a bug in deltatune" with a traceback: the adapter's targets match no module there."""
    bert = get_peft_model(tiny_models.bert_cls(), LoraConfig(r=2, target_modules=["query", "value"]))
    bert.save_pretrained(tmp_path / "bert-adapter")
    with pytest.raises(
        CheckpointError, match=r"does not fit this model \(was it trained on another architecture"
    ):
        PeftModel.from_pretrained(tiny_models.llama(), tmp_path / "bert-adapter")
    wrapped = get_peft_model(tiny_models.llama(), LoraConfig(r=2))
    with pytest.raises(CheckpointError, match=r"target_modules=\['query', 'value'\] matched no module"):
        wrapped.load_adapter(tmp_path / "bert-adapter", adapter_name="bert")
    assert wrapped.adapter_names == ["default"]
    llama = tiny_models.save_with_tokenizer(tiny_models.llama(), tmp_path / "llama")
    capsys.readouterr()
    argv = [
        "merge",
        "--base",
        llama,
        "--adapter",
        str(tmp_path / "bert-adapter"),
        "--out",
        str(tmp_path / "m"),
    ]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "\ndeltatune merge: error: the adapter in" in f"\n{err}" and "Traceback" not in err


def test_the_missing_attribute_error_copies_and_pickles_without_the_model():
    """The error a misspelt attribute raises held the model to make its message when shown; copying or pickling it
    (a worker process sends its error back pickled) failed with a TypeError from its constructor."""
    import copy
    import pickle

    model = get_peft_model(tiny_models.opt(), LoraConfig(r=2))
    with pytest.raises(AttributeError) as e:
        model.print_trainable_params()
    message = str(e.value)
    data = pickle.dumps(e.value)
    assert len(data) < 1000  # the message and name, not the model (68 kB for this tiny one, before)
    for again in (pickle.loads(data), copy.copy(e.value), copy.deepcopy(e.value)):
        assert isinstance(again, AttributeError) and str(again) == message
        assert again.name == "print_trainable_params"


def test_a_property_that_fails_inside_is_not_said_to_be_missing():
    """A property whose own code reads a missing attribute raises an AttributeError, and Python then asks
    `__getattr__` for the property's name: the message said neither model had it and suggested that very name."""

    class Base(type(tiny_models.opt())):
        @property
        def broken(self):
            return self.not_there

    class Wrapper(PeftModel):
        @property
        def also_broken(self):
            return self.not_there_either

    base = tiny_models.opt()
    base.__class__ = Base
    model = Wrapper(base, LoraConfig(r=2))
    for name, owner in (("broken", "Base"), ("also_broken", "Wrapper")):
        with pytest.raises(AttributeError) as e:
            getattr(model, name)
        assert str(e.value) == (
            f"{owner}.{name} raised an AttributeError while it was read: an attribute its own code reads is "
            f"missing (Python then looks {name!r} up as a missing attribute, which hides that first error)"
        )
    with pytest.raises(AttributeError, match=r"nor has its base model \(Base\); did you mean 'broken'\?$"):
        model.brokn()
