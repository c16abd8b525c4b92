"""QLoRA's frozen quantized base: each backend against a dequantized fp32 reference, training, saving, merging."""

from __future__ import annotations

import copy
import importlib.util
import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_models import bert_cls, gpt2, ids, opt, out
from torch import nn

from deltatune import LoraConfig, PeftModel, cli, get_peft_model
from deltatune.errors import BackendError, MissingBackendError
from deltatune.methods import quant
from deltatune.methods.quant import QuantizedLinear, quantize_model

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CPU_BACKENDS = [
    pytest.param("nf4", "bitsandbytes", marks=needs_bnb, id="nf4-bitsandbytes"),
    pytest.param("int8", "torch", id="int8-torch"),
]
QUANTIZE = [pytest.param("nf4", marks=needs_bnb), "int8"]

# The NF4 code book of the QLoRA paper (Appendix E), an independent reference for bitsandbytes.
NF4_CODE = torch.tensor(
    [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
     0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]
)  # fmt: skip
# Relative Frobenius error of quantizing normal weights: NF4 ~0.09, int8 per channel ~0.008.
REL_ERR = {"nf4": 0.11, "int8": 0.012}


def _weight(out_features: int = 48, in_features: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.02


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(("quantize", "backend"), CPU_BACKENDS)
def test_layer_equals_linear_on_dequantized_weight(quantize, backend):
    w, b = _weight(), torch.randn(48) * 0.1
    layer = QuantizedLinear.from_weight(w, b, quantize, backend)
    x = torch.randn(3, 5, 128)
    for mode in (layer.train, layer.eval):
        mode()
        torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(), b), atol=1e-5, rtol=1e-5)
    assert layer.dequantize().shape == (48, 128) and layer.dequantize().dtype == torch.float32
    assert _rel(layer.dequantize(), w) < REL_ERR[quantize]


@pytest.mark.parametrize(("quantize", "backend"), CPU_BACKENDS)
def test_zero_rows_and_tiny_weights_stay_finite(quantize, backend):
    w = _weight() * 1e-30
    w[3] = 0
    deq = QuantizedLinear.from_weight(w, None, quantize, backend).dequantize()
    assert torch.isfinite(deq).all() and (deq[3] == 0).all()


def test_int8_dequantized_weight_is_within_half_a_step():
    w = _weight()
    deq = QuantizedLinear.from_weight(w, None, "int8", "torch").dequantize()
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((deq - w).abs() <= step / 2 * (1 + 1e-5)).all()


@needs_bnb
def test_nf4_matches_the_paper_code_book_in_blocks_of_64():
    """Each weight becomes the nearest NF4 value times its block's absmax; only the 8-bit double-quantized
    absmax differs from this hand-made reference."""
    w = _weight()
    deq = QuantizedLinear.from_weight(w, None, "nf4", "bitsandbytes").dequantize()
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    nearest = NF4_CODE[((blocks / absmax).unsqueeze(-1) - NF4_CODE).abs().argmin(dim=-1)]
    reference = (nearest * absmax).reshape(w.shape)
    assert _rel(deq, reference) < 0.01
    assert _rel(deq, w) == pytest.approx(_rel(reference, w), rel=0.05)


