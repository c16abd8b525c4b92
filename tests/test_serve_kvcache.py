"""The running batch's KV cache (serve.kvcache.RowCache): rows join with prompts of any width, leave from the
middle, the buffers grow, and every row's next-token logits stay what the model gives that row's text alone."""

from __future__ import annotations

import pytest
import torch
from tiny_models import gpt2, llama, opt

from deltatune.serve.kvcache import RowCache


def _prefill(model, prompts):
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    pairs = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    return pairs, mask, out.logits[:, -1].argmax(-1).tolist()


def _alone(model, text):
    return model(input_ids=torch.tensor([text])).logits[0, -1]


@pytest.mark.parametrize("factory", [opt, llama, gpt2])
def test_rows_join_leave_and_decode_as_if_each_ran_alone(factory):
    torch.manual_seed(0)
    model = factory()
    cache = RowCache()
    texts: list[list[int]] = []

    def join(prompts):
        pairs, mask, firsts = _prefill(model, prompts)
        cache.join(pairs, mask)
        texts.extend([p + [f] for p, f in zip(prompts, firsts)])

    def step():
        mask, positions = cache.step_inputs()
        ids = torch.tensor([[t[-1]] for t in texts])
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
        ).logits[:, -1]
        cache.advance()
        for i, t in enumerate(texts):
            torch.testing.assert_close(logits[i], _alone(model, t), atol=1e-4, rtol=0)
            t.append(int(logits[i].argmax()))

    with torch.inference_mode():
        join([[5, 6, 7], [8, 9]])
        step()
        # wider than the batch: columns open on the left
        join([[10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]])
        step()
        join([[22], [23, 24], [25, 26, 27]])  # more rows than slots: the buffers grow
        step()
        order = cache.select([1, 3, 5])  # rows leave from the front and the middle; the last ones move
        texts[:] = [texts[i] for i in order]
        assert sorted(order) == [1, 3, 5] and cache.n == 3
        for _ in range(40):  # past the columns reserved: the buffers grow at the end
            step()
        order = cache.select([2])
        texts[:] = [texts[i] for i in order]
        assert cache.width == len(texts[0]) - 1  # the columns only the others used are gone
        step()
        assert cache.select([]) == [] and cache.n == 0
        texts.clear()
        assert not cache.k  # an empty batch gives its buffers back
        join([[30, 31]])  # and starts afresh
        step()
