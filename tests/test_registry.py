"""The method registry: every registered method passes the same contract, and the shared rules hold for all.

The contract (per method, on a tiny encoder and a tiny decoder): the config comes from the registry; the
method injects; the model is unchanged at init where the method promises it; a few steps of training change
the output; save/load round-trips to the same outputs; merge equals the adapter model, or is refused with the
method's own message; `estimate` and `inspect` know it.
"""

from __future__ import annotations

import logging
import types

import pytest
import tiny_families as tf
import torch
from transformers import BertConfig, BertForQuestionAnswering, BertForTokenClassification

from deltatune import BottleneckConfig, LoraConfig, PeftModel, TopLayersConfig, get_peft_model
from deltatune.estimate import estimate
from deltatune.methods import registry
from deltatune.tools import _adapter_summary
from deltatune.vocab import parse_dtype

FAMILIES = ("bert", "opt")  # an encoder and a decoder whose layers every method adapts (OFT: nn.Linear only)


def _fresh(name: str, family: str) -> torch.nn.Module:
    model = tf.FAMILIES[family]()
    quantize = registry.get(name).quantize
    if quantize:
        from deltatune.methods.quant import quantize_model

        quantize_model(model, quantize)
    return model


def _labels(family: str, x: torch.Tensor) -> torch.Tensor:
    return x if tf.TASK[family] == "CAUSAL_LM" else torch.arange(x.shape[0]) % tf.LABELS


def _own(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The outputs at the input's own positions (virtual tokens, when a method adds them, come first)."""
    return logits[:, -x.shape[1] :] if logits.dim() == 3 else logits


def test_every_method_type_has_a_complete_module_and_entry():
    for kind in registry.PEFT_TYPES.values():
        module = kind.load()  # check_module: every MethodModule function is there
        assert kind.config.peft_type == kind.peft_type
        assert kind.mergeable or kind.merge_error
        assert kind.kind in ("layers", "in_place", "virtual_tokens")
        assert module.saved_key is not None
    for method in registry.METHODS.values():
        assert method.lr > 0 and method.color.startswith("#") and len(method.color) == 7
        assert method.type is registry.PEFT_TYPES[method.peft_type]
        assert method.trainable_params(registry.ModelShape(1e9, 2048, 24, 16), registry.ESTIMATE_OPTIONS) > 0
        method.make_config("CAUSAL_LM")  # its defaults are valid config fields
    assert len({m.color for m in registry.METHODS.values()}) == len(registry.METHODS)


def test_a_module_missing_a_function_fails_the_check():
    fake = types.ModuleType("deltatune.methods.fake")
    fake.inject_adapter = fake.saved_key = lambda *a: None
    with pytest.raises(
        TypeError, match="lacks prepare_config, adapter_param_names, internal_key, after_load, summarize"
    ):
        registry.check_module(fake)


def test_unknown_names_suggest_the_closest():
    with pytest.raises(ValueError, match="unknown method 'lroa' \\(did you mean 'lora'\\?\\)"):
        registry.get("lroa")
    with pytest.raises(ValueError, match="unsupported peft_type 'NOPE'"):
        registry.method_type("NOPE")


# Each method type on an encoder and a decoder; the other names of a type (dora, qlora-*) on one of them.
_FIRST = {m.peft_type: m.name for m in reversed(list(registry.METHODS.values()))}
CASES = [
    (name, family)
    for name in registry.names()
    for family in (FAMILIES if _FIRST[registry.get(name).peft_type] == name else FAMILIES[1:])
]


@pytest.mark.parametrize(
    "name, family",
    # QLoRA-NF4 imports bitsandbytes (seconds of CPU); its contract runs with `pytest -m slow`.
    [pytest.param(n, f, marks=pytest.mark.slow) if n == "qlora-nf4" else (n, f) for n, f in CASES],
)
def test_method_contract(name, family, tmp_path):
    spec = registry.get(name)
    x = tf.ids(batch=4)
    base = _fresh(name, family)
    before = tf.logits(base, x)
    config = spec.make_config(tf.TASK[family])
    kept = config.to_dict()
    model = get_peft_model(base, config)
    assert config.to_dict() == kept, "the user's config object must not change"
    # Every layer the method put in implements the layer protocol.
    layers = [m for m in model.modules() if getattr(m, "is_delta_layer", False)]
    assert all(isinstance(m, registry.DeltaLayer) for m in layers)
    assert spec.in_place or layers
    if spec.type.identity_at_init:
        torch.testing.assert_close(tf.logits(model, x), before, rtol=0, atol=1e-6)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    # A few steps change the output.
    model.train()
    opt = torch.optim.Adam(trainable, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=x, labels=_labels(family, x)).loss.backward()
        opt.step()
    model.eval()
    after = tf.logits(model, x)
    assert not torch.allclose(_own(after, x), before, atol=1e-4)
    # Save/load round trip on a fresh base.
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(_fresh(name, family), tmp_path / "adapter")
    torch.testing.assert_close(tf.logits(loaded, x), after, rtol=1e-5, atol=1e-5)
    # inspect knows it.
    info = _adapter_summary(str(tmp_path / "adapter"))
    assert info["method"] == spec.peft_type and info["adapted_modules"]
    # Merge, or a clear refusal.
    if spec.mergeable:
        merged = loaded.merge_and_unload(dtype=torch.float32)
        assert not any(getattr(m, "is_delta_layer", False) for m in merged.modules())
        tol = 0.1 if spec.quantize else 1e-5  # a quantized base is dequantized: the outputs keep its rounding
        torch.testing.assert_close(tf.logits(merged, x), after, rtol=tol, atol=tol)
    else:
        with pytest.raises(ValueError, match="can't be merged"):
            loaded.merge_and_unload()
        torch.testing.assert_close(tf.logits(loaded, x), after, rtol=1e-5, atol=1e-5)  # nothing changed
    # estimate knows it.
    assert estimate(1e9, name).total_gb > 0


def _token_cls() -> torch.nn.Module:
    torch.manual_seed(0)
    return BertForTokenClassification(
        BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=32, num_labels=5)
    ).eval()  # fmt: skip


