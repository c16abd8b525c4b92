"""LoRA+: the same parameter groups, learning rates and weight decays as PEFT's create_loraplus_optimizer, and
the train option / `lora-plus` method using them."""

from __future__ import annotations

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus
from tiny_models import FAMILIES

from deltatune import LoraConfig, get_peft_model
from deltatune.methods import registry
from deltatune.methods.loraplus import create_loraplus_optimizer
from deltatune.train.config import TrainConfig, validate


def _groups(optimizer, names: dict[int, str]) -> list[tuple[float, float, list[str]]]:
    return [
        (g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"]))
        for g in optimizer.param_groups
        if g["params"]
    ]


@pytest.mark.parametrize(
    "family, opts",
    [
        ("opt", {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "bias": "lora_only"}),
        ("bert", {"task_type": "SEQ_CLS", "use_dora": True}),
    ],
)
def test_same_groups_as_peft(family, opts):
    ours = get_peft_model(FAMILIES[family](), LoraConfig(r=4, **opts))
    theirs = peft.get_peft_model(FAMILIES[family](), peft.LoraConfig(r=4, **opts))
    kwargs = {
        "lr": 1e-3,
        "loraplus_lr_ratio": 16,
        "loraplus_weight_decay": 0.01,
        "loraplus_lr_embedding": 1e-5,
    }
    got = create_loraplus_optimizer(ours, torch.optim.AdamW, **kwargs)
    want = peft_loraplus(theirs, torch.optim.AdamW, **kwargs)
    ours_names = {id(p): n.removeprefix("base_model.") for n, p in ours.named_parameters()}
    # PEFT's DoRA magnitude is a module (`.weight`), ours a parameter: the same tensor under a shorter name.
    theirs_names = {
        id(p): n.removeprefix("base_model.model.").replace(
            "lora_magnitude_vector.default.weight", "lora_magnitude_vector.default"
        )
        for n, p in theirs.named_parameters()
    }
    assert _groups(got, ours_names) == _groups(want, theirs_names)
    lrs = sorted({g["lr"] for g in got.param_groups})
    assert lrs == sorted({1e-3, 1.6e-2} | ({1e-5} if "embed_tokens" in str(opts) else set()))


def test_train_option_and_method():
    assert registry.get("lora-plus").train_options == {"loraplus_lr_ratio": 16}
    assert registry.get("lora-plus").make_config().peft_type == "LORA"
    assert validate(TrainConfig(method="lora", loraplus_lr_ratio=8)) == []
    errors = validate(TrainConfig(method="houlsby", loraplus_lr_ratio=8))
    assert any(e.startswith("loraplus_lr_ratio: LoRA+ needs a LoRA method") for e in errors)


def test_train_loop_builds_the_loraplus_optimizer():
    from deltatune.train.loop import build_optimizer

    model = get_peft_model(FAMILIES["opt"](), LoraConfig(r=4))
    params = [p for p in model.parameters() if p.requires_grad]
    plain = build_optimizer(model, params, TrainConfig(method="lora"), 1e-3, registry.get("lora"))
    assert {g["lr"] for g in plain.param_groups} == {1e-3}
    plus = build_optimizer(model, params, TrainConfig(method="lora-plus"), 1e-3, registry.get("lora-plus"))
    b_lr = {
        g["lr"]
        for g in plus.param_groups
        if any(
            p is model.base_model.model.decoder.layers[0].self_attn.q_proj.lora_B["default"].weight
            for p in g["params"]
        )
    }
    assert b_lr == {1.6e-2}
