"""LoRA+ (Hayou et al., 2024): LoRA's B matrices learn `loraplus_lr_ratio` times faster than its A matrices.

A training option rather than a method of its own (the adapter is an ordinary LoRA adapter): `train` builds its
optimizer here when `loraplus_lr_ratio` is set, and `compare` runs it as `lora-plus`. The parameter groups are
PEFT's `create_loraplus_optimizer`'s, exactly:

- A matrices (and any other matrix that trains, e.g. a classification head's weight): `lr`;
- parameters of a LoRA-wrapped embedding: `loraplus_lr_embedding` (default 1e-6);
- B matrices and every 1-D parameter (biases, norms, DoRA's magnitudes): `lr * loraplus_lr_ratio`; those
  outside layer norms and not biases with `loraplus_weight_decay`, the others with none.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters of layer-norm modules, and biases: transformers' `get_parameter_names(model,
    ALL_LAYERNORM_LAYERS)` complement, as PEFT uses it."""
    out = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, nn.LayerNorm) or "LayerNorm" in type(module).__name__
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if is_norm or "bias" in full:
                out.add(full)
    return out


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_weight_decay: float = 0.0,
    loraplus_lr_embedding: float = 1e-6,
) -> list[dict]:
    """The four parameter groups of PEFT's `create_loraplus_optimizer` (empty ones dropped).

    Raises:
        ValueError: `loraplus_lr_ratio` is not positive.
    """
    from deltatune.methods.lora import LoraEmbedding

    if not loraplus_lr_ratio > 0:
        raise ValueError(
            f"loraplus_lr_ratio must be positive (LoRA+ uses >= 1, e.g. 16), got {loraplus_lr_ratio!r}"
        )
    no_decay = _no_decay_names(model)
    modules = dict(model.named_modules())
    groups: dict[str, list[torch.nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        holder = modules.get(".".join(name.split(".")[:-2]))
        if isinstance(holder, LoraEmbedding):
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B_no_decay" if name in no_decay else "B"].append(param)
        else:
            groups["A"].append(param)
    spec = [
        (groups["A"], lr, loraplus_weight_decay),
        (groups["embedding"], loraplus_lr_embedding, loraplus_weight_decay),
        (groups["B"], lr * loraplus_lr_ratio, loraplus_weight_decay),
        (groups["B_no_decay"], lr * loraplus_lr_ratio, 0.0),
    ]
    return [{"params": p, "lr": g_lr, "weight_decay": wd} for p, g_lr, wd in spec if p]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr: float,
    loraplus_lr_ratio: float,
    **kwargs,
) -> torch.optim.Optimizer:
    """An optimizer over `model`'s trainable parameters with LoRA+'s learning rates (PEFT's signature and
    meanings: `loraplus_weight_decay`, `loraplus_lr_embedding` are taken from `kwargs`, the rest goes to
    `optimizer_cls`)."""
    groups = param_groups(
        model,
        lr=lr,
        loraplus_lr_ratio=loraplus_lr_ratio,
        loraplus_weight_decay=kwargs.pop("loraplus_weight_decay", 0.0),
        loraplus_lr_embedding=kwargs.pop("loraplus_lr_embedding", 1e-6),
    )
    return optimizer_cls(groups, lr=lr, **kwargs)