def _qa() -> torch.nn.Module:
    torch.manual_seed(0)
    return BertForQuestionAnswering(
        BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=32)
    ).eval()  # fmt: skip


@pytest.mark.parametrize(
    "make, task, head",
    [
        (tf.bert, "SEQ_CLS", "classifier"),
        (_token_cls, "TOKEN_CLS", "classifier"),
        (_qa, "QUESTION_ANS", "qa_outputs"),
    ],
)
@pytest.mark.parametrize(
    "config",
    [LoraConfig(r=2, target_modules=["query", "value"]), BottleneckConfig(), TopLayersConfig(num_layers=1)],
    ids=["lora", "bottleneck", "top-layers"],
)
def test_task_head_is_never_silently_frozen(make, task, head, config, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="deltatune.model"):
        model = get_peft_model(make(), config)
    assert config.task_type is None and config.modules_to_save is None  # the user's config is untouched
    assert model.peft_config["default"].task_type == task
    head_params = [
        n for n, p in model.named_parameters() if p.requires_grad and f"{head}.modules_to_save" in n
    ]
    assert head_params, f"the {head} head must train"
    model.save_pretrained(tmp_path)
    assert any(k.startswith(f"base_model.model.{head}.") for k in model.adapter_state_dict())


def test_task_inference_is_logged_once(caplog):
    from deltatune import model as model_module

    model_module._TASK_LOGGED.discard(("BertForTokenClassification", "TOKEN_CLS"))
    with caplog.at_level(logging.WARNING, logger="deltatune.model"):
        get_peft_model(_token_cls(), LoraConfig(r=2, target_modules=["query"]))
        get_peft_model(_token_cls(), LoraConfig(r=2, target_modules=["query"]))
    lines = [r.getMessage() for r in caplog.records if "task_type not set" in r.getMessage()]
    assert len(lines) == 1 and "task_type='TOKEN_CLS'" in lines[0]


def test_dtype_names_are_one_vocabulary():
    for short, long, dtype in (("fp32", "float32", torch.float32), ("bf16", "bfloat16", torch.bfloat16),
                               ("fp16", "float16", torch.float16)):  # fmt: skip
        assert parse_dtype(short) is parse_dtype(long) is parse_dtype(long.upper()) is dtype
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; use fp32, bf16 or fp16"):
        parse_dtype("fp8")
