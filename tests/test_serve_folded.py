"""Folded prefill (serve.packed): new prompts, and the next chunk of a long one, ride along in the running rows'
decoding step. Every row's logits must be what the model gives that row's text alone, each prompt's keys/values
what its own prefill leaves, with one adapter per row (the mixed-adapter path) as well as on the base. In the
scheduler: the same answers folded or not, and the rows waiting to ride along counted, pinned and never lost."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch
from test_serve import BASE, files, reference  # noqa: F401  (fixtures)
from test_serve_kvcache import _prefill
from tiny_models import gpt2, llama, mistral, opt, qwen2

from deltatune import get_peft_model
from deltatune.methods.lora import LoraConfig
from deltatune.serve import Engine, packed
from deltatune.serve.errors import ApiError
from deltatune.serve.kvcache import RowCache
from deltatune.serve.scheduler import Row


def _alone(model, text, **kwargs):
    return model(input_ids=torch.tensor([text]), **kwargs).logits[0, -1]


def _running(model, prompts):
    """A RowCache holding `prompts` (left-padded together, as a prefill of them leaves it) and their texts."""
    pairs, mask, firsts = _prefill(model, prompts)
    cache = RowCache()
    cache.join(pairs, mask)
    return cache, [p + [f] for p, f in zip(prompts, firsts)]


@pytest.mark.parametrize("factory", [opt, llama, gpt2, qwen2, mistral])
def test_a_folded_step_gives_each_row_and_prompt_what_it_gets_alone(factory):
    torch.manual_seed(0)
    model = factory()
    assert packed.supports(model)
    long = [int(t) for t in torch.randint(2, 90, (11,))]
    with torch.inference_mode():
        cache, texts = _running(model, [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]])
        # a first chunk of the long prompt goes with a new short prompt and the running rows' step
        fresh = packed.Segment("__base__", [20, 21, 22, 23])
        first = packed.Segment("__base__", long[:6])
        cache.step_inputs()
        logits = packed.run(
            model, model, {}, cache, [t[-1] for t in texts], [fresh, first], torch.device("cpu"), "cache"
        )
        cache.advance()
        for i, text in enumerate(texts):
            torch.testing.assert_close(logits[i], _alone(model, text), atol=1e-5, rtol=0)
            text.append(int(logits[i].argmax()))
        torch.testing.assert_close(fresh.logits[0], _alone(model, fresh.ids), atol=1e-5, rtol=0)
        own = model(input_ids=torch.tensor([fresh.ids]), use_cache=True).past_key_values
        for (k, v), layer in zip(fresh.pairs, own.layers):
            torch.testing.assert_close(k, layer.keys, atol=1e-5, rtol=0)
            torch.testing.assert_close(v, layer.values, atol=1e-5, rtol=0)
        # the rest of the long prompt, after its first chunk's keys/values, in the next step
        rest = packed.Segment("__base__", long[6:], start=6, past=first.pairs)
        cache.step_inputs()
        logits = packed.run(
            model, model, {}, cache, [t[-1] for t in texts], [rest], torch.device("cpu"), "cache"
        )
        cache.advance()
        for i, text in enumerate(texts):
            torch.testing.assert_close(logits[i], _alone(model, text), atol=1e-5, rtol=0)
        torch.testing.assert_close(rest.logits[0], _alone(model, long), atol=1e-5, rtol=0)
        assert rest.pairs[0][0].shape[2] == len(long)
    assert model.config._attn_implementation == "sdpa"  # selected for the call only
    assert not model.get_output_embeddings()._forward_pre_hooks


def test_a_folded_step_gives_each_row_and_prompt_token_its_own_adapter():
    torch.manual_seed(0)
    base = opt()
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"]), "a"
    )
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.eval()
    with torch.inference_mode():
        prompts, adapters = [[5, 6, 7], [8, 9]], ["a", "b"]
        texts = []
        cache = RowCache()
        for p, a in zip(prompts, adapters):  # each row prefilled with its own adapter
            out = model(input_ids=torch.tensor([p]), use_cache=True, adapter_names=[a])
            cache.join(
                [(layer.keys, layer.values) for layer in out.past_key_values.layers], torch.ones(1, len(p))
            )
            texts.append(p + [int(out.logits[0, -1].argmax())])
        segs = [packed.Segment("b", [30, 31, 32]), packed.Segment("__base__", [40, 41])]
        cache.step_inputs()
        names = packed.adapter_names(adapters, segs)
        assert names == ["a", "b", "b", "b", "b", "__base__", "__base__"]
        logits = packed.run(
            model,
            base,
            {"adapter_names": names},
            cache,
            [t[-1] for t in texts],
            segs,
            torch.device("cpu"),
            "cache",
        )
        for i, (text, a) in enumerate(zip(texts, adapters)):
            torch.testing.assert_close(logits[i], _alone(model, text, adapter_names=[a]), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            segs[0].logits[0], _alone(model, [30, 31, 32], adapter_names=["b"]), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            segs[1].logits[0], _alone(model, [40, 41], adapter_names=["__base__"]), atol=1e-5, rtol=0
        )
        # the adapters make a difference here, so the test would see a row given another's
        assert (_alone(model, texts[0], adapter_names=["b"]) - logits[0]).abs().max() > 1e-3


def test_models_whose_attention_cant_be_folded_are_not():
    model = opt()
    model.config._attn_implementation = "flash_attention_2"  # (only read here)
    assert not packed.supports(model)
    model.config._attn_implementation = "sdpa"
    model.lm_head = torch.nn.Sequential(
        model.lm_head
    )  # a head that isn't a plain linear layer (an adapter's)
    assert not packed.supports(model)
    with pytest.raises(RuntimeError, match="only inside a folded decoding step"):
        packed.attention(None, None, None, None, None)


# ---- in the scheduler ------------------------------------------------------------------------------------------
# Rows running when the burst comes: one in the mixed lane, one in the lane of `delta` (a DoRA adapter, which
# can't share a mixed batch); the burst joins both, a 7-word prompt in chunks (prefill_chunk=4), two rows share one
# prompt.
RUNNING = [("alpha", "w20 w21", 20), ("delta", "w22 w23", 20)]
BURST = [("alpha", "w1 w2 w3", 9), ("beta", "w4 w5", 5), ("__base__", "w6 w7 w8 w9 w10 w11 w12", 7)]
BURST += [("alpha", "w13", 3), ("delta", "w14 w15 w16", 6), ("alpha", "w1 w2 w3", 4), ("delta", "w17", 4)]


def _engine(files, folder, **kwargs):  # noqa: F811
    adapters = folder / "adapters"
    if not adapters.exists():
        shutil.copytree(files["adapters"], adapters)
        for spare in ("gamma", "delta"):
            shutil.copytree(files["root"] / "spare" / spare, adapters / spare)
    return Engine(files["base"], str(adapters), base_name=BASE, device="cpu", prefill_chunk=4, **kwargs)


def _drive(engine):
    """The running rows, then the burst arriving while they decode; every row's text and the scheduler's stats."""
    sched = engine.scheduler
    jobs = RUNNING + BURST
    got = {i: [] for i in range(len(jobs))}
    done = threading.Semaphore(0)
    sent = []

    def sink_for(i):
        def sink(event):
            if event[0] == "token":
                got[i].append(event[1])
                both_run = all(len(got[r]) >= 2 for r in range(len(RUNNING)))
                if both_run and not sent:  # the burst comes
                    sent.append(True)
                    sched.submit([row(j, *jobs[j]) for j in range(len(RUNNING), len(jobs))])
            else:
                assert event[0] == "done", event
                done.release()

        return sink

    def row(i, adapter, prompt, max_tokens):
        return Row("generate", adapter, engine.tokenizer(prompt)["input_ids"], max_tokens, sink=sink_for(i))

    try:
        sched.submit([row(i, *jobs[i]) for i in range(len(RUNNING))])
        for _ in jobs:
            assert done.acquire(timeout=120), "the requests did not finish"
        texts = {i: engine.tokenizer.decode(tokens, skip_special_tokens=True) for i, tokens in got.items()}
        return texts, dict(sched.stats)
    finally:
        engine.close()


def test_prompts_folded_into_the_running_step_get_generates_answers(files, reference, monkeypatch, tmp_path):  # noqa: F811
    folded, stats = _drive(_engine(files, tmp_path))
    # every burst prompt folded, in both lanes: 5 short ones (the shared one once) and the 7-word one in 2 chunks;
    # only the running rows' prompts were prefilled on their own (prefills: those 2, the 5, the long one's end)
    assert stats["folded_prefills"] == 7 and stats["prefill_chunks"] == 2 and stats["prefills"] == 8
    plain, stats = _drive(_engine(files, tmp_path, fold_prefill=False))
    assert stats["folded_prefills"] == 0
    assert folded == plain
    for i, (adapter, prompt, max_tokens) in enumerate(RUNNING + BURST):
        assert folded[i] == reference(BASE if adapter == "__base__" else adapter, prompt, max_tokens), adapter

    # a folded call that throws: its parts run on their own, with the same answers
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    calls = []
    monkeypatch.setattr(packed, "run", lambda *a, **k: (calls.append(1), broken()))
    engine = _engine(files, tmp_path)
    again, stats = _drive(engine)
    assert stats["folded_prefills"] == 0 and stats["failed_rows"] == 0
    assert again == plain
    # no row failed on its own, so folding itself failed: it was tried once, then turned off
    assert len(calls) == 1 and not engine.scheduler.fold_prefill


def test_rows_waiting_to_fold_count_against_max_batch(files, tmp_path):  # noqa: F811
    """Rows taken to ride along in this step are not in their lane yet; the second pass of admission (rows whose
    adapter must be attached) must still see them, or a step would run more rows than `max_batch`."""
    engine = _engine(files, tmp_path, max_batch=2)
    sched = engine.scheduler
    seen, done, sent = [], threading.Semaphore(0), []
    record = sched.metrics.running.set
    sched.metrics.running.set = lambda n: (seen.append(n), record(n))

    def sink(event):
        if event[0] == "token" and not sent:
            sent.append(True)
            sched.submit([Row("generate", "__base__", [5 + i, 6], 3, sink=sink) for i in range(3)])
        elif event[0] != "token":
            done.release()

    try:
        sched.submit([Row("generate", "alpha", [7, 8], 12, sink=sink)])
        for _ in range(4):
            assert done.acquire(timeout=120)
    finally:
        engine.close()
    assert max(seen) == 2 and sched.stats["folded_prefills"] >= 1


def test_the_adapters_of_rows_waiting_to_fold_are_not_evicted_for_another(files, tmp_path):  # noqa: F811
    """A row taken in admission's first pass rides along in this step's decoding call, so its adapter must stay
    in memory through the second pass, which may attach another adapter (evicting one that no row holds)."""
    engine = _engine(files, tmp_path, max_loaded_adapters=2)
    sched = engine.scheduler
    asked, done, sent = [], threading.Semaphore(0), []
    ensure = engine.ensure_loaded

    def recorded(adapter, pinned, **kwargs):
        asked.append((adapter, set(pinned), kwargs.get("may_load")))
        return ensure(adapter, pinned, **kwargs)

    engine.ensure_loaded = recorded

    def sink(event):
        if event[0] == "token" and not sent:
            sent.append(True)
            sched.submit([Row("generate", a, [5, 6], 3, sink=sink) for a in ("beta", "gamma")])
        elif event[0] != "token":
            done.release()

    try:
        first = threading.Event()  # a beta request first: beta is in memory, with no rows
        sched.submit([Row("generate", "beta", [9], 1, sink=lambda e: e[0] != "token" and first.set())])
        assert first.wait(120)
        sched.submit([Row("generate", "alpha", [7, 8], 12, sink=sink)])
        for _ in range(3):
            assert done.acquire(timeout=120)
    finally:
        engine.close()
    # the first time gamma may be attached is the second pass of the step that beta's row rides along in
    gamma = [pinned for adapter, pinned, may_load in asked if adapter == "gamma" and may_load]
    assert gamma and "beta" in gamma[0], asked


def test_rows_waiting_to_fold_are_failed_not_lost_when_the_model_thread_stops(files, tmp_path):  # noqa: F811
    """Rows taken to ride along in this step are in no queue and no lane until their lane's step: if the model
    thread stops before (here: the step can't make room in the running rows' cache), they must get the error the
    other rows get, not wait for ever for an answer."""
    engine = _engine(files, tmp_path)
    sched = engine.scheduler
    events: dict[int, list] = {0: [], 1: [], 2: []}
    running = threading.Event()
    decode_folded = sched._decode_folded

    def out_of_memory(tokens):
        raise torch.OutOfMemoryError("no room for one more column")

    def step(lane, fresh, chunk):
        lane.cache.reserve = out_of_memory
        decode_folded(lane, fresh, chunk)

    sched._decode_folded = step

    def sink(i):
        def put(event):
            events[i].append(event)
            if i == 0 and event[0] == "token":
                running.set()

        return put

    try:
        sched.submit([Row("generate", "alpha", [7, 8], 30, sink=sink(0))])
        assert running.wait(120)
        sched.submit(
            [
                Row("generate", "__base__", [9, 10], 4, sink=sink(1)),
                Row("generate", "alpha", [11], 4, sink=sink(2)),
            ]
        )
        sched._thread.join(timeout=120)
        assert not sched._thread.is_alive()
    finally:
        engine.close()
    for i in (0, 1, 2):
        assert events[i] and events[i][-1][0] == "error" and events[i][-1][1].status == 503, (i, events[i])


def test_requests_after_the_model_thread_ended_are_refused_not_left_waiting(files, tmp_path):  # noqa: F811
    """If the model thread ends on an error of its own, what it held fails with 503, and so does every later
    request (it was queued for a thread that would never take it, and its client waited for ever)."""
    engine = _engine(files, tmp_path)
    sched = engine.scheduler
    errors = []

    def boom():
        raise RuntimeError("a defect of the model thread")

    sched._reap = boom
    try:
        sched.submit(
            [Row("generate", "__base__", [5, 6], 3, sink=lambda e: e[0] == "error" and errors.append(e[1]))]
        )
        sched._thread.join(30)
        assert not sched._thread.is_alive() and [e.code for e in errors] == ["shutting_down"]
        with pytest.raises(ApiError) as refused:
            sched.submit([Row("generate", "__base__", [5, 6], 3, sink=lambda e: None)])
        assert refused.value.status == 503 and refused.value.code == "shutting_down"
    finally:
        engine.close()
