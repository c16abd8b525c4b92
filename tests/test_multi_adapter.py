"""Many adapters on one base: switching, mixed batches, weighted combinations, and the CLI tools."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import peft
import pytest
import torch
from tiny_models import gpt2, ids, llama, opt, out, save_with_tokenizer

from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.config import load_config
from deltatune.methods.lora import LoraLinear

# Eight adapters of different ranks and targets; some layers are adapted by only some of them.
ADAPTERS = {
    "a0": LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False),
    "a1": LoraConfig(r=5, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "a2": LoraConfig(r=3, target_modules=["fc1", "fc2"], init_lora_weights=False),
    "a3": LoraConfig(r=8, target_modules="all-linear", lora_alpha=3, init_lora_weights=False),
    "a4": LoraConfig(r=1, target_modules=["k_proj", "o_proj", "out_proj"], init_lora_weights=False),
    "a5": LoraConfig(r=4, target_modules=["fc2", "down_proj"], use_rslora=True, init_lora_weights=False),
    "a6": LoraConfig(r=6, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False),
    "a7": LoraConfig(r=2, target_modules="all-linear", layers_to_transform=[1], init_lora_weights=False),
}


def _many(factory):
    configs = {n: copy.deepcopy(c) for n, c in ADAPTERS.items()}
    if factory is llama:  # llama has no fc1/fc2: point those adapters at its MLP
        configs["a2"].target_modules = ["gate_proj", "up_proj"]
    model = get_peft_model(factory(), configs.pop("a0"), adapter_name="a0")
    for name, config in configs.items():
        model.add_adapter(name, config)
    return model.eval()


def _alone(model, x, name):
    if name == "__base__":
        with model.disable_adapter():
            return out(model, x)
    model.set_adapter(name)
    return out(model, x)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("factory", [opt, llama])
def test_mixed_batch_equals_each_row_alone(factory, grad):
    model = _many(factory)
    names = ["a3", "__base__", "a0", "a1", "a2", "a4", "a5", "a6", "a7", "__base__", "a3"]
    x = ids(batch=len(names), seq=7)
    with torch.set_grad_enabled(grad):  # no_grad takes the in-place inference path
        mixed = model(input_ids=x, adapter_names=names).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i : i + 1], _alone(model, x[i : i + 1], name), atol=1e-5, rtol=0)


@pytest.mark.parametrize("factory", [opt, llama])
def test_mixed_decoding_step_equals_each_row_alone_and_keeps_broken_adapters_to_their_rows(factory):
    """One token per row without gradients (a decoding step) takes the flattened-stack path: every row through
    every adapter's A in one product, its own block kept. Each row equals that row alone, also beside an adapter
    whose A overflows to inf for every row (the other rows' blocks are zeroed, not multiplied by 0) and beside
    an adapter with NaN weights (its layers fall back to the per-row gather)."""
    model = _many(factory)
    torch.manual_seed(5)
    target = ["q_proj"]
    model.add_adapter("huge", LoraConfig(r=2, target_modules=target, init_lora_weights=False))
    model.add_adapter("nan", LoraConfig(r=3, target_modules=["v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A.huge" in name:
                p.fill_(3e38)
            if "lora_B.nan" in name:
                p[0, 0] = float("nan")
    model.eval()
    names = ["a3", "__base__", "a0", "huge", "a1", "nan", "a2", "a4", "a5", "a6", "a7", "a3"]
    x = ids(batch=len(names), seq=1)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=names).logits
    flat = [m for m in layers if m._flat is not None and m._flat[0] is not None]
    assert flat, "no layer took the flattened path"
    assert all(m._flat == (None, None) for m in layers if "nan" in m.r)  # the NaN adapter's layers fell back
    for i, name in enumerate(names):
        if name == "huge":  # whatever its own row gets, the others must not notice it
            continue
        if name == "nan":
            assert not torch.isfinite(mixed[i]).all()  # broken, and only for its own row
            continue
        with torch.no_grad():
            torch.testing.assert_close(mixed[i : i + 1], _alone(model, x[i : i + 1], name), atol=1e-5, rtol=0)


def test_mixed_generate_equals_each_row_alone():
    model = _many(opt)
    names = ["a1", "__base__", "a2", "a6"]
    x = ids(batch=4, seq=4)
    mixed = model.generate(
        input_ids=x, adapter_names=names, max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(
                    input_ids=x[i : i + 1], max_new_tokens=6, do_sample=False, pad_token_id=0
                )
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=x[i : i + 1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(mixed[i : i + 1], alone), name


def test_mixed_batch_on_conv1d_and_with_beams():
    model = get_peft_model(
        gpt2(), LoraConfig(r=2, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    )
    model.add_adapter("b", LoraConfig(r=4, target_modules=["c_proj"], init_lora_weights=False))
    model.eval()
    x = ids(batch=2, seq=4)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "num_beams": 3, "pad_token_id": 0}
    mixed = model.generate(input_ids=x, adapter_names=["b", "default"], **kwargs)
    model.set_adapter("b")
    assert torch.equal(mixed[:1], model.generate(input_ids=x[:1], **kwargs))
    model.set_adapter("default")
    assert torch.equal(mixed[1:], model.generate(input_ids=x[1:], **kwargs))


def test_switching_adapters_keeps_base_in_place():
    model = _many(opt)
    base_weight = model.base_model.model.decoder.layers[0].self_attn.q_proj.base_layer.weight
    x = ids()
    outputs = {}
    for name in ("a0", "a1", "a0"):
        model.set_adapter(name)
        outputs.setdefault(name, out(model, x))
        torch.testing.assert_close(out(model, x), outputs[name], atol=0, rtol=0)
        assert model.base_model.model.decoder.layers[0].self_attn.q_proj.base_layer.weight is base_weight
    assert not torch.allclose(outputs["a0"], outputs["a1"])
    model.set_adapter("a1")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".a1." in n for n in trainable)


def test_delete_adapter_restores_plain_layers():
    model = get_peft_model(opt(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("x", LoraConfig(r=2, target_modules=["fc1"]))
    model.delete_adapter("x")
    assert not isinstance(model.base_model.model.decoder.layers[0].fc1, LoraLinear)
    assert isinstance(model.base_model.model.decoder.layers[0].self_attn.q_proj, LoraLinear)
    assert model.adapter_names == ["default"]
    with pytest.raises(ValueError, match="only adapter"):
        model.delete_adapter("default")


def test_load_several_saved_adapters(tmp_path):
    source = _many(opt)
    source.save_pretrained(tmp_path, selected_adapters=["a1", "a2"])
    model = PeftModel.from_pretrained(opt(), tmp_path / "a1", adapter_name="a1")
    model.load_adapter(tmp_path / "a2", adapter_name="a2")
    x = ids()
    for name in ("a1", "a2"):
        source.set_adapter(name)
        model.set_adapter(name)
        torch.testing.assert_close(out(model, x), out(source, x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("second", ["weight", "q_proj", "0", "layers", "lora_A", "self_attn"])
def test_adapter_named_like_part_of_a_parameter_path(tmp_path, second):
    """An adapter's parameters are found by the name right after a LoRA holder: an adapter called `weight` or
    `q_proj` beside another must neither take the other's parameters nor be refused as not fitting the model."""
    source = get_peft_model(opt(), ADAPTERS["a1"], adapter_name="first")
    source.add_adapter(second, ADAPTERS["a3"])
    from deltatune.methods import lora as lora_method

    names = lora_method.adapter_param_names(source.base_model, ADAPTERS["a3"], second)
    assert names and all(f".{second}." in f".{n}." and ".first." not in n for n in names)
    assert len(names) == sum(
        ".first." not in n and "lora_" in n for n, _ in source.base_model.named_parameters()
    )
    source.save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(opt(), tmp_path / "first", adapter_name="first")
    model.load_adapter(tmp_path / second, adapter_name=second)
    x = ids()
    for name in ("first", second):
        source.set_adapter(name)
        model.set_adapter(name)
        torch.testing.assert_close(out(model, x), out(source, x), atol=1e-6, rtol=0)


# ---- bad input ------------------------------------------------------------------------------------


def test_mixed_batch_errors():
    model = _many(opt)
    x = ids(batch=2)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\].*a0"):
        model(input_ids=x, adapter_names=["a0", "nope"])
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 2 rows"):
        model(input_ids=x, adapter_names=["a0", "a1", "a2"])
    model.train()
    with pytest.raises(ValueError, match="call model.eval"):
        model(input_ids=x, adapter_names=["a0", "a1"])
    model.eval()
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        model(input_ids=x, adapter_names=["a0", "a1"])


