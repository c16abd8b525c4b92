"""Prefix tuning (Li & Liang, 2021): per layer, `num_virtual_tokens` trained keys and values that every token
attends to in front of its own; the model stays frozen.

The prefix is a `[num_virtual_tokens, num_layers * 2 * token_dim]` table, or, with `prefix_projection`, a
`[num_virtual_tokens, token_dim]` table through a two-layer MLP (Linear, Tanh, Linear), as PEFT's
`PrefixEncoder`. Before every forward and `generate`, `prepare_inputs` turns it into a transformers cache
(`DynamicCache`) already holding the prefix's keys and values for every layer, and puts ones in front of the
attention mask: the model then runs exactly as if it were continuing after the prefix (positions start after it).
For grouped-query attention the keys/values have `num_key_value_heads` heads (PEFT's rule). The encoder lives in
the `VirtualTokenLayer` around the input embeddings (`prompt.py`).

The file is PEFT's: `prompt_embeddings`, the prefix itself (`[num_virtual_tokens, num_layers * 2 * token_dim]`,
the MLP's output when projected), plus a task head under `base_model.<head>`. A projected adapter therefore loads
for inference only (the MLP's weights are not in the file), as in PEFT.

Not mergeable, no mixed-adapter batches, and no gradient checkpointing (the recomputed forward would add the
prefix to the cache twice; PEFT refuses it too).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from deltatune.config import PrefixTuningConfig
from deltatune.methods import prompt

HOLDER = prompt.HOLDER


class PrefixEncoder(nn.Module):
    """PEFT's `PrefixEncoder`: the prefix keys/values of every layer, `[num_virtual_tokens, layers * 2 * dim]`."""

    def __init__(self, config: PrefixTuningConfig, device: torch.device):
        super().__init__()
        n, dim, width = config.num_virtual_tokens, config.token_dim, config.num_layers * 2 * config.token_dim
        self.prefix_projection = config.prefix_projection and not config.inference_mode
        if self.prefix_projection:
            self.embedding = nn.Embedding(n, dim, device=device)
            self.transform = nn.Sequential(
                nn.Linear(dim, config.encoder_hidden_size, device=device),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, width, device=device),
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, width, device=device)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self) -> torch.Tensor:
        if self.prefix_projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight


def prepare_config(config: PrefixTuningConfig, model: nn.Module) -> None:
    prompt.fill_config(config, model, kv_heads=True)
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    if config.token_dim % config.num_attention_heads:
        raise ValueError(
            f"token_dim {config.token_dim} is not a multiple of num_attention_heads {config.num_attention_heads}"
        )


def inject_adapter(
    model: nn.Module, config: PrefixTuningConfig, adapter_name: str, skip: Iterable[str] = ()
) -> list[str]:
    """Add `adapter_name`'s prefix encoder beside the input embeddings."""
    name, layer = prompt.wrap_embeddings(model, "PREFIX_TUNING")
    layer.add(adapter_name, PrefixEncoder(config, layer.base_layer.weight.device))
    return [name]


def adapter_param_names(model: nn.Module, config: PrefixTuningConfig, adapter_name: str) -> list[str]:
    return prompt.adapter_param_names(model, config, adapter_name)


def saved_key(name: str, adapter_name: str) -> str | None:
    return prompt.saved_key(name, adapter_name)


def internal_key(key: str, adapter_name: str) -> str:
    return key


def shared_tensors(
    model: nn.Module, config: PrefixTuningConfig, adapter_name: str
) -> dict[str, torch.Tensor]:
    layer = prompt.find_layer(model)
    return {prompt.FILE_KEY: layer.prompt_encoder[adapter_name]().detach()}


def load_shared(
    model: nn.Module,
    config: PrefixTuningConfig,
    adapter_name: str,
    tensors: dict[str, torch.Tensor],
    where: str,
) -> None:
    if prompt.find_layer(model).prompt_encoder[adapter_name].prefix_projection:
        from deltatune.errors import CheckpointError

        raise CheckpointError(
            f"the prefix-tuning adapter in {where} was trained with prefix_projection=True: its file holds the "
            "projected prefix (PEFT's format), not the projection's weights, so it loads for inference only "
            "(is_trainable=False); to continue training, resume from the run's training checkpoint instead"
        )
    prompt.load_prompt_embeddings(model, adapter_name, tensors, where)


def after_load(model: nn.Module, adapter_name: str) -> None:
    """Nothing to refresh."""


def summarize(tensors: Mapping[str, Any]) -> dict:
    return prompt.summarize_tensors(tensors)


def _cache_argument(model: nn.Module) -> str:
    """transformers 5 calls the key/value cache `cache` (`past_key_values` before)."""
    return "past_key_values" if "past_key_values" in inspect.signature(model.forward).parameters else "cache"


def get_prompt(layer_encoder: nn.Module, config: PrefixTuningConfig, batch: int, dtype: torch.dtype) -> Any:
    """A `DynamicCache` holding the prefix's keys and values for every layer (PEFT's `get_prompt`)."""
    from transformers import DynamicCache

    n, heads = config.num_virtual_tokens, config.num_attention_heads
    kv = layer_encoder().to(dtype).unsqueeze(0).repeat(batch, 1, 1)
    kv = kv.view(batch, n, config.num_layers * 2, heads, config.token_dim // heads)
    per_layer = kv.permute(2, 0, 3, 1, 4).split(2)  # num_layers x [2, batch, heads, n, head_dim]
    return DynamicCache([(layer[0], layer[1]) for layer in per_layer])


def prepare_inputs(
    peft_model: nn.Module, adapter_name: str, args: tuple, kwargs: dict, generate: bool = False
) -> tuple[tuple, dict]:
    """The prefix as an already filled cache, and ones in front of the attention mask."""
    base = peft_model.base_model
    layer = prompt.find_layer(base)
    encoder = layer.encoder(adapter_name) if layer is not None else None
    if encoder is None:
        return args, kwargs
    if peft_model.training and any(getattr(m, "gradient_checkpointing", False) for m in base.modules()):
        raise ValueError(
            "prefix tuning doesn't work with gradient checkpointing (the recomputed forward would add the prefix to "
            "the cache twice); turn gradient checkpointing off"
        )
    kwargs = prompt.bind(base, args, kwargs)
    name = _cache_argument(base)
    existing = kwargs.get(name, kwargs.get("past_key_values"))
    if existing is not None and (not hasattr(existing, "get_seq_length") or existing.get_seq_length() > 0):
        return (), kwargs  # continuing from a cache that already holds the prefix
    config = peft_model.peft_config[adapter_name]
    n = config.num_virtual_tokens
    batch = prompt.batch_size(kwargs)
    kwargs.pop("past_key_values", None)
    kwargs[name] = get_prompt(encoder, config, batch, layer.base_layer.weight.dtype)
    mask = kwargs.get("attention_mask")
    if generate and mask is None:
        device = layer.base_layer.weight.device
        mask = torch.ones(batch, prompt.input_length(kwargs), dtype=torch.long, device=device)
    kwargs["attention_mask"] = prompt.extend_mask(mask, n)
    if kwargs.get("position_ids") is not None:  # positions continue after the prefix (as PEFT)
        kwargs["position_ids"] = kwargs["position_ids"] + n
    return (), kwargs
