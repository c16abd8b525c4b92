"""Prompt tuning: PEFT's format both ways (GPT-2, Llama, BERT; outputs to 1e-5, same keys), generate with the cache
equals a greedy loop over full forwards (also left-padded), and the refusals (merge, mixed batches, serve)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft_interop import randomize, same_files_as_peft
from safetensors.torch import load_file
from tiny_models import FAMILIES, ids

from deltatune import PeftModel, PromptTuningConfig, get_peft_model
from deltatune.methods import registry

TASK = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "bert": "SEQ_CLS"}


def _masked(x: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # some padding, so the prompt's ones in front of the mask matter
    return mask


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_saved_here_loads_in_peft_and_the_reverse(family, tmp_path):
    x = ids()
    mask = _masked(x)
    base = FAMILIES[family]()
    reference = copy.deepcopy(base)
    ours = get_peft_model(base, PromptTuningConfig(task_type=TASK[family], num_virtual_tokens=5))
    randomize(ours)
    ours.eval()
    expected = ours(input_ids=x, attention_mask=mask).logits
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(reference, tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(input_ids=x, attention_mask=mask).logits, expected, atol=1e-5, rtol=0)

    base = FAMILIES[family]()
    reference = copy.deepcopy(base)
    theirs = peft.get_peft_model(base, peft.PromptTuningConfig(task_type=TASK[family], num_virtual_tokens=5))
    randomize(theirs)
    theirs.eval()
    expected = theirs(input_ids=x, attention_mask=mask).logits
    theirs.save_pretrained(tmp_path / "theirs")
    ours = PeftModel.from_pretrained(reference, tmp_path / "theirs")
    torch.testing.assert_close(ours(input_ids=x, attention_mask=mask).logits, expected, atol=1e-5, rtol=0)
    if family != "bert":
        assert expected.shape[1] == x.shape[1] + 5  # as PEFT: outputs for the virtual tokens too


def test_same_files_as_peft(tmp_path):
    same_files_as_peft(
        tmp_path,
        "bert",
        PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
        peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
    )
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert keys == {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}


def test_generate_equals_greedy_full_forwards_and_left_padding():
    model = get_peft_model(
        FAMILIES["llama"](), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
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
    # A left-padded row generates what it generates alone (positions from the mask, prompt in front of the pads).
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), x[1:, 2:]], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    alone = model.generate(input_ids=x[1:, 2:], max_new_tokens=4, do_sample=False)
    both = model.generate(input_ids=padded, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(both[:, 2:], alone)


def test_trains_only_the_prompt_and_refuses_merge_and_mixed_batches():
    base = FAMILIES["gpt2"]()
    plain = copy.deepcopy(base)
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "base_model.transformer.wte.prompt_encoder.default.embedding.weight"
    ]
    x = ids()
    labels = x.clone()
    loss = model(input_ids=x, labels=labels).loss  # labels get -100 in front of them
    loss.backward()
    with pytest.raises(
        ValueError, match="prompt tuning can't be merged into the base weights: its virtual tokens"
    ):
        model.merge_and_unload()
    model.eval()
    with pytest.raises(
        ValueError, match="PROMPT_TUNING adapters don't support mixed-adapter batches \\(their virtual"
    ):
        model(input_ids=x, adapter_names=["default"] * x.shape[0])
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=x).logits, plain(input_ids=x).logits, atol=0, rtol=0)
    assert "mixed-adapter batches, which don't support virtual tokens" in registry.not_servable(
        "PROMPT_TUNING"
    )
    assert not registry.method_type("PROMPT_TUNING").servable
    unloaded = model.unload()
    assert type(unloaded.transformer.wte) is torch.nn.Embedding
    assert unloaded.lm_head.weight is unloaded.transformer.wte.weight  # still tied


def test_config_checks_and_text_init(tmp_path):
    from deltatune.config import ConfigError

    with pytest.raises(ConfigError, match="PromptTuningConfig needs num_virtual_tokens"):
        PromptTuningConfig()
    with pytest.raises(ConfigError, match="prompt_tuning_init='TEXT' needs tokenizer_name_or_path"):
        PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    base = FAMILIES["gpt2"]()
    model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB"))
    prompt = model.base_model.transformer.wte.prompt_encoder["default"].embedding.weight
    vocab = base.transformer.wte.base_layer.weight
    assert all(any(torch.equal(row, v) for v in vocab) for row in prompt)  # rows of the vocabulary