@pytest.mark.parametrize(("quantize", "backend"), CPU_BACKENDS)
def test_gradient_reaches_input_and_bias_never_the_storage(quantize, backend):
    layer = QuantizedLinear.from_weight(_weight(), torch.zeros(48), quantize, backend)
    layer.bias.requires_grad_(True)
    storage = {n: b.clone() for n, b in layer.named_buffers()}
    x = torch.randn(4, 128, requires_grad=True)
    grad = torch.randn(4, 48)
    gx, gb = torch.autograd.grad(layer(x), (x, layer.bias), grad)
    torch.testing.assert_close(gx, grad @ layer.dequantize(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gb, grad.sum(0))
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    assert all(not b.requires_grad and b.grad is None for b in layer.buffers())
    for name, tensor in layer.named_buffers():
        assert torch.equal(tensor, storage[name])


@pytest.mark.parametrize(("quantize", "backend"), CPU_BACKENDS)
def test_to_dtype_keeps_storage_and_state_dict_round_trips(quantize, backend):
    layer = QuantizedLinear.from_weight(_weight(), torch.randn(48), quantize, backend)
    x = torch.randn(2, 128)
    expected = layer(x)
    fresh = QuantizedLinear(128, 48, quantize, backend)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), expected, atol=0, rtol=0)
    for name, tensor in layer.named_buffers():  # the non-persistent NF4 code book included
        assert torch.equal(dict(fresh.named_buffers())[name], tensor)
    torch.testing.assert_close(copy.deepcopy(layer)(x), expected, atol=0, rtol=0)

    storage = {n: b.clone() for n, b in layer.named_buffers()}
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.dequantize().dtype == torch.bfloat16
    for name, tensor in layer.named_buffers():
        assert tensor.dtype == storage[name].dtype and torch.equal(tensor, storage[name])
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    assert layer(x).dtype == torch.float32  # computes in bf16, answers in the input's dtype
    torch.testing.assert_close(layer(x), expected, atol=0.05, rtol=0.05)
    layer.float()  # back to fp32: the weight is exactly what it was (the bias kept its bf16 rounding)
    assert torch.equal(layer.dequantize(), fresh.dequantize())


