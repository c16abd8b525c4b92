"""Choosing each row's next token from its logits: greedy, temperature, top-p, a seeded generator per row.

A row's choice never depends on the other rows of its batch: its own generator, its own settings, and a
failure (non-finite logits, an error in sampling) raised for that row alone so the scheduler can fail it and
carry on with the rest.
"""

from __future__ import annotations

import os

import torch

from deltatune.methods.mixed import BASE
from deltatune.serve.errors import ApiError

GREEDY_BELOW = 1e-4
"""A temperature under this is greedy: dividing logits by a tinier one overflows to inf (NaN probabilities)."""


def non_finite(adapter: str) -> ApiError:
    which = "the base model" if adapter == BASE else f"the adapter {adapter!r}"
    return ApiError(
        422,
        f"{which} produced non-finite logits (NaN or inf) for this request: its weights or scaling "
        "(lora_alpha / r) are broken; other requests are not affected",
        "non_finite_logits",
        "model",
    )


class RowSampler:
    """One row's sampling settings and generator; `pick(logits)` is its next token.

    OpenAI's `logit_bias` (token id -> a value added to its logit), `frequency_penalty` and `presence_penalty`
    (subtracted from the logit of each token this row has generated: `count * frequency + presence`, as OpenAI
    documents them) are applied to a copy of the row's logits before the choice, greedy or sampled."""

    def __init__(
        self,
        adapter: str,
        temperature: float,
        top_p: float,
        seed: int | None,
        device: torch.device,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
    ):
        self.adapter = adapter
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.greedy = not self.temperature >= GREEDY_BELOW
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.device = device
        self._generator: torch.Generator | None = None
        self.frequency_penalty = float(frequency_penalty)
        self.presence_penalty = float(presence_penalty)
        self.logit_bias = dict(logit_bias or {})
        self.penalized = bool(self.frequency_penalty or self.presence_penalty)
        self.adjusts = self.penalized or bool(self.logit_bias)  # its logits change before the choice
        self.counts: dict[int, int] = {}  # the tokens it generated, when penalized
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, values), made at the first pick

    def adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        """This row's logits `[vocab]` after its logit bias and penalties (a copy; `logits` as it was)."""
        out = logits.clone()
        if self.logit_bias:
            if self._bias is None or self._bias[1].dtype != out.dtype:  # the same at every step: made once
                ids = torch.tensor(list(self.logit_bias), device=out.device)
                values = torch.tensor(list(self.logit_bias.values()), dtype=out.dtype, device=out.device)
                self._bias = (ids, values)
            out.index_add_(0, *self._bias)
        if self.penalized and self.counts:
            ids = torch.tensor(list(self.counts), device=out.device)
            counts = torch.tensor(list(self.counts.values()), dtype=out.dtype, device=out.device)
            out.index_add_(0, ids, -(counts * self.frequency_penalty + self.presence_penalty))
        return out

    def check(self, logits: torch.Tensor) -> None:
        """Raise this row's error when its logits are unusable (NaN, +inf, or nothing finite to pick)."""
        if (
            bool(torch.isnan(logits).any())
            or bool(torch.isposinf(logits).any())
            or not bool(torch.isfinite(logits).any())
        ):
            raise non_finite(self.adapter)

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from one row's logits `[vocab]` (counted, when this row is penalized)."""
        self.check(logits)
        if self.adjusts:
            logits = self.adjusted(logits)
        token = self._choose(logits)
        if self.penalized:
            self.counts[token] = self.counts.get(token, 0) + 1
        return token

    def _choose(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(logits.argmax())
        probs = (logits.double() / self.temperature).softmax(-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest set of most likely tokens whose mass reaches top_p (at least one).
            drop = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        if self._generator is None:
            self._generator = torch.Generator(device=probs.device).manual_seed(self.seed)
        return int(torch.multinomial(probs, 1, generator=self._generator))


def pick_rows(samplers: list[RowSampler], logits: torch.Tensor) -> list[int | BaseException]:
    """Each row's next token from `logits [rows, vocab]` (row i by `samplers[i]`), or the exception that row
    raised: the finiteness check and the greedy choice are taken for all rows at once, sampling per row."""
    # One reduction gives both: a row's max is NaN when it holds a NaN (max propagates NaN), +inf when it holds
    # +inf, -inf when nothing is finite; and its index is argmax's (the first maximal value).
    top, index = logits.max(-1)
    bad = (~torch.isfinite(top)).tolist()
    greedy = index.tolist()
    out: list[int | BaseException] = []
    for i, sampler in enumerate(samplers):
        if bad[i]:
            out.append(non_finite(sampler.adapter))
        elif sampler.greedy and not sampler.adjusts:
            out.append(greedy[i])
        else:
            try:
                out.append(sampler.pick(logits[i]))
            except Exception as e:  # this row's problem alone
                out.append(e)
    return out
