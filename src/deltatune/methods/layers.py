"""Full and top-layer fine-tuning: base weights themselves train, so nothing is wrapped.

Full fine-tuning trains every parameter. Top-layer fine-tuning trains the last `num_layers` blocks of the
model's main `nn.ModuleList` of blocks (found generically), the norm layers after them
(`train_final_norm`) and the task head (`modules_to_save`, a trained copy as with LoRA); the embeddings
and the lower blocks stay frozen. `num_layers=0` trains the head only ("feature extraction"). With
`task_type="SEQ_CLS"` the head is `classifier`/`score`; a causal LM's `lm_head` trains only when listed in
`modules_to_save` (as a copy, so an input embedding tied to it stays frozen).

Both save only what trained, under `base_model.model.<parameter path>`.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from deltatune import inject
from deltatune.config import FullFinetuneConfig, TopLayersConfig


def _is_wrapped_copy(name: str) -> bool:
    return ".original_module." in name or ".modules_to_save." in name


def trained_blocks(model: nn.Module, config: TopLayersConfig) -> list[str]:
    """Names of the last `config.num_layers` blocks.

    Raises:
        ValueError: the blocks can't be found, or `num_layers` exceeds the model's depth.
    """
    blocks_name, blocks = inject.find_blocks(model, config.blocks_module)
    depth = len(blocks)
    if config.num_layers > depth:
        raise ValueError(
            f"num_layers={config.num_layers} but the model has {depth} blocks (in {blocks_name!r}); "
            f"use num_layers <= {depth} (num_layers={depth} trains every block, 0 the head only)"
        )
    return [f"{blocks_name}.{i}" for i in range(depth - config.num_layers, depth)]


def final_norms(model: nn.Module, config: TopLayersConfig) -> list[str]:
    """Norm layers outside the blocks and the embeddings (`ln_f`, `model.norm`, `final_layer_norm`)."""
    if not config.train_final_norm:
        return []
    blocks_name, _ = inject.find_blocks(model, config.blocks_module)
    return [
        n
        for n, m in model.named_modules()
        if n
        and "norm" in type(m).__name__.lower()
        and any(True for _ in m.parameters(recurse=False))
        and not n.startswith(f"{blocks_name}.")
        and "embed" not in n.lower()
        and not _is_wrapped_copy(f"{n}.")
    ]


def inject_adapter(
    model: nn.Module,
    config: TopLayersConfig | FullFinetuneConfig,
    adapter_name: str,
    skip: Iterable[str] = (),
) -> list[str]:
    """Nothing to wrap: check the config against the model and return the modules that will train
    (`[""]`, the whole model, for full fine-tuning).

    Raises:
        ValueError: `num_layers` exceeds the depth, the blocks can't be found, nothing would train, or
            full fine-tuning was given `modules_to_save` (everything trains already).
    """
    if isinstance(config, FullFinetuneConfig):
        if config.modules_to_save:
            raise ValueError(
                f"full fine-tuning trains every module already; drop modules_to_save={config.modules_to_save}"
            )
        return [""]
    names = trained_blocks(model, config) + final_norms(model, config)
    if not names and not config.modules_to_save:
        raise ValueError(
            "TopLayersConfig(num_layers=0) would train nothing on this model: there is no task head "
            "(set task_type='SEQ_CLS' or modules_to_save=[...]) and no final norm; raise num_layers or name the "
            "modules to train"
        )
    return names


def adapter_param_names(
    model: nn.Module, config: TopLayersConfig | FullFinetuneConfig, adapter_name: str
) -> list[str]:
    """Every parameter (full), or those of the top blocks and final norms (the head comes from
    `modules_to_save`)."""
    if isinstance(config, FullFinetuneConfig):
        return [n for n, _ in model.named_parameters()]
    prefixes = tuple(f"{n}." for n in trained_blocks(model, config) + final_norms(model, config))
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes) and not _is_wrapped_copy(n)]


def saved_key(name: str, adapter_name: str) -> str:
    return name


def internal_key(key: str, adapter_name: str) -> str:
    return key


def prepare_config(config: TopLayersConfig | FullFinetuneConfig, model: nn.Module) -> None:
    """Nothing to fill in."""


def after_load(model: nn.Module, adapter_name: str) -> None:
    """Nothing to refresh."""


def summarize(tensors: dict) -> dict:
    """The modules whose weights were saved (their parameter paths, one level up)."""
    return {"adapted_modules": sorted({k.rsplit(".", 1)[0] for k in tensors})}
