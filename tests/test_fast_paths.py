"""The speed paths keep the plain path's numerics: fused LoRA linear, fused chunked cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import gpt2, ids, llama, opt

import deltatune.methods.lora as lora_method
from deltatune import LoraConfig, get_peft_model
from deltatune.losses import causal_lm_loss, fused_linear_cross_entropy


def _grads(factory, targets, fused, monkeypatch):
    monkeypatch.setattr(lora_method, "FUSED", fused)
    model = get_peft_model(factory(), LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x = ids(batch=2, seq=6)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("factory", "targets"), [(opt, ["q_proj", "v_proj", "fc1"]), (gpt2, ["c_attn", "c_fc"])]
)
def test_fused_lora_linear_matches_plain_path(factory, targets, monkeypatch):
    calls = []
    original = lora_method._FusedLoraLinear.apply
    monkeypatch.setattr(lora_method._FusedLoraLinear, "apply", lambda *a: calls.append(1) or original(*a))
    fused_loss, fused_grads = _grads(factory, targets, True, monkeypatch)
    assert calls, "the fused path did not run"
    calls.clear()
    plain_loss, plain_grads = _grads(factory, targets, False, monkeypatch)
    assert not calls
    torch.testing.assert_close(fused_loss, plain_loss, atol=1e-6, rtol=0)
    assert fused_grads.keys() == plain_grads.keys()
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], atol=1e-6, rtol=1e-5)


def test_fused_lora_linear_input_gradient():
    layer = torch.nn.Linear(6, 5)
    model = get_peft_model(
        torch.nn.Sequential(layer), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)
    )
    lora = model.base_model[0]
    x = torch.randn(3, 4, 6, requires_grad=True)
    model(x).pow(2).sum().backward()
    expected_x = x.detach().clone().requires_grad_(True)
    a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    ref = F.linear(expected_x, layer.weight, layer.bias) + (expected_x @ a.T @ b.T) * lora.scaling["default"]
    ref.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, expected_x.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_fused_cross_entropy_matches_reference(chunk):
    torch.manual_seed(0)
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(37, 16, requires_grad=True)
    b = torch.randn(37, requires_grad=True)
    y = torch.randint(0, 37, (50,))
    y[::7] = -100
    ref = F.cross_entropy(F.linear(h, w, b), y)
    ref.backward(torch.tensor(2.0))
    expected = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    loss = fused_linear_cross_entropy(h, w, y, b, chunk_size=chunk)
    loss.backward(torch.tensor(2.0))
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)
    for got, want in zip((h.grad, w.grad, b.grad), expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("factory", [opt, gpt2, llama])
def test_causal_lm_loss_equals_model_loss(factory):
    model = get_peft_model(factory(), LoraConfig(r=4, init_lora_weights=False))
    x = ids(batch=3, seq=8)
    labels = x.clone()
    labels[0, :3] = -100
    expected = model(input_ids=x, labels=labels).loss
    expected.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    loss = causal_lm_loss(model, labels, input_ids=x, chunk_size=5)
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4)


def test_causal_lm_loss_trains_a_tied_head_in_full_finetuning():
    model = opt()
    x = ids(batch=2, seq=8)
    expected = model(input_ids=x, labels=x).loss
    expected.backward()
    want = model.lm_head.weight.grad.clone()
    model.zero_grad()
    causal_lm_loss(model, x, input_ids=x, chunk_size=4).backward()
    torch.testing.assert_close(model.lm_head.weight.grad, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("factory", [opt, gpt2])
def test_inference_path_matches_training_path(factory, monkeypatch):
    model = get_peft_model(
        factory(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    ).eval()
    x = ids()
    with_grad = model(input_ids=x).logits
    with torch.no_grad():
        without = model(input_ids=x).logits
    monkeypatch.setattr(lora_method, "FUSED", False)
    plain = model(input_ids=x).logits
    torch.testing.assert_close(without, with_grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(without, plain, atol=1e-5, rtol=0)
