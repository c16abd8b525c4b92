"""The speed paths keep the plain path's numerics: fused LoRA linear, fused chunked cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import gpt2, ids, llama, opt

import deltatune.methods.lora as lora_method
from deltatune import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
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
    # a few float32 ulps of the loss (9.14 here: one ulp is 9.5e-7; AVX-512 kernels sum in another order)
    torch.testing.assert_close(loss, ref, atol=0, rtol=1e-6)
    for got, want in zip((h.grad, w.grad, b.grad), expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("factory", "config"),
    [
        (opt, LoraConfig(r=4, init_lora_weights=False)),
        (gpt2, LoraConfig(r=4, init_lora_weights=False)),
        (llama, LoraConfig(r=4, init_lora_weights=False)),
        # prompt learning: the wrapper's virtual tokens (labels extended by -100) or prefix cache, then the same
        # fused head (it fell back to the model's own loss, with the full logits)
        (llama, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
        (gpt2, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
        (llama, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
        (opt, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    ],
)
def test_causal_lm_loss_equals_model_loss(factory, config):
    model = get_peft_model(factory(), config)
    x = ids(batch=3, seq=8)
    labels = x.clone()
    labels[0, :3] = -100
    expected = model(input_ids=x, labels=labels).loss
    expected.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    head_calls = []
    model.get_base_model().get_output_embeddings().register_forward_hook(lambda *a: head_calls.append(1))
    loss = causal_lm_loss(model, labels, input_ids=x, chunk_size=5)
    loss.backward()
    assert not head_calls, "the fused head, not the model's own logits"
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


# ---- DoRA and quantized bases: the fused path against the plain path and against PEFT --------------------


def _step(model, x):
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    torch.manual_seed(0)  # the same dropout masks (OPT and GPT-2 also drop out with the functional form)
    logits = model(input_ids=x).logits
    (logits.float().pow(2).mean() + 0.1 * logits.float().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def _perturb(model, seed=3):
    """Move the DoRA magnitudes and LoRA weights off their initial values, deterministically by name."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device))


def _ours(factory, config, fused, monkeypatch, quantize=None):
    from deltatune.methods.quant import quantize_model

    monkeypatch.setattr(lora_method, "FUSED", fused)
    base = factory()
    if quantize:
        quantize_model(base, quantize)
    torch.manual_seed(1)  # the LoRA weights (quantize_model's first call draws random numbers for a check)
    model = get_peft_model(base, config)
    _perturb(model)
    return model


