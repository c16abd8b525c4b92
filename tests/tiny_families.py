"""The five model families the method tests run on (tiny, random, eval mode), and a short training run."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

VOCAB, LAYERS, LABELS, H, FFN = 64, 2, 3, 32, 64


def bert(seed: int = 0, hidden: int = H) -> nn.Module:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=LABELS,
    )  # fmt: skip
    return BertForSequenceClassification(cfg).eval()


def distilbert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = DistilBertConfig(
        vocab_size=VOCAB, dim=H, n_layers=LAYERS, n_heads=2, hidden_dim=FFN, max_position_embeddings=32,
        num_labels=LABELS,
    )  # fmt: skip
    return DistilBertForSequenceClassification(cfg).eval()


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=2, n_positions=32)
    ).eval()


def opt(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=2, ffn_dim=FFN,
        max_position_embeddings=32, word_embed_proj_dim=H,
    )  # fmt: skip
    return OPTForCausalLM(cfg).eval()


def llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=FFN, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


FAMILIES = {"bert": bert, "distilbert": distilbert, "gpt2": gpt2, "opt": opt, "llama": llama}
TASK = {
    "bert": "SEQ_CLS",
    "distilbert": "SEQ_CLS",
    "gpt2": "CAUSAL_LM",
    "opt": "CAUSAL_LM",
    "llama": "CAUSAL_LM",
}


def ids(batch: int = 4, seq: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, **kwargs).logits


def train_briefly(model: nn.Module, family: str, lr: float, steps: int = 10) -> tuple[float, float]:
    """Adam on the trainable parameters for a few steps on one fixed batch; (loss before, loss after)."""
    x = ids(batch=8)
    labels = x if TASK[family] == "CAUSAL_LM" else torch.arange(8) % LABELS

    def loss() -> torch.Tensor:
        return model(input_ids=x, labels=labels).loss

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    first = loss().item()
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    return first, loss().item()