@pytest.mark.parametrize("quantize", QUANTIZE)
def test_quantize_model_replaces_linears_but_the_head(quantize):
    model = opt()
    reference = copy.deepcopy(model)
    quantize_model(model, quantize, skip=["fc2"])
    layers = dict(quant.quantized_layers(model))
    linear = [n for n, m in reference.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(layers) == sorted(n for n in linear if n != "lm_head" and not n.endswith("fc2"))
    assert (
        type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.decoder.embed_tokens.weight
    )
    # The quantized model computes what the fp32 model computes with the dequantized weights.
    with torch.no_grad():
        for name, layer in layers.items():
            reference.get_submodule(name).weight.copy_(layer.dequantize())
    torch.testing.assert_close(out(model, ids()), out(reference, ids()), atol=1e-4, rtol=1e-4)


def test_quantize_model_transposes_conv1d_and_keeps_classifier():
    model = gpt2()
    reference = copy.deepcopy(model)
    quantize_model(model, "int8")
    assert {n.rsplit(".", 1)[-1] for n, _ in quant.quantized_layers(model)} == {"c_attn", "c_proj", "c_fc"}
    torch.testing.assert_close(out(model, ids()), out(reference, ids()), atol=0.05, rtol=0)
    cls = quantize_model(bert_cls(), "int8")
    assert type(cls.classifier) is nn.Linear
    assert "bert.pooler.dense" in dict(quant.quantized_layers(cls))


@pytest.mark.parametrize("quantize", QUANTIZE)
def test_qlora_trains_lora_in_fp32_and_leaves_the_base_bit_identical(quantize):
    model = quantize_model(opt(hidden=64), quantize)
    storage = {n: b.clone() for n, b in model.named_buffers() if "_4bit" in n or "_8bit" in n or "int8" in n}
    assert storage
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"]))
    trainable = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    x = ids(4, 16)
    peft.train()
    losses = []
    for _ in range(12):
        loss = peft(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2
    after = {n.replace(".base_layer", ""): b for n, b in peft.base_model.named_buffers()}
    for name, tensor in storage.items():
        assert torch.equal(after[name], tensor), name


@pytest.mark.parametrize("quantize", QUANTIZE)
def test_disabled_adapter_gives_the_quantized_base_exactly(quantize):
    peft = _trained_qlora(quantize)
    x = ids()
    with peft.disable_adapter():
        disabled = out(peft, x)
    torch.testing.assert_close(
        disabled, out(quantize_model(opt(hidden=64), quantize).eval(), x), atol=0, rtol=0
    )
    peft.unmerge_adapter()  # nothing was merged: a no-op, not an error


def test_all_linear_targets_every_quantized_layer():
    model = quantize_model(opt(), "int8")
    names = {n for n, _ in quant.quantized_layers(model)}
    peft = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    wrapped = {
        n.removeprefix("base_model.") for n, m in peft.named_modules() if getattr(m, "is_delta_layer", False)
    }
    assert wrapped == names


@pytest.mark.parametrize("quantize", QUANTIZE)
def test_trainable_parameters_count_quantized_weights_in_full(quantize):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    plain = get_peft_model(opt(), copy.deepcopy(config)).get_nb_trainable_parameters()
    quantized = get_peft_model(quantize_model(opt(), quantize), config).get_nb_trainable_parameters()
    assert quantized == plain


def _trained_qlora(quantize: str, dora: bool = False) -> PeftModel:
    model = quantize_model(opt(hidden=64), quantize)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], use_dora=dora)
    peft = get_peft_model(model, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return peft.eval()


@pytest.mark.parametrize("quantize", QUANTIZE)
def test_adapter_saved_on_quantized_base_loads_on_both_bases(quantize, tmp_path):
    peft = _trained_qlora(quantize)
    x = ids()
    expected = out(peft, x)
    peft.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    fp32_twin = get_peft_model(opt(hidden=64), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "fc1"]))
    assert {k: v.shape for k, v in tensors.items()} == {
        k: v.shape for k, v in fp32_twin.adapter_state_dict().items()
    }

    on_quantized = PeftModel.from_pretrained(quantize_model(opt(hidden=64), quantize), tmp_path)
    torch.testing.assert_close(out(on_quantized, x), expected, atol=1e-6, rtol=0)
    on_fp32 = PeftModel.from_pretrained(opt(hidden=64), tmp_path)
    tolerance = {"nf4": 0.3, "int8": 0.03}[quantize]  # the base's own quantization error, on logits ~1
    assert (out(on_fp32, x) - expected).abs().max() < tolerance
    with on_fp32.disable_adapter():
        base = out(on_fp32, x)
    assert (out(on_fp32, x) - base).abs().max() > 10 * (out(on_fp32, x) - expected).abs().mean()
    if importlib.util.find_spec("peft") is not None:  # and PEFT reads it as any LoRA adapter
        import peft as hf_peft

        theirs = hf_peft.PeftModel.from_pretrained(opt(hidden=64), str(tmp_path)).eval()
        torch.testing.assert_close(out(theirs, x), out(on_fp32, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("quantize", QUANTIZE)
@pytest.mark.parametrize("dora", [False, True])
def test_merge_and_unload_dequantizes_with_a_warning(quantize, dora, caplog):
    x = ids()
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.1), (None, 1e-5)):
        peft = _trained_qlora(quantize, dora)
        expected = out(peft, x)
        with pytest.raises(ValueError, match="merge_and_unload"):
            peft.merge_adapter()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="deltatune.model"):
            merged = peft.merge_and_unload(dtype=dtype)
        assert f"dequantizing 12 quantized layers to {dtype or torch.float32}" in caplog.text
        assert not quant.quantized_layers(merged)
        assert not any(getattr(m, "is_delta_layer", False) for m in merged.modules())
        assert {p.dtype for p in merged.parameters()} == {dtype or torch.float32}
        assert not any(b.dtype in (torch.uint8, torch.int8) for b in merged.buffers())
        torch.testing.assert_close(out(merged, x).float(), expected, atol=tol, rtol=0)


