"""The small shared vocabulary every command uses, defined once.

Dtype names (accepted the same way by `merge`, `serve` and `train`), PEFT's task types and how a model's
class implies one, the label value that counts for nothing in a loss, GPT-2's `Conv1D` detection, and the
pad-token fix-up for tokenizers that have none.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from deltatune import dtypes

if TYPE_CHECKING:  # torch is imported only when a function needs it (the command line's help stays fast)
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

# Labels with this value get no loss (PyTorch's and transformers' convention).
IGNORE_INDEX = -100

# PEFT's task types.
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION", "QUESTION_ANS")

# The heads PEFT trains and saves for a task type (`modules_to_save` added automatically).
TASK_HEADS: dict[str, list[str]] = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}

# transformers' class-name suffix -> the task type it implies (a head that must train).
_CLASS_TASKS = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}

# Dtype names: `deltatune.dtypes` is their one owner (fp32|float32, bf16|bfloat16, fp16|float16); this is the
# name -> torch.dtype table for the commands that need one.
DTYPE_NAMES = tuple(n for n in dtypes.ALIASES if not n.startswith("torch."))


def __getattr__(name: str) -> Any:
    if name == "DTYPES":  # {name: torch.dtype}, built on first use (it imports torch)
        return {n: dtypes.torch_dtype(n) for n in DTYPE_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Any accepted dtype name (or a torch dtype) -> torch dtype.

    Raises:
        ValueError: an unknown name; the message lists the accepted ones.
    """
    import torch

    return name if isinstance(name, torch.dtype) else dtypes.torch_dtype(name)


def shape_of(value: Any) -> tuple[int, ...]:
    """A tensor's shape, or a shape as `checkpoint.tensor_shapes` gives it (a file read from its header)."""
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D` (a linear layer storing its weight as `[in, out]`), duck-typed."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an `nn.Linear` or a GPT-2 `Conv1D`."""
    if is_conv1d(module):
        fan_in, fan_out = module.weight.shape
        return int(fan_in), int(fan_out)
    return int(module.in_features), int(module.out_features)


def task_type_of(model: nn.Module) -> str | None:
    """The task type a model's class implies (`BertForSequenceClassification` -> `SEQ_CLS`), if any head
    must train: sequence/token classification and question answering."""
    for cls in type(model).__mro__:
        for suffix, task in _CLASS_TASKS.items():
            if cls.__name__.endswith(suffix):
                return task
    return None


def fix_pad_token(tokenizer: Any, model: nn.Module | None = None) -> None:
    """A tokenizer without a pad token pads with its EOS token; a model without `pad_token_id` gets the
    tokenizer's (sequence classification needs it to find each row's last token)."""
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id


def load_tokenizer(source: str, **kwargs: Any) -> Any:
    """`AutoTokenizer.from_pretrained(source)`, refusing a local folder without tokenizer files: transformers then
    builds an *empty* tokenizer of the model's type, with no error, that turns every text into unknown tokens (a
    BERT folder gives `[CLS] [UNK] [SEP]` for any sentence, a GPT-2 one no tokens at all), so a run would train on
    or answer nothing."""
    import os

    from transformers import AutoTokenizer

    from deltatune.errors import ConfigError

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ImportError):  # a missing folder or package: their own messages say so
        raise
    except Exception as e:  # a tokenizer file that is damaged or of another shape (JSON errors, a list, ...)
        if not os.path.isdir(source):
            raise
        why = str(e).splitlines()[0][:200] if str(e) else ""
        raise ConfigError(
            f"the tokenizer files in {source} can't be read ({type(e).__name__}: {why}): restore them, or copy "
            "the tokenizer files of the model it came from into that folder"
        ) from e
    if os.path.isdir(source) and len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise ConfigError(
            f"{source} has no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.txt, ...), so "
            "transformers made an empty tokenizer that maps every text to unknown tokens; copy the tokenizer "
            "files of the model it came from into that folder"
        )
    return tokenizer


def context_length(config: Any, tokenizer: Any = None) -> int | None:
    """The most tokens (prompt and generated) a model takes: its position table's size, else the tokenizer's
    `model_max_length` when that is a real limit; None when neither says."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 10**7 else None