def test_unknown_adapter_and_bad_names():
    model = _many(opt)
    with pytest.raises(ValueError, match=r"no adapter named 'zz'; loaded adapters: \['a0', 'a1'"):
        model.set_adapter("zz")
    for bad in ("../x", "a/b", "__base__", ""):
        with pytest.raises(ValueError, match="invalid adapter name"):
            model.add_adapter(bad, LoraConfig(r=2))


# ---- weighted combinations --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["linear", "cat", "svd"])
def test_add_weighted_adapter_matches_peft(tmp_path, how):
    base = opt()
    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "fc1"], init_lora_weights=False),
    )
    model.add_adapter(
        "b", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    theirs.load_adapter(tmp_path / "b", "b")
    model.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=how)
    theirs.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=how)
    model.set_adapter("mix")
    theirs.set_adapter("mix")
    x = ids()
    torch.testing.assert_close(out(model, x), out(theirs, x), atol=1e-5, rtol=0)


def test_cat_combination_is_the_weighted_sum_of_deltas():
    model = get_peft_model(
        opt(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    model.add_adapter("b", LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj"], init_lora_weights=False))
    model.add_weighted_adapter(["default", "b"], [0.5, 2.0], "mix", combination_type="cat")
    layer = model.base_model.model.decoder.layers[0].self_attn.q_proj
    expected = 0.5 * layer.delta_oi("default") + 2.0 * layer.delta_oi("b")
    torch.testing.assert_close(layer.delta_oi("mix"), expected, atol=1e-6, rtol=0)
    assert layer.r["mix"] == 5
    with pytest.raises(ValueError, match="one rank"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "lin", combination_type="linear")


# ---- the CLI tools ----------------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "deltatune", *args], capture_output=True, text=True, timeout=120
    )


def test_inspect_merge_and_generate_commands(tmp_path):
    base_dir = save_with_tokenizer(opt(), tmp_path / "base")
    save_with_tokenizer(opt(hidden=48), tmp_path / "other")
    model = get_peft_model(opt(), LoraConfig(r=4, target_modules=["q_proj", "fc2"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")

    info = _cli("inspect", str(tmp_path / "adapter"), "--base", base_dir, "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["ranks"] == [4] and data["compatible"] and len(data["adapted_modules"]) == 4
    assert data["parameters"] == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 64 + 32 * 4)
    bad = _cli("inspect", str(tmp_path / "adapter"), "--base", str(tmp_path / "other"))
    assert (
        bad.returncode == 1
        and "does NOT fit" in bad.stdout
        and "expected shape (4, 48), found (4, 32)" in bad.stdout
    )

    merged = _cli(
        "merge", "--base", base_dir, "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")
    )
    assert merged.returncode == 0, merged.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    x = ids()
    torch.testing.assert_close(out(plain, x), out(model.eval(), x), atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged") is not None
    again = _cli(
        "merge", "--base", base_dir, "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")
    )
    assert again.returncode == 2 and "exists already" in again.stderr

    gen = _cli(
        "generate",
        "--base",
        base_dir,
        "--adapter",
        str(tmp_path / "adapter"),
        "--prompt",
        "w1 w2",
        "--max-new-tokens",
        "3",
    )
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip().startswith("w1 w2") and len(gen.stdout.split()) == 5


def test_adapter_layers_found_again_after_layers_are_added_or_removed():
    """The wrapper caches where its adapter layers are (the mixed-batch checks run on every forward); adding an
    adapter on new modules, deleting one and unloading must each be seen by the next operation."""
    base = opt().eval()
    x = ids(batch=2, seq=5)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "a")
    model.eval()
    model(input_ids=x, adapter_names=["a", "__base__"])  # fills the cache: q_proj layers only
    model.add_adapter("b", LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False))
    fc1 = [n for n, _ in model._delta_layers() if n.endswith("fc1")]
    assert fc1, "the new fc1 layers were not found"
    model.set_adapter("b")
    with_b = out(model, x)
    mixed = model(input_ids=x, adapter_names=["b", "__base__"]).logits
    torch.testing.assert_close(mixed[:1], with_b[:1], atol=1e-5, rtol=0)
    model.delete_adapter("a")  # the q_proj layers go back to plain linears
    assert not [n for n, _ in model._delta_layers() if n.endswith("q_proj")]
    merged = copy.deepcopy(model).merge_and_unload(["b"])
    assert not any(getattr(m, "is_delta_layer", False) for m in merged.modules())
    torch.testing.assert_close(out(merged, x), with_b, atol=1e-5, rtol=0)


def test_attach_evict_reattach_cycles_equal_fresh_loads(tmp_path):
    """What `deltatune serve --max-loaded-adapters` does: adapters of different targets loaded, evicted (deleted)
    and loaded again in LRU order with at most 3 in memory. The adapter layers and each adapter's parameters are
    found from cached walks; after every swap each loaded adapter must still compute what it computes loaded alone
    on a fresh base, and list the same parameters that a walk of the whole model finds."""
    _many(opt).save_pretrained(tmp_path)  # a0 ... a7, each in its own folder
    x = ids(batch=2, seq=5)
    fresh = {}
    for name in ADAPTERS:
        alone = PeftModel.from_pretrained(opt(), tmp_path / name, adapter_name=name)
        fresh[name] = out(alone, x)
    model = PeftModel.from_pretrained(opt(), tmp_path / "a0", adapter_name="a0")
    loaded = ["a0"]
    order = ["a1", "a2", "a3", "a6", "a0", "a4", "a5", "a7", "a2", "a1", "a6", "a3"]
    for name in order:
        if name in loaded:
            loaded.remove(name)
        else:
            if len(loaded) == 3:
                model.delete_adapter(loaded.pop(0))
            if (
                int(name[1]) % 2
            ):  # else as the server does: with the config read when it registered the adapter
                model.load_adapter(tmp_path / name, adapter_name=name)
            else:
                config = load_config(tmp_path / name)
                config.inference_mode = False
                model.load_adapter(tmp_path / name, adapter_name=name, config=config)
                assert config.inference_mode is False and model.peft_config[name] is not config
                assert model.peft_config[name].inference_mode is True
        loaded.append(name)
        assert sorted(model.adapter_names) == sorted(loaded)
        walked = {n for n, m in model.base_model.named_modules() if getattr(m, "is_delta_layer", False)}
        assert {n for n, _ in model._delta_layers()} == walked
        for held in loaded:
            every = [
                n
                for n, _ in model.base_model.named_parameters()
                if f".{held}." in n or n.endswith(f".{held}")
            ]
            assert model._adapter_param_names(held) == every
            model.set_adapter(held)
            torch.testing.assert_close(out(model, x), fresh[held], atol=1e-5, rtol=0)
        mixed = model(input_ids=x, adapter_names=[loaded[0], loaded[-1]]).logits
        torch.testing.assert_close(mixed[:1], fresh[loaded[0]][:1], atol=1e-5, rtol=0)
        torch.testing.assert_close(mixed[1:], fresh[loaded[-1]][1:], atol=1e-5, rtol=0)
