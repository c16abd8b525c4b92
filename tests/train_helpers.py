"""Tiny models and data folders for the training tests (dropout off, so runs repeat exactly)."""

from __future__ import annotations

import json
import random

import tiny_models
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, OPTConfig, OPTForCausalLM


def tiny_bert_folder(path) -> str:
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=tiny_models.VOCAB,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return tiny_models.save_with_tokenizer(BertForSequenceClassification(cfg), path)


def tiny_opt_folder(path) -> str:
    torch.manual_seed(0)
    cfg = OPTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=32,
        num_attention_heads=2,
        vocab_size=tiny_models.VOCAB,
        max_position_embeddings=64,
        word_embed_proj_dim=16,
        dropout=0.0,
        attention_dropout=0.0,
    )
    return tiny_models.save_with_tokenizer(OPTForCausalLM(cfg), path)


def classification_data(path, n: int = 24, seed: int = 0) -> str:
    """Word sequences whose label is whether a low word (w1..w9) occurs: learnable by a tiny model."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        words = [f"w{rng.randrange(10, 90)}" for _ in range(rng.randrange(3, 9))]
        if i % 2:
            words.insert(rng.randrange(len(words)), f"w{rng.randrange(1, 10)}")
        lines.append(json.dumps({"text": " ".join(words), "label": "low" if i % 2 else "high"}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def trainable_weights(run_dir) -> dict[str, torch.Tensor]:
    """The trained tensors of a finished run (its adapter file)."""
    return load_file(f"{run_dir}/adapter/adapter_model.safetensors")
