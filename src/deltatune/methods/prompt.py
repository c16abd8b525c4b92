"""Prompt tuning (Lester et al., 2021): `num_virtual_tokens` trained embeddings are prepended to the input
embeddings; every weight of the model stays frozen.

The virtual tokens live in a `VirtualTokenLayer` that wraps the model's input embeddings (the model's own
embedding computes exactly what it did): the wrapper (`PeftModel`) calls `prepare_inputs` before every forward
and `generate`, which turns `input_ids` into `inputs_embeds` with the prompt in front, and extends the attention
mask (ones), per-token labels (-100) and token type ids (zeros) to match. Outputs therefore have
`num_virtual_tokens` more positions than the input, as PEFT's do. The file is PEFT's: one tensor,
`prompt_embeddings` (`[num_virtual_tokens, token_dim]`), plus a task head under `base_model.<head>` (prompt
learning has no tuner wrapper in PEFT, hence no `base_model.model.`). Prefix tuning (`prefix.py`) uses the
same layer with another encoder.

Not mergeable (nothing to fold into a weight), and no mixed-adapter batches (rows would need different lengths).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from deltatune import inject
from deltatune.config import PromptTuningConfig

logger = logging.getLogger(__name__)

HOLDER = "prompt_encoder"
FILE_KEY = "prompt_embeddings"  # PEFT's one key for every prompt-learning method
KEY_PREFIX = "base_model."  # PEFT's prefix of the other keys (a task head) for prompt learning

MERGE_ERROR = (
    "{method} can't be merged into the base weights: its virtual tokens are extra inputs, not a change of any "
    "weight, so no plain model computes the same thing. Keep using the adapter model as it is, or call unload() "
    "to get the plain base model back."
)
MIXED_ERROR = (
    "{method} adapters don't support mixed-adapter batches: their virtual tokens change the length and the "
    "keys/values of every row; run one adapter at a time (set_adapter)"
)


class VirtualTokenLayer(nn.Module):
    """The model's input embeddings plus, per adapter, an encoder that makes its virtual tokens.

    Its forward is the embedding's own; the encoders are read by the method's `prepare_inputs`.
    """

    is_delta_layer = True
    supports_merge = False
    supports_mixed_batch = False
    merges_into_weight = False

    def __init__(self, base_layer: nn.Module, method: str):
        super().__init__()
        self.base_layer = base_layer
        self.method = method
        self.prompt_encoder = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    @property
    def weight(self) -> torch.Tensor:  # transformers reads get_input_embeddings().weight
        return self.base_layer.weight

    @property
    def adapters(self) -> list[str]:
        return list(self.prompt_encoder)

    def add(self, name: str, encoder: nn.Module) -> None:
        if name in self.prompt_encoder:
            raise ValueError(f"the input embeddings already have an adapter named {name!r}")
        self.prompt_encoder[name] = encoder
        self.set_active(self.active_adapters or [name])

    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = [n for n in names if n in self.prompt_encoder][:1]

    def delete(self, name: str) -> None:
        if name in self.prompt_encoder:
            del self.prompt_encoder[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def merge(self, adapter_names: Iterable[str] | None = None) -> None:
        raise ValueError(MERGE_ERROR.format(method=self.method))

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def reset_cache(self) -> None:
        """Nothing derived from the weights is kept."""

    def encoder(self, adapter_name: str) -> nn.Module | None:
        """The encoder `prepare_inputs` uses now: None while disabled or for an unknown adapter."""
        if self.disabled or adapter_name not in self.prompt_encoder:
            return None
        return self.prompt_encoder[adapter_name]

    def forward(self, *args, **kwargs):
        return self.base_layer(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"method={self.method}, adapters={self.adapters}"


# ---- shared by the prompt-learning methods ----------------------------------------------------------


def model_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("prompt learning needs a Hugging Face transformers model (with a .config)")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def fill_config(config: Any, model: nn.Module, *, kv_heads: bool) -> None:
    """PEFT's `_prepare_prompt_learning_config`: the model-dependent fields from the model's config."""
    mc = model_config(model)
    if getattr(mc, "is_encoder_decoder", False) or config.task_type == "SEQ_2_SEQ_LM":
        raise ValueError(f"{config.peft_type} on encoder-decoder models is not supported yet; use LoRA")

    def first(*names: str) -> Any:
        for n in names:
            value = getattr(mc, n, None)
            if value is not None:
                return value
        return None

    if config.num_layers is None:
        config.num_layers = first("num_hidden_layers", "num_layers", "n_layer")
    if config.token_dim is None:
        config.token_dim = first("hidden_size", "n_embd", "d_model")
    if config.num_attention_heads is None:
        config.num_attention_heads = first(
            "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"
        )
    missing = [n for n in ("num_layers", "token_dim", "num_attention_heads") if getattr(config, n) is None]
    if missing:
        raise ValueError(f"can't read {', '.join(missing)} from the model's config; pass them in the config")
    if (
        kv_heads and getattr(mc, "num_key_value_heads", None) is not None
    ):  # grouped-query attention (PEFT #1901)
        head_dim = getattr(mc, "head_dim", None) or config.token_dim // config.num_attention_heads
        config.token_dim = head_dim * mc.num_key_value_heads
        config.num_attention_heads = mc.num_key_value_heads
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 1


def embedding_name(model: nn.Module) -> str:
    """The module path of the model's input (word) embeddings."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if get is not None else None
    if embeddings is None:
        raise ValueError("prompt learning needs a model with input embeddings (get_input_embeddings())")
    for name, module in model.named_modules():
        if module is embeddings:
            return name
    raise ValueError("the model's input embeddings are not one of its modules")