def _count_fused(monkeypatch):
    calls = []
    original = lora_method._FusedLoraLinear.apply
    monkeypatch.setattr(lora_method._FusedLoraLinear, "apply", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize(
    ("factory", "targets", "quantize"),
    [
        (opt, ["q_proj", "v_proj", "fc1"], None),
        (gpt2, ["c_attn", "c_fc"], None),
        (llama, "all-linear", None),
        (opt, ["q_proj", "v_proj", "fc2"], "nf4"),
        (llama, "all-linear", "int8"),
    ],
)
@pytest.mark.parametrize("dora", [False, True])
def test_fused_path_matches_plain_path_dora_and_quantized(factory, targets, quantize, dora, monkeypatch):
    if quantize == "nf4":
        pytest.importorskip("bitsandbytes")
    config = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_dora=dora)
    x = ids(batch=2, seq=6)
    calls = _count_fused(monkeypatch)
    fused_out, fused_grads = _step(_ours(factory, LoraConfig(**config), True, monkeypatch, quantize), x)
    assert calls, "the fused path did not run"
    calls.clear()
    plain_out, plain_grads = _step(_ours(factory, LoraConfig(**config), False, monkeypatch, quantize), x)
    assert not calls
    torch.testing.assert_close(fused_out, plain_out, atol=1e-5, rtol=1e-5)
    assert fused_grads.keys() == plain_grads.keys()
    assert any("lora_magnitude_vector" in n for n in fused_grads) == dora
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("factory", "targets"), [(opt, ["q_proj", "v_proj", "fc1"]), (gpt2, ["c_attn"]), (llama, "all-linear")]
)
@pytest.mark.parametrize("by_expansion", [True, False])
def test_fused_dora_equals_peft_dora(factory, targets, by_expansion, monkeypatch):
    peft = pytest.importorskip("peft")
    monkeypatch.setattr(lora_method, "DORA_NORMS_BY_EXPANSION", by_expansion)
    config = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_dora=True)
    x = ids(batch=2, seq=6)
    calls = _count_fused(monkeypatch)
    ours = _ours(factory, LoraConfig(**config), True, monkeypatch)
    assert calls == [] and _step(ours, x) and calls
    ours.zero_grad(set_to_none=True)
    theirs = peft.get_peft_model(factory(), peft.LoraConfig(**config))
    mine = {
        k.replace("base_model.", "base_model.model.", 1) + (".weight" if "magnitude" in k else ""): v
        for k, v in ours.state_dict().items()
        if "lora_" in k
    }
    assert not theirs.load_state_dict(mine, strict=False).unexpected_keys
    our_out, our_grads = _step(ours, x)
    their_out, their_grads = _step(theirs, x)
    torch.testing.assert_close(our_out, their_out, atol=1e-5, rtol=1e-5)
    their_grads = {
        k.replace("base_model.model.", "base_model.", 1).removesuffix(
            ".weight" if "magnitude" in k else ""
        ): v
        for k, v in their_grads.items()
    }
    assert our_grads.keys() == their_grads.keys()
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("factory", "targets"), [(opt, ["q_proj", "fc1"]), (llama, ["q_proj", "up_proj"])])
def test_fused_dora_with_zero_magnitudes_matches_plain_path(factory, targets, monkeypatch):
    """The fused DoRA recovers the unscaled product from its output (`(y - b) / factor`); a row whose magnitude is
    0 has factor 0, so it keeps the product instead: its magnitude gradient still equals the plain path's."""
    config = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_dora=True)
    x = ids(batch=2, seq=6)
    results = []
    for fused in (True, False):
        model = _ours(factory, LoraConfig(**config), fused, monkeypatch)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p[::3] = 0.0
        results.append(_step(model, x))
    (fused_out, fused_grads), (plain_out, plain_grads) = results
    torch.testing.assert_close(fused_out, plain_out, atol=1e-5, rtol=1e-5)
    magnitudes = [n for n in fused_grads if "lora_magnitude_vector" in n and "q_proj" in n]
    assert magnitudes and all(fused_grads[n][::3].abs().sum() > 0 for n in magnitudes)  # (no ReLU after q)
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rows_cancel", [0, 3])
def test_dora_row_norms_by_expansion_equal_the_direct_norms(rows_cancel):
    """The fused DoRA's norms come from `||W_i||²`, `A Wᵀ` and `A Aᵀ` (no `[out, in]` sum); against the norm of
    the sum made by hand, in float64. Rows where `W + sBA` nearly cancels fall back to the direct norm."""
    g = torch.Generator().manual_seed(0)
    out_f, in_f, r, scale = 48, 40, 4, 2.0
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    a = torch.randn(r, in_f, generator=g) * 0.1
    b = torch.randn(out_f, r, generator=g) * 0.01
    if rows_cancel:  # W_i = -s (BA)_i + a little: its norm ~1e-3 of ||W_i||, below what the sums resolve well
        b[:rows_cancel] = torch.randn(rows_cancel, r, generator=g)
        w[:rows_cancel] = -scale * (b[:rows_cancel] @ a) + 1e-3 * torch.randn(rows_cancel, in_f, generator=g)
    direct = torch.linalg.norm(torch.addmm(w, b, a, alpha=scale), dim=1)  # what the plain path computes
    weight_sq = torch.linalg.vector_norm(w, dim=1).square()
    norms = lora_method._dora_row_norms(w, a, b, scale, a @ w.T, weight_sq)
    if rows_cancel:  # the expansion's sums would lose the rows' norms: the layer's norms are the direct ones
        assert torch.equal(norms, direct)
    else:
        expected = torch.linalg.norm(w.double() + scale * b.double() @ a.double(), dim=1)
        torch.testing.assert_close(norms.double(), expected, atol=0, rtol=1e-6)
        assert not torch.equal(norms, direct)  # (computed the other way)
    assert torch.equal(lora_method._dora_row_norms(w, a, b, scale, None, None), direct)


