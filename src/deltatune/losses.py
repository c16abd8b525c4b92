"""Causal-LM loss without the full logits: the output head and cross-entropy fused, chunk by chunk.

The usual path holds `[tokens, vocab]` fp32 logits, their log-softmax and its gradient (3 x 103 MB for
OPT at batch 4 x 128). Here each chunk of tokens is projected, its loss taken, and its gradient with
respect to the hidden states computed at once (`softmax - onehot` times the head weight), so only a
`[tokens, hidden]` gradient is kept for backward. Same FLOPs, a fraction of the memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.vocab import IGNORE_INDEX  # noqa: E402, F401  (defined once, in vocab; re-exported here)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int):
        n_valid = (labels != IGNORE_INDEX).sum().clamp(min=1)
        need_w = weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            y = labels[start : start + chunk_size]
            logits = F.linear(h, weight, bias).float()
            valid = y != IGNORE_INDEX
            safe_y = torch.where(valid, y, 0)
            # log-sum-exp and softmax in place over the one `[chunk, vocab]` buffer (logsumexp would allocate a
            # second one, and the softmax would take two more passes): shift by the row max, exponentiate, sum.
            logits.sub_(logits.amax(dim=-1, keepdim=True))
            picked = logits.gather(1, safe_y[:, None]).squeeze(1)
            exp = logits.exp_()
            sums = exp.sum(dim=-1)
            total += ((sums.log() - picked) * valid).sum()
            # d(loss)/d(logits) = (softmax - onehot) / n_valid on valid rows, computed in place over the buffer.
            weight_row = valid / n_valid
            grad = exp.mul_((weight_row / sums)[:, None])
            grad[torch.arange(grad.shape[0], device=grad.device), safe_y] -= weight_row.to(grad.dtype)
            grad = grad.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_size] = grad @ weight
            if need_w:
                grad_weight += (grad.T @ h).float()
            if need_b:
                grad_bias += grad.sum(0).float()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (
            grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None,
            (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None,
            (grad_bias * grad_output).to(ctx.bias_dtype) if grad_bias is not None else None,
            None,
            None,
        )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T + bias` against `labels` (-100 ignored), in chunks of tokens.

    Args:
        hidden: `[tokens, hidden]` final hidden states (already shifted to line up with `labels`).
        weight: the output head's `[vocab, hidden]` weight (its gradient is computed if it requires one).
        labels: `[tokens]` target ids.
        bias: the head's bias, if any.
        chunk_size: tokens per chunk; the peak extra memory is `chunk_size x vocab` fp32.
    """
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk_size)


_UNSUPPORTED = {
    "gemma2",
    "gemma3",
    "cohere",
    "cohere2",
    "granite",
    "falcon_mamba",
}  # logit scaling / soft-capping


def _changes_inputs(model: nn.Module) -> bool:
    """The wrapper's forward changes the inputs (prompt/prefix tuning): the backbone alone would skip that."""
    config = getattr(model, "peft_config", None)
    if not isinstance(config, dict) or getattr(model, "active_adapter", None) not in config:
        return False
    from deltatune.methods import registry

    return registry.method_type(config[model.active_adapter].peft_type).kind == "virtual_tokens"


def causal_lm_loss(
    model: nn.Module, labels: torch.Tensor, *, chunk_size: int = 1024, **inputs
) -> torch.Tensor:
    """The causal-LM loss of a Hugging Face model (wrapped or not) without materializing its logits.

    Runs the model's backbone (`model.<base_model_prefix>`) on `inputs` (`input_ids` or `inputs_embeds`,
    `attention_mask`, ...), then the fused head + cross-entropy against `labels` shifted by one, as the
    model's own loss does. Falls back to the model's own loss for architectures whose head is more than a
    linear layer (or is itself wrapped by an adapter).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    mtype = getattr(getattr(inner, "config", None), "model_type", None)
    if backbone is None or head is None or mtype in _UNSUPPORTED or type(head) is not nn.Linear:
        return model(**inputs, labels=labels).loss
    if _changes_inputs(model):
        # prompt/prefix tuning: the wrapper's own input preparation (virtual tokens in front of the embeddings,
        # with the labels extended by -100 to match; or the prefix keys/values as a filled cache), then the same
        # backbone and fused head as for every other method
        _, inputs = model._prepare_inputs((), {**inputs, "labels": labels})
        labels = inputs.pop("labels")
    hidden = backbone(**inputs).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    return fused_linear_cross_entropy(hidden, head.weight, targets, head.bias, chunk_size)