def wrap_embeddings(model: nn.Module, method: str) -> tuple[str, VirtualTokenLayer]:
    """The `VirtualTokenLayer` around the input embeddings (put in on first use)."""
    name = embedding_name(model)
    module = inject.get_module(model, name)
    if not isinstance(module, VirtualTokenLayer):
        module = VirtualTokenLayer(module, method)
        inject.replace_module(model, name, module)
    elif module.method != method:
        raise ValueError(f"the model holds {module.method} adapters; {method} can't be added beside them")
    return name, module


def find_layer(model: nn.Module) -> VirtualTokenLayer | None:
    for module in model.modules():
        if isinstance(module, VirtualTokenLayer):
            return module
    return None


def bind(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Positional arguments as keywords, by the model's forward signature."""
    kwargs = dict(kwargs)
    if args:
        params = [
            p
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind == p.POSITIONAL_OR_KEYWORD
        ]
        for p, value in zip(params, args):
            if p.name in kwargs:
                raise TypeError(f"forward() got multiple values for argument {p.name!r}")
            kwargs[p.name] = value
    return kwargs


def batch_size(kwargs: Mapping[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise ValueError("prompt learning needs input_ids or inputs_embeds")


def extend_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Ones for the virtual tokens in front of a 2-D attention mask."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError("prompt learning needs a 2-D attention_mask ([batch, sequence])")
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def input_length(kwargs: Mapping[str, Any]) -> int:
    x = kwargs.get("input_ids")
    return x.shape[1] if x is not None else kwargs["inputs_embeds"].shape[1]


def summarize_tensors(tensors: Mapping[str, Any]) -> dict:
    shape = tensors.get(FILE_KEY)
    shape = tuple(shape.shape) if isinstance(shape, torch.Tensor) else tuple(shape or ())
    return {
        "adapted_modules": ["input embeddings"] if shape else [],
        "virtual_tokens": shape[0] if shape else 0,
    }


# ---- the prompt tuning method ---------------------------------------------------------------------


class PromptEmbedding(nn.Module):
    """PEFT's `PromptEmbedding`: one trained `[num_virtual_tokens, token_dim]` table."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module):
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        weight = word_embeddings.weight
        self.embedding = nn.Embedding(total, config.token_dim, device=weight.device)
        init = None
        if config.prompt_tuning_init == "SAMPLE_VOCAB" and not config.inference_mode:
            init = torch.randint(0, word_embeddings.num_embeddings, (total,), dtype=torch.long)
        elif config.prompt_tuning_init == "TEXT" and not config.inference_mode:
            from transformers import AutoTokenizer

            kwargs = dict(config.tokenizer_kwargs or {})
            kwargs.pop("trust_remote_code", None)  # as PEFT: never run a tokenizer's remote code for an init
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
            ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
            if not ids:
                raise ValueError("prompt_tuning_init_text tokenizes to no tokens")
            init = torch.tensor((ids * math.ceil(total / len(ids)))[:total], dtype=torch.long)
        if init is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(word_embeddings(init.to(weight.device)).float())

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


def prepare_config(config: PromptTuningConfig, model: nn.Module) -> None:
    fill_config(config, model, kv_heads=False)


def inject_adapter(
    model: nn.Module, config: PromptTuningConfig, adapter_name: str, skip: Iterable[str] = ()
) -> list[str]:
    """Add `adapter_name`'s virtual tokens beside the input embeddings."""
    name, layer = wrap_embeddings(model, "PROMPT_TUNING")
    layer.add(adapter_name, PromptEmbedding(config, layer.base_layer))
    return [name]


def adapter_param_names(model: nn.Module, config: PromptTuningConfig, adapter_name: str) -> list[str]:
    return [n for n, _ in model.named_parameters() if f".{HOLDER}.{adapter_name}." in f".{n}"]


def saved_key(name: str, adapter_name: str) -> str | None:
    """None: the virtual tokens are saved whole, as `prompt_embeddings` (`shared_tensors`)."""
    return None if f".{HOLDER}.{adapter_name}." in f".{name}" else name


def internal_key(key: str, adapter_name: str) -> str:
    return key


def shared_tensors(
    model: nn.Module, config: PromptTuningConfig, adapter_name: str
) -> dict[str, torch.Tensor]:
    layer = find_layer(model)
    return {FILE_KEY: layer.prompt_encoder[adapter_name]().detach()}


def load_prompt_embeddings(
    model: nn.Module, adapter_name: str, tensors: Mapping[str, torch.Tensor], where: str
) -> None:
    """Copy the file's `prompt_embeddings` into the adapter's table (a clear error if missing or misshapen)."""
    from deltatune.errors import CheckpointError

    layer = find_layer(model)
    weight = layer.prompt_encoder[adapter_name].embedding.weight
    tensor = tensors.get(FILE_KEY)
    if tensor is None:
        raise CheckpointError(
            f"the adapter in {where} has no {FILE_KEY!r} tensor (keys: {sorted(tensors)[:5]})"
        )
    if tuple(tensor.shape) != tuple(weight.shape):
        raise CheckpointError(
            f"the adapter in {where} does not fit this model: {FILE_KEY} has shape {tuple(tensor.shape)}, "
            f"this model needs {tuple(weight.shape)} (num_virtual_tokens x the layout of this model's embeddings)"
        )
    with torch.no_grad():
        weight.copy_(tensor.to(weight.dtype))


def load_shared(
    model: nn.Module,
    config: PromptTuningConfig,
    adapter_name: str,
    tensors: dict[str, torch.Tensor],
    where: str,
) -> None:
    load_prompt_embeddings(model, adapter_name, tensors, where)


def after_load(model: nn.Module, adapter_name: str) -> None:
    """Nothing to refresh."""


def summarize(tensors: Mapping[str, Any]) -> dict:
    return summarize_tensors(tensors)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


def prepare_inputs(
    peft_model: nn.Module, adapter_name: str, args: tuple, kwargs: dict, generate: bool = False
) -> tuple[tuple, dict]:
    """The prompt in front of the input embeddings, with the mask, labels and token types extended to match.

    For `generate` the `input_ids` stay (the output starts with them, as PEFT's does) and `inputs_embeds` (prompt +
    inputs) feed the first step; transformers continues from the cache.
    """
    base = peft_model.base_model
    layer = find_layer(base)
    encoder = layer.encoder(adapter_name) if layer is not None else None
    if encoder is None:
        return args, kwargs
    kwargs = bind(base, args, kwargs)
    config = peft_model.peft_config[adapter_name]
    n = config.num_virtual_tokens * config.num_transformer_submodules
    batch = batch_size(kwargs)
    length = input_length(kwargs)
    input_ids = kwargs.get("input_ids")
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = layer.base_layer(input_ids)
    prompts = encoder().unsqueeze(0).expand(batch, -1, -1).to(embeds.dtype)
    kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
    mask = kwargs.get("attention_mask")
    if generate and mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
    kwargs["attention_mask"] = extend_mask(mask, n)
    if kwargs.get("position_ids") is not None:
        _warn_once("position_ids are not supported with prompt tuning (as in PEFT); ignored")
        kwargs["position_ids"] = None
    token_types = kwargs.get("token_type_ids")
    if token_types is not None:
        kwargs["token_type_ids"] = torch.cat([token_types.new_zeros(batch, n), token_types], dim=1)
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() == 2 and labels.shape[1] == length:  # per-token labels
        kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
    if not generate:
        kwargs.pop("input_ids", None)
    elif input_ids is None:
        raise ValueError("generate with prompt tuning needs input_ids")
    return (), kwargs
