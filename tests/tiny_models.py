"""Tiny random-initialized transformers models for tests (no download), one per family we support."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

VOCAB = 96


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def opt(seed: int = 0, hidden: int = 32, layers: int = 2) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        ffn_dim=2 * hidden,
        num_attention_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        word_embed_proj_dim=hidden,
    )
    return OPTForCausalLM(cfg).eval()


# Llama's shape (grouped-query attention: 4 query heads, 2 key/value heads); Qwen2 and Mistral take it too
_LLAMA_SHAPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**_LLAMA_SHAPE)).eval()


def qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**_LLAMA_SHAPE)).eval()


def mistral(seed: int = 0, sliding_window: int | None = None):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**_LLAMA_SHAPE, sliding_window=sliding_window)).eval()


def bert_cls(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


FAMILIES = {"gpt2": gpt2, "opt": opt, "llama": llama, "bert": bert_cls}


def ids(batch: int = 3, seq: int = 9, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, seq), generator=g)


def out(model, x: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(input_ids=x, **kwargs).logits


def tokenizer():
    """A word-level tokenizer over a tiny vocabulary that fits VOCAB."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )


def save_with_tokenizer(model, path) -> str:
    """Save a tiny model and the tiny tokenizer into `path` as an ordinary Hugging Face folder."""
    model.config.pad_token_id = 0
    model.config.eos_token_id = 2
    model.config.bos_token_id = 2
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return str(path)