def test_fused_dora_sees_a_changed_base_weight(monkeypatch):
    """The fused DoRA keeps the frozen weight's row norms between steps; an in-place change of the base weight
    (a merge, a reload) must be seen: after one, the fused output still equals the plain path's."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "fc1"], use_dora=True)
    x = ids(batch=2, seq=6)
    models = {fused: _ours(opt, config, fused, monkeypatch) for fused in (True, False)}
    outs = {}
    for change in (False, True):
        for fused, model in models.items():
            monkeypatch.setattr(lora_method, "FUSED", fused)
            if change:
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if name.endswith("base_layer.weight"):
                            p.mul_(1.5)
            outs[fused] = _step(model, x)
        torch.testing.assert_close(outs[True][0], outs[False][0], atol=1e-5, rtol=1e-5)
        for name in outs[True][1]:
            torch.testing.assert_close(outs[True][1][name], outs[False][1][name], atol=1e-5, rtol=1e-4)
        if not change:
            before = outs[True][0]
    assert not torch.allclose(before, outs[True][0])


def test_fused_path_trains_the_bias_when_asked(monkeypatch):
    x = ids(batch=2, seq=6)
    grads = []
    for fused in (True, False):
        monkeypatch.setattr(lora_method, "FUSED", fused)
        model = get_peft_model(
            opt(), LoraConfig(r=4, target_modules=["q_proj"], bias="lora_only", init_lora_weights=False)
        )
        grads.append(_step(model, x)[1])
    bias = [n for n in grads[0] if n.endswith("q_proj.base_layer.bias")]
    assert bias and all(grads[0][n].abs().sum() > 0 for n in bias)
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("quantize", "dora"), [(None, True), ("nf4", False), ("nf4", True), ("int8", False)])
def test_fused_path_matches_plain_path_on_cuda(quantize, dora, monkeypatch):
    """On CUDA the NF4 base dequantizes with bitsandbytes' CUDA kernels; the fused path must still equal the
    plain one."""
    if quantize == "nf4":
        pytest.importorskip("bitsandbytes")
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=dora)
    x = ids(batch=2, seq=6).cuda()
    results = []
    for fused in (True, False):
        monkeypatch.setattr(lora_method, "FUSED", fused)
        base = llama().cuda()
        if quantize:
            from deltatune.methods.quant import quantize_model

            quantize_model(base, quantize)
        torch.manual_seed(1)
        model = get_peft_model(base, LoraConfig(**config))
        _perturb(model)
        results.append(_step(model, x))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-4, rtol=1e-4)
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], atol=1e-4, rtol=1e-3)


# ---- DoRA at inference: `m / ||W + sBA||` made once and kept while nothing it depends on changes ---------------


def _with_grad(model, x):
    """The reference: with autograd on, every call makes DoRA's norms afresh."""
    with torch.enable_grad():
        return model(input_ids=x).logits.detach()


@pytest.mark.parametrize(("fused", "quantize"), [(True, None), (False, None), (True, "int8")])
def test_dora_inference_factor_is_kept_and_made_again_on_every_change(fused, quantize, monkeypatch):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], use_dora=True)
    model = _ours(opt, config, fused, monkeypatch, quantize).eval()
    x = ids(batch=2, seq=5)
    norms = []
    original = lora_method.LoraLinear._weight_norm
    monkeypatch.setattr(
        lora_method.LoraLinear, "_weight_norm", lambda self, *a: norms.append(1) or original(self, *a)
    )
    layers = len(lora_method.layers(model))

    def check(changed_from=None, remade=layers):
        norms.clear()
        with torch.no_grad():
            first = model(input_ids=x).logits
            made = len(norms)
            second = model(input_ids=x).logits
        assert made == remade and len(norms) == remade, "made once per changed layer, then kept"
        torch.testing.assert_close(first, _with_grad(model, x), atol=1e-5, rtol=1e-5)
        assert torch.equal(first, second)
        if changed_from is not None:
            assert not torch.allclose(first, changed_from, atol=1e-3), "the change did not show"
        return first

    out = check()
    # a training step (the optimizer changes A, B and the magnitudes in place)
    model.train()
    opt_ = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=x).logits.float().pow(2).mean().backward()
    opt_.step()
    model.eval()
    out = check(out)
    # weights loaded from a state dict
    state = {k: v + 0.05 for k, v in model.state_dict().items() if "lora_" in k}
    model.load_state_dict(state, strict=False)
    out = check(out)
    # the scaling (what `lora_alpha` sets)
    for _, layer in lora_method.layers(model):
        layer.scaling["default"] *= 2
    out = check(out)
    # the base weight, changed in place (a float base only: a quantized one can't be)
    if quantize is None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("fc1.base_layer.weight"):
                    p[:, : p.shape[1] // 2].mul_(2)  # (a uniform scale would be normalized away by DoRA)
        out = check(out, remade=2)  # the two fc1 layers only
    # a change through `.data` is invisible to autograd's version counters: reset_cache() makes it seen
    for name, p in model.named_parameters():
        if "lora_magnitude_vector" in name:
            p.data.mul_(0.5)
    for _, layer in lora_method.layers(model):
        layer.reset_cache()
    check(out)


def test_dora_inference_under_inference_mode_is_not_cached_and_right(monkeypatch):
    """Tensors made under `torch.inference_mode()` have no version counter: nothing is kept, the output is right."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "fc1"], use_dora=True)
    x = ids(batch=2, seq=5)
    want = _with_grad(_ours(opt, config, True, monkeypatch).eval(), x)
    with torch.inference_mode():
        model = _ours(opt, config, True, monkeypatch).eval()
        got = model(input_ids=x).logits
        again = model(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got, again)
    assert all("_dora_factors" not in layer.__dict__ for _, layer in lora_method.layers(model))
