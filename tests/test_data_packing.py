"""Packing without cross-talk, padding-free batches and length-grouped batches."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import tiny_models
import torch
from torch import nn

from deltatune.data import (
    IGNORE_INDEX,
    Batcher,
    block_causal_mask,
    collate_packed,
    pack,
    pack_bins,
    packed_attention,
    varlen,
)
from deltatune.data.packing import packed_context, packed_inputs


def examples(n: int, seed: int = 0, low: int = 1, high: int = 12) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, tiny_models.VOCAB) for _ in range(rng.randrange(low, high))]
        labels = [t if rng.random() < 0.8 else IGNORE_INDEX for t in ids]
        out.append({"input_ids": ids, "labels": labels})
    return out


def token_losses(model, batch) -> torch.Tensor:
    """Cross-entropy of every position's prediction of the next token ([rows, T-1]; 0 where unlabelled)."""
    batch = dict(batch)
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits[:, :-1]
    loss = nn.functional.cross_entropy(
        logits.transpose(1, 2).float(), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    return loss


def loss_alone(model, example) -> torch.Tensor:
    batch = {
        "input_ids": torch.tensor([example["input_ids"]]),
        "labels": torch.tensor([example["labels"]]),
    }
    return token_losses(model, batch).sum()


def packed_losses(model, batch, mode) -> torch.Tensor:
    """`token_losses` of a packed batch as training runs it: the inputs of `mode`, inside its context."""
    with packed_context(model, mode):
        return token_losses(model, packed_inputs(batch, mode, model))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("mode", ["varlen", "positions", "mask4d"])
def test_every_example_in_a_packed_row_has_its_loss_alone(family, attention, mode):
    model = tiny_models.FAMILIES[family]()
    model.set_attn_implementation(attention)
    if mode == "positions" and family == "opt":  # OPT's mask code ignores position ids
        with pytest.raises(ValueError, match="can't be confined"):
            packed_attention(model, modes=[mode])
        return
    assert packed_attention(model, modes=[mode]) == mode
    assert packed_attention(model) == "varlen"  # the first choice on CPU, for every family here
    rows = pack(examples(14, seed=1), max_length=32)
    assert len(rows) < 14 and all(sum(len(e["input_ids"]) for e in r) <= 32 for r in rows)
    batch = collate_packed(rows, pad_token_id=0)
    calls = varlen.calls[0]
    losses = packed_losses(model, batch, mode)
    assert (varlen.calls[0] > calls) == (mode == "varlen")  # the per-example path ran, or not at all
    assert model.config._attn_implementation == attention  # set only for the step
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            n = len(e["input_ids"])
            packed = losses[r, start : start + n - 1].sum()  # predictions of tokens 1..n-1 of this example
            torch.testing.assert_close(packed, loss_alone(model, e), atol=1e-5, rtol=1e-5)
            start += n
        assert losses[r, start - 1 :].abs().sum() == 0  # the padding and the step into it learn nothing


@pytest.mark.parametrize("family,mode", [("llama", "varlen"), ("gpt2", "varlen"), ("llama", "positions")])
def test_a_gradient_step_on_a_packed_batch_is_the_sum_over_its_examples(family, mode):
    data = examples(8, seed=2)
    grads = []
    for packed in (True, False):
        model = tiny_models.FAMILIES[family]()
        model.train(family == "llama")  # the tiny Llama has no dropout; GPT-2's is kept off (eval)
        if packed:
            batch = collate_packed(pack(data, 16), 0)  # several rows of several examples
            assert batch["input_ids"].shape[0] > 1 and batch["input_ids"].shape[0] < len(data)
            with packed_context(model, mode):
                token_losses(model, packed_inputs(batch, mode, model)).sum().backward()
        else:
            for e in data:
                loss_alone(model, e).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_varlen_attends_each_example_alone_and_builds_no_row_mask(monkeypatch):
    """The point of `varlen`: every SDPA call covers one example (no T x T scores), and no mask is built."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    model = tiny_models.llama()
    rows = pack(examples(12, seed=5, low=2, high=9), max_length=24)
    batch = collate_packed(rows, pad_token_id=0)
    shapes, masks = [], []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        shapes.append((q.shape[-2], k.shape[-2]))
        masks.append(kwargs.get("attn_mask"))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    for name in ("sdpa", "eager"):
        monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, name, pytest.fail)
    packed_losses(model, batch, "varlen")
    width = batch["input_ids"].shape[1]
    expected = []  # every row's examples, then its padding (a segment of its own)
    for row in rows:
        cuts = [0, *itertools.accumulate(len(e["input_ids"]) for e in row)]
        expected.append(list(zip(cuts[:-1], cuts[1:])) + ([(cuts[-1], width)] if cuts[-1] < width else []))
    assert varlen.segments(batch["position_ids"], len(rows)) == expected
    calls = [(b - a, b - a) for segs in expected for a, b in segs] * model.config.num_hidden_layers
    assert sorted(shapes) == sorted(calls) and max(q for q, _ in shapes) < width
    assert all(m is None for m in masks)


def test_a_model_whose_layers_bypass_the_attention_interface_falls_back_to_the_dense_mask(monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama import modeling_llama

    model = tiny_models.llama()
    # layers that always run their own SDPA, whatever implementation is set: `varlen` never runs there
    monkeypatch.setattr(
        modeling_llama.ALL_ATTENTION_FUNCTIONS, "get_interface", lambda *a: sdpa_attention_forward
    )
    assert packed_attention(model) == "positions"
    assert packed_attention(model, modes=["varlen", "mask4d"]) == "mask4d"
    model.config.sliding_window = 4  # a sliding window needs its mask: not tried there
    assert not varlen.applies(model)


def test_packed_rows_are_one_row_for_flash_attention_with_the_same_losses():
    model = tiny_models.llama()
    rows = pack(examples(14, seed=1), max_length=32)
    batch = collate_packed(rows, pad_token_id=0)
    assert len(rows) > 1
    # flash-attention 2 (CUDA, not run here) sees example boundaries in position ids only in one row
    model.config._attn_implementation_internal = "flash_attention_2"
    flat = packed_inputs(batch, "positions", model)
    assert {k: tuple(v.shape) for k, v in flat.items()} == {k: (1, batch["input_ids"].numel()) for k in batch}
    assert flat["position_ids"][0].tolist() == batch["position_ids"].reshape(-1).tolist()
    model.config._attn_implementation_internal = "sdpa"
    assert packed_inputs(batch, "positions", model)["input_ids"].shape == batch["input_ids"].shape
    # the one row keeps every example apart too: the same per-token losses, nothing across the rows' seams
    per_row = token_losses(model, packed_inputs(batch, "positions", model))  # [rows, T - 1]
    one_row = token_losses(model, flat)[0]  # [rows * T - 1]: the seams predict unlabelled first tokens
    one_row = torch.cat([one_row, one_row.new_zeros(1)]).reshape(len(rows), -1)
    assert (one_row[:, -1] == 0).all()
    torch.testing.assert_close(one_row[:, :-1], per_row, atol=1e-5, rtol=1e-5)


def test_the_varlen_implementation_is_put_back_even_after_an_error():
    model = tiny_models.gpt2()
    with pytest.raises(RuntimeError, match="boom"), packed_context(model, "varlen"):
        assert model.config._attn_implementation == varlen.NAME
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa" and varlen.NAME not in model.config.to_json_string()


def test_no_position_id_label_or_attention_crosses_an_example_boundary():
    a = {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}
    b = {"input_ids": [8, 9], "labels": [IGNORE_INDEX, 9]}
    c = {"input_ids": [10], "labels": [10]}
    batch = collate_packed([[a, b], [c]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    # the first token of every example is never a target: no prediction from the example before it
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100] * 5]
    mask = block_causal_mask(batch["position_ids"])[:, 0].int().tolist()
    assert mask[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert mask[1][0] == [1, 0, 0, 0, 0] and mask[1][4] == [0, 1, 1, 1, 1]  # padding: a segment of its own
    additive = block_causal_mask(batch["position_ids"], torch.float32)
    assert additive[0, 0, 3, 2] == torch.finfo(torch.float32).min and additive[0, 0, 3, 3] == 0


def test_pack_bins_holds_every_example_once_in_rows_that_fit():
    lengths = [random.Random(i).randrange(1, 100) for i in range(2000)]
    members, offsets = pack_bins(lengths, 128)
    assert sorted(members.tolist()) == list(range(2000))
    rows = [members[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert all(row == sorted(row) for row in rows)  # file order inside a row
    assert sum(lengths) / (128 * len(rows)) > 0.97  # best-fit decreasing wastes almost nothing
    assert pack_bins(lengths, 128)[0].tolist() == members.tolist()  # deterministic


def test_a_model_whose_attention_ignores_both_ways_is_refused():
    class Leaky(nn.Module):  # attends across the whole row whatever it is given
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"vocab_size": 20, "model_type": "leaky"})()
            self.emb = nn.Embedding(20, 4)

        def forward(self, input_ids, **_):
            h = self.emb(input_ids).cumsum(1)
            return type("O", (), {"logits": h})()

    with pytest.raises(ValueError, match=r"leaky.*can't be confined to each packed example.*packing=false"):
        packed_attention(Leaky())


def test_padding_free_batches_are_one_row_with_the_losses_of_the_padded_batch():
    model, data = tiny_models.gpt2(), examples(5, seed=3)
    free = Batcher(data, batch_size=5, mode="padding_free")
    padded = Batcher(data, batch_size=5)
    (ids,) = free.epoch(0)
    tensors, real = free.collate(ids)
    assert tensors["input_ids"].shape == (1, real) and real == sum(len(e["input_ids"]) for e in data)
    padded_tensors, padded_real = padded.collate(ids)
    assert padded_real == real and padded_tensors["input_ids"].numel() > real
    mode = packed_attention(model)
    assert mode == "varlen"
    torch.testing.assert_close(
        packed_losses(model, tensors, mode).sum(),
        token_losses(model, padded_tensors).sum(),
        atol=1e-5,
        rtol=1e-5,
    )


def test_group_by_length_batches_similar_lengths_randomly_and_repeatably():
    data = examples(400, seed=4, high=60)
    grouped = Batcher(data, batch_size=8, mode="group_by_length", seed=1)
    plain = Batcher(data, batch_size=8, seed=1)

    def padding(batcher, epoch):
        return sum(batcher.collate(b)[0]["input_ids"].numel() for b in batcher.epoch(epoch))

    assert sorted(i for b in grouped.epoch(0) for i in b) == list(range(400))
    assert padding(grouped, 0) < 0.7 * padding(plain, 0)
    assert grouped.epoch(0) == Batcher(data, batch_size=8, mode="group_by_length", seed=1).epoch(0)
    assert grouped.epoch(0) != grouped.epoch(1)
    assert grouped.epoch(0) != Batcher(data, batch_size=8, mode="group_by_length", seed=2).epoch(0)
    ranks = [Batcher(data, batch_size=4, mode="group_by_length", seed=1, rank=r, world=2) for r in range(2)]
    shards = [r.epoch(0) for r in ranks]
    assert len(shards[0]) == len(shards[1])
    assert sorted(i for s in shards for b in s for i in b) == list(range(400))


def write_text_data(path, n=40, seed=0):
    rng = random.Random(seed)
    rows = [
        " ".join(f"w{rng.randrange(3, 90)}" for _ in range(int(rng.lognormvariate(1.5, 0.8)) + 1))
        for _ in range(n)
    ]
    path.write_text("\n".join(json.dumps({"text": r}) for r in rows) + "\n")
    return str(path)


def tiny_run_config(tmp_path, **overrides):
    from train_helpers import tiny_opt_folder

    from deltatune.train import config_from_dict

    folder = tiny_opt_folder(tmp_path / "opt")
    data = write_text_data(tmp_path / "d.jsonl")
    base = {
        "model": folder,
        "task": "causal-lm",
        "data": data,
        "eval_data": data,
        "batch_size": 3,
        "max_length": 24,
        "max_steps": 6,
        "schedule": "constant",
        "save_every": 3,
        "log_every": 1,
        "eval_at_start": False,
        "progress": False,
        "method_args": {"r": 2, "lora_alpha": 4},
    }
    return lambda **more: config_from_dict(base | overrides | more)


def test_a_packed_run_trains_and_reports_real_tokens_per_second(tmp_path):
    from deltatune.train import run

    config = tiny_run_config(tmp_path, packing=True, max_steps=2, eval_data=None)
    summary = run(config(output_dir=str(tmp_path / "packed")))
    assert summary["status"] == "completed" and summary["tokens_per_s"] > 0
    lines = [json.loads(x) for x in (tmp_path / "packed" / "metrics.jsonl").read_text().splitlines()]
    lines = [line for line in lines if "train_loss" in line]  # (not the validation lines)
    assert [line["step"] for line in lines] == [1, 2] and all(line["tokens_per_s"] > 0 for line in lines)
    assert lines[1]["tokens"] > lines[0]["tokens"] > 0


def test_a_packed_run_on_cpu_uses_varlen_and_saves_nothing_of_it(tmp_path):
    from deltatune.train import run

    folder = tiny_models.save_with_tokenizer(tiny_models.llama(), str(tmp_path / "llama"))
    config = tiny_run_config(
        tmp_path, model=folder, method="full", method_args={}, packing=True, max_steps=2, save_every=1
    )
    summary = run(config(output_dir=str(tmp_path / "run")))
    assert summary["status"] == "completed" and summary["packed_attention"] == "varlen"
    saved = [p for p in (tmp_path / "run").rglob("*") if p.suffix in (".json", ".yaml")]
    assert {p.name for p in saved} >= {"adapter_config.json", "train_config.yaml", "summary.json"}
    for path in saved:
        assert varlen.NAME not in path.read_text(), path  # (the summary says "varlen", not this name)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["packing", "group_by_length", "padding_free"])
def test_runs_in_every_batching_mode_resume_exactly(tmp_path, mode):
    from train_helpers import trainable_weights

    from deltatune.train import run

    config = tiny_run_config(tmp_path, **{mode: True})
    run(config(output_dir=str(tmp_path / "full")))
    run(config(output_dir=str(tmp_path / "half"), max_steps=3))
    resumed = run(config(output_dir=str(tmp_path / "half")), resume=True)
    assert resumed["steps"] == 6 and resumed["resumed_from_step"] == 3
    a, b = trainable_weights(tmp_path / "full"), trainable_weights(tmp_path / "half")
    assert all(torch.equal(a[k], b[k]) for k in a)
