"""Adapter files: shape checks, corrupt files, safe `.bin` reading, atomic saves."""

from __future__ import annotations

import os
import pickle

import pytest
import safetensors.torch
import torch
from tiny_models import ids, opt, out

from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.checkpoint import CheckpointError
from deltatune.methods.lora import LoraLinear


def _saved(tmp_path, **kwargs):
    model = get_peft_model(opt(), LoraConfig(r=4, init_lora_weights=False, **kwargs))
    model.save_pretrained(tmp_path)
    return model


def test_shape_mismatch_names_every_key_and_leaves_model_as_it_was(tmp_path):
    _saved(tmp_path, target_modules=["q_proj", "fc1"])
    other = opt(hidden=48)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        PeftModel.from_pretrained(other, tmp_path)
    msg = str(err.value)
    assert (
        "model.decoder.layers.0.self_attn.q_proj.lora_A.default.weight: expected shape (4, 48), found (4, 32)"
        in msg
    )
    assert "layers.1.fc1.lora_B.default.weight: expected shape (96, 4), found (64, 4)" in msg
    assert msg.count("expected shape") == 8
    assert not any(isinstance(m, LoraLinear) for m in other.modules())
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_adapter_moves_to_updated_base_of_same_shape(tmp_path):
    """The article's "swappable base": an adapter loads on a retrained base of the same architecture."""
    model = _saved(tmp_path)
    new_base = opt(seed=5)
    loaded = PeftModel.from_pretrained(new_base, tmp_path)
    layer = loaded.base_model.model.decoder.layers[0].self_attn.q_proj
    src = model.base_model.model.decoder.layers[0].self_attn.q_proj
    assert torch.equal(layer.lora_B["default"].weight, src.lora_B["default"].weight)


@pytest.mark.parametrize("cut", [0, 10, 200])
def test_truncated_safetensors_gives_clear_error(tmp_path, cut):
    _saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        PeftModel.from_pretrained(opt(), tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_weights_are_refused_naming_a_tensor_and_the_model_stays_as_it_was(tmp_path, bad, capsys):
    _saved(tmp_path, target_modules=["q_proj", "v_proj"])
    path = tmp_path / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    poisoned = sorted(k for k in tensors if "v_proj.lora_B" in k)
    for k in poisoned:
        tensors[k][1, 2] = bad
    safetensors.torch.save_file(tensors, path)
    base = opt()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        PeftModel.from_pretrained(base, tmp_path)
    msg = str(err.value)
    assert (
        f"adapter_model.safetensors holds NaN or inf values in {poisoned[0]} (and {len(poisoned) - 1} more)"
        in msg
    )
    assert "retrain it or use an earlier checkpoint" in msg
    assert not any(isinstance(m, LoraLinear) for m in base.modules())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    from deltatune import cli

    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path)]) == 1  # `inspect` says so on a line of its own
    assert f"weights      BROKEN: adapter_model.safetensors holds NaN or inf values in {poisoned[0]}" in (
        capsys.readouterr().out
    )
    _saved(tmp_path / "good")
    assert cli.main(["inspect", str(tmp_path / "good")]) == 0
    assert "weights      all finite" in capsys.readouterr().out
    host = PeftModel.from_pretrained(opt(), tmp_path / "good", adapter_name="good")
    with pytest.raises(CheckpointError, match="holds NaN or inf"):
        host.load_adapter(tmp_path, adapter_name="bad")
    assert "bad" not in host.peft_config


def test_missing_weights_file(tmp_path):
    _saved(tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        PeftModel.from_pretrained(opt(), tmp_path)


def test_bin_adapter_is_read_with_weights_only(tmp_path):
    model = _saved(tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    os.remove(tmp_path / "adapter_model.safetensors")
    torch.save(tensors, tmp_path / "adapter_model.bin")
    loaded = PeftModel.from_pretrained(opt(), tmp_path)
    x = ids()
    torch.testing.assert_close(out(loaded, x), out(model, x), atol=1e-6, rtol=0)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_bin_is_never_unpickled(tmp_path):
    _saved(tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    with open(tmp_path / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Boom()}, f)
    with pytest.raises(CheckpointError, match="is not a plain tensor file .*never runs code in it"):
        PeftModel.from_pretrained(opt(), tmp_path)


def test_crash_mid_save_leaves_previous_adapter_intact(tmp_path, monkeypatch):
    first = _saved(tmp_path)
    before = {p: (tmp_path / p).read_bytes() for p in ("adapter_model.safetensors", "adapter_config.json")}
    second = get_peft_model(opt(seed=9), LoraConfig(r=8, init_lora_weights=False))

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("deltatune.checkpoint.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        second.save_pretrained(tmp_path)
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    monkeypatch.undo()
    loaded = PeftModel.from_pretrained(opt(), tmp_path)
    x = ids()
    torch.testing.assert_close(out(loaded, x), out(first, x), atol=1e-6, rtol=0)


def test_named_adapters_save_in_subfolders_like_peft(tmp_path):
    model = get_peft_model(opt(), LoraConfig(r=2))
    model.add_adapter("other", LoraConfig(r=3, target_modules=["fc1"]))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    tensors = safetensors.torch.load_file(tmp_path / "other" / "adapter_model.safetensors")
    assert all(".fc1.lora_" in k and ".other" not in k for k in tensors)


def test_head_num_labels_reads_the_head_not_a_pre_classifier():
    from deltatune.checkpoint import head_num_labels

    tensors = {
        "base_model.model.pre_classifier.weight": torch.zeros(
            32, 32
        ),  # DistilBERT: [dim, dim], not the labels
        "base_model.model.classifier.weight": torch.zeros(3, 32),
    }
    assert head_num_labels(tensors) == 3
    assert head_num_labels({"base_model.model.score.weight": torch.zeros(5, 8)}) == 5
    assert head_num_labels({"base_model.model.pre_classifier.weight": torch.zeros(32, 32)}) is None


def test_a_failed_command_takes_away_the_folders_it_made_and_nothing_else(tmp_path):
    from deltatune.checkpoint import first_missing, remove_made

    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "a" / "b" / "run"
    top = first_missing(str(out))
    assert top == str(tmp_path / "kept" / "a") and first_missing(str(tmp_path / "kept")) is None
    out.mkdir(parents=True)
    (out.parent / "other").mkdir()  # something else came to live in b/: b/ and a/ stay
    remove_made(str(out), top)
    assert not out.exists() and (out.parent / "other").is_dir()
    (out.parent / "other").rmdir()
    out.mkdir()
    remove_made(str(out), top)
    assert sorted(os.listdir(tmp_path / "kept")) == []  # a/ went, kept/ (which was there) stays
    assert (tmp_path / "kept").is_dir()
    remove_made(str(tmp_path / "kept"), str(tmp_path / "kept" / "x"))  # never above the outermost made
    assert (tmp_path / "kept").is_dir()