def test_unknown_quantize_and_backend_are_refused():
    with pytest.raises(ValueError, match="unknown quantize 'int4'.*'nf4'.*'int8'"):
        quantize_model(opt(), "int4")
    with pytest.raises(
        ValueError, match="unknown backend 'torchao' for quantize='nf4'; use one of bitsandbytes"
    ):
        quantize_model(opt(), "nf4", backend="torchao")
    with pytest.raises(ValueError, match="before get_peft_model"):
        quantize_model(get_peft_model(opt(), LoraConfig(r=2)).base_model, "int8")
    with pytest.raises(ValueError, match="no linear layer to quantize"):
        quantize_model(nn.Sequential(nn.ReLU()), "int8")
    quantized = quantize_model(opt(), "int8")  # a second call (a notebook cell run again) says what happened
    with pytest.raises(
        ValueError, match=r"^this model is quantized already \(12 int8 layers\); quantize_model is"
    ):
        quantize_model(quantized, "nf4")


def test_int8_bitsandbytes_is_cuda_only():
    with pytest.raises(BackendError, match="CUDA only.*use backend='torch'") as caught:
        quant.check_backend("int8", "bitsandbytes", "cpu")
    assert cli.explain(caught.value) == (str(caught.value), 1)  # one line on the command line, not "a bug"


@pytest.fixture
def fresh_backend_checks():
    quant._bnb.cache_clear()
    quant._smoke_test.cache_clear()
    yield
    quant._bnb.cache_clear()
    quant._smoke_test.cache_clear()


def test_missing_bitsandbytes_says_what_to_install(monkeypatch, fresh_backend_checks):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    model = opt()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        MissingBackendError,  # an ImportError too, and a one-line error on the command line
        match=r"pip install 'bitsandbytes>=0.46' \(or pip install 'deltatune\[quant\]'\); or use quantize='int8'",
    ) as caught:
        quantize_model(model, "nf4")
    assert isinstance(caught.value, ImportError) and cli.explain(caught.value) == (str(caught.value), 1)
    assert not quant.quantized_layers(model)  # nothing was swapped, and nothing silently stays in fp32
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    quantize_model(model, "int8")  # the default int8 backend needs nothing more


@needs_bnb
def test_bitsandbytes_that_cannot_run_here_says_what_to_use(monkeypatch, fresh_backend_checks):
    bnb = quant._bnb()

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", broken)
    with pytest.raises(
        BackendError, match=r"can't run quantize='nf4' on cpu \(RuntimeError: no kernel.*use quantize='int8'"
    ) as caught:
        quantize_model(opt(), "nf4")
    assert cli.explain(caught.value) == (str(caught.value), 1)


@gpu
@needs_cuda
@needs_bnb
@pytest.mark.parametrize(
    ("quantize", "backend", "tol"),
    [("nf4", "bitsandbytes", 1e-3), ("int8", "torch", 1e-3), ("int8", "bitsandbytes", 0.03)],
)
def test_cuda_layer_matches_dequantized_reference(quantize, backend, tol):
    w, b = _weight().cuda(), torch.randn(48, device="cuda") * 0.1
    layer = QuantizedLinear.from_weight(w, b, quantize, backend)
    assert layer.weight_absmax.is_cuda if quantize == "int8" else layer.weight_4bit.is_cuda
    x = torch.randn(3, 5, 128, device="cuda", requires_grad=True)
    y = layer(x)
    reference = F.linear(x, layer.dequantize(), b)
    assert _rel(y, reference) < tol  # LLM.int8 also quantizes the activations
    grad = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad)
    assert _rel(gx, grad @ layer.dequantize()) < tol
    assert _rel(layer.dequantize(), w) < REL_ERR[quantize]


@gpu
@needs_cuda
@needs_bnb
@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_cuda_qlora_trains_and_model_moves_between_devices(quantize):
    model = quantize_model(opt(hidden=64), quantize).cuda()
    x = ids(4, 16).cuda()
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(12):
        loss = peft(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2
    peft.eval()
    on_gpu = out(peft, x).cpu()
    torch.testing.assert_close(out(peft.cpu(), x.cpu()), on_gpu, atol=1e-3, rtol=1e-3)
