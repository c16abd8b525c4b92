"""Prefix tuning: PEFT's format both ways (GPT-2, Llama with grouped-query attention; with and without
prefix_projection; outputs to 1e-5, same keys), BERT against PEFT's own prefix cache (peft 0.21 can't run BERT
prefix tuning under transformers 5: it looks for a `past_key_values` argument, now called `cache`), generate with
the cache equals a greedy loop over full forwards, and the refusals."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft_interop import randomize, same_files_as_peft
from tiny_models import FAMILIES, ids

from deltatune import PeftModel, PrefixTuningConfig, get_peft_model
from deltatune.errors import CheckpointError


def _masked(x: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(x)
    mask[0, -3:] = 0
    return mask


@pytest.mark.parametrize("family, projection", [("gpt2", False), ("llama", False), ("llama", True)])
def test_saved_here_loads_in_peft_and_the_reverse(family, projection, tmp_path):
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=projection)
    x = ids()
    mask = _masked(x)
    base = FAMILIES[family]()
    reference = copy.deepcopy(base)
    ours = get_peft_model(base, PrefixTuningConfig(**kwargs))
    randomize(ours)
    ours.eval()
    expected = ours(input_ids=x, attention_mask=mask).logits
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(reference, tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(input_ids=x, attention_mask=mask).logits, expected, atol=1e-5, rtol=0)

    base = FAMILIES[family]()
    reference = copy.deepcopy(base)
    theirs = peft.get_peft_model(base, peft.PrefixTuningConfig(**kwargs))
    randomize(theirs)
    theirs.eval()
    expected = theirs(input_ids=x, attention_mask=mask).logits
    theirs.save_pretrained(tmp_path / "theirs")
    ours = PeftModel.from_pretrained(reference, tmp_path / "theirs")
    torch.testing.assert_close(ours(input_ids=x, attention_mask=mask).logits, expected, atol=1e-5, rtol=0)
    if projection:  # the file holds the projected prefix: inference only, as in PEFT
        with pytest.raises(
            CheckpointError, match="prefix_projection=True: its file holds the projected prefix"
        ):
            PeftModel.from_pretrained(FAMILIES[family](), tmp_path / "theirs", is_trainable=True)


def test_bert_equals_peft_prefix_cache_and_same_files(tmp_path):
    x = ids()
    mask = _masked(x)
    base = FAMILIES["bert"]()
    reference = copy.deepcopy(base)
    ours = get_peft_model(base, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    randomize(ours)
    ours.eval()
    got = ours(input_ids=x, attention_mask=mask).logits
    ours.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    # PEFT's own prefix (its get_prompt) and head, fed to the model by hand, as PEFT did before transformers 5.
    full_mask = torch.cat([torch.ones(x.shape[0], 4, dtype=mask.dtype), mask], dim=1)
    expected = theirs.base_model(
        input_ids=x, attention_mask=full_mask, cache=theirs.get_prompt(x.shape[0])
    ).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    same_files_as_peft(
        tmp_path,
        "bert",
        PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
        peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
    )


def test_generate_with_the_cache_equals_greedy_full_forwards():
    model = get_peft_model(
        FAMILIES["llama"](), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    randomize(model, scale=0.5)
    model.eval()
    x = ids(batch=2, seq=5)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False)
    seq = x
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), x[1:, 2:]], dim=1)
    alone = model.generate(input_ids=x[1:, 2:], max_new_tokens=4, do_sample=False)
    both = model.generate(
        input_ids=padded, attention_mask=torch.tensor([[0, 0, 1, 1, 1]]), max_new_tokens=4, do_sample=False
    )
    assert torch.equal(both[:, 2:], alone)


def test_refusals_and_disable():
    base = FAMILIES["gpt2"]()
    plain = copy.deepcopy(base)
    model = get_peft_model(
        base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, init_weights="zero")
    )
    x = ids()
    with pytest.raises(ValueError, match="prefix tuning can't be merged into the base weights"):
        model.merge_and_unload()
    model.eval()
    with pytest.raises(ValueError, match="PREFIX_TUNING adapters don't support mixed-adapter batches"):
        model(input_ids=x, adapter_names=["default"] * x.shape[0])
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=x).logits, plain(input_ids=x).logits, atol=0, rtol=0)
    model.train()
    base.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="prefix tuning doesn't work with gradient checkpointing"):
        model(input_ids=x, labels=x)
