"""Adapter slots under pressure (continuous scheduler): more adapters wanted than `max_loaded_adapters` fit.

A row waiting for an adapter that isn't in memory, while every slot is held by an adapter with running rows and
requests for those keep coming, gets its slot within a bounded number of steps (the adapter in use the longest is
paused: its rows keep their caches and resume when it is back). Every answer, paused and resumed ones included,
equals `generate` of its adapter alone. Driven through the scheduler's queue on the model thread, so the number
of steps is exact: a stream of requests for `alpha` (each one sent when the previous ends, two at a time) and one
request for `beta`, with one adapter slot."""

from __future__ import annotations

import threading

import pytest
from test_serve import BASE, files, reference  # noqa: F401  (fixtures)

from deltatune.serve import Engine
from deltatune.serve.scheduler import Row

PROMPTS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10", "w11 w12", "w13 w14 w15"]


def _stream(engine: Engine, alpha_requests: int, beta_after: int) -> dict:
    """Two closed-loop clients of `alpha` (max_tokens 9 and 14, so they never end on the same step) send
    `alpha_requests` requests in all; when `beta_after` alpha tokens were produced, one request for `beta` comes.
    Returns every row's tokens, and the steps at which beta arrived and got its first token and alpha's last
    request ended."""
    sched = engine.scheduler
    out: dict = {"rows": [], "beta_first": None, "alpha_end": None}
    done = threading.Event()
    sent = {"alpha": 0, "tokens": 0, "open": 0}

    def send(adapter: str, prompt: str, max_tokens: int) -> None:
        tokens: list[int] = []
        ids = engine.tokenizer(prompt)["input_ids"]
        out["rows"].append((adapter, prompt, max_tokens, tokens))
        sent["open"] += 1

        def sink(event: tuple) -> None:  # on the model thread
            if event[0] == "token":
                tokens.append(event[1])
                if adapter == "beta" and len(tokens) == 1:
                    out["beta_first"] = sched._steps
                if adapter == "alpha":
                    sent["tokens"] += 1
                    if sent["tokens"] == beta_after:
                        out["beta_sent"] = sched._steps
                        send("beta", "w20 w21", 6)
                return
            sent["open"] -= 1
            assert event[0] == "done", event
            if adapter == "alpha" and sent["alpha"] < alpha_requests:
                sent["alpha"] += 1
                send("alpha", PROMPTS[sent["alpha"] % len(PROMPTS)], 9 if sent["alpha"] % 2 else 14)
            elif adapter == "alpha" and out["alpha_end"] is None:
                out["alpha_end"] = sched._steps
            if sent["open"] == 0:
                done.set()

        sched.submit([Row("generate", adapter, ids, max_tokens, sink=sink)])

    hold = threading.Event()
    engine.call(lambda: hold.wait(30))  # both first requests join in one step
    sent["alpha"] = 2
    send("alpha", PROMPTS[0], 9)
    send("alpha", PROMPTS[1], 14)
    hold.set()
    assert done.wait(120), "the requests did not finish"
    return out


@pytest.mark.parametrize("adapter_slice", [4, 0])
def test_a_row_waiting_for_a_slot_gets_it_within_the_slice_and_every_answer_equals_generate_alone(
    files,  # noqa: F811
    reference,  # noqa: F811
    adapter_slice,
):
    engine = Engine(
        files["base"],
        files["adapters"],
        base_name=BASE,
        device="cpu",
        max_loaded_adapters=1,
        adapter_slice=adapter_slice,
    )
    try:
        out = _stream(engine, alpha_requests=8, beta_after=3)
        stats = engine.scheduler.stats_dict()
        metrics = engine.metrics.render().decode()
    finally:
        engine.close()
    for adapter, prompt, max_tokens, tokens in out["rows"]:
        text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
        assert text == reference(adapter, prompt, max_tokens), (adapter, prompt, max_tokens)
    waited = out["beta_first"] - out["beta_sent"]
    if adapter_slice:
        # beta's files are read in the reader thread meanwhile: a few steps more than the slice at most
        assert waited <= adapter_slice + 12, waited
        assert out["beta_first"] < out["alpha_end"]  # it didn't wait for alpha's requests to stop coming
        assert stats["adapter_pauses"] >= 1 and stats["resumed_rows"] == stats["paused_rows"] >= 1
        assert f'deltatune_adapter_events_total{{event="pause"}} {float(stats["adapter_pauses"])}' in metrics
    else:  # the old behaviour: beta waits until no request for alpha is running any more
        assert out["beta_first"] > out["alpha_end"]
        assert stats["adapter_pauses"] == 0


def test_a_long_prompt_being_prefilled_keeps_its_adapter_in_memory(files, reference):  # noqa: F811
    """With one slot, a request for `beta` waits while `alpha`'s long prompt is prefilled chunk by chunk (it used to
    evict alpha between two chunks, and alpha's request failed)."""
    engine = Engine(
        files["base"], files["adapters"], base_name=BASE, device="cpu", max_loaded_adapters=1, prefill_chunk=2
    )
    long_prompt = " ".join(f"w{i}" for i in range(30, 44))
    results: dict[str, list] = {}
    done = threading.Semaphore(0)
    try:
        hold = threading.Event()
        engine.call(lambda: hold.wait(30))  # both arrive in one step
        for adapter, prompt in (("alpha", long_prompt), ("beta", "w1 w2")):
            events: list = []
            results[adapter] = events

            def sink(event, events=events):
                events.append(event)
                if event[0] != "token":
                    done.release()

            ids = engine.tokenizer(prompt)["input_ids"]
            engine.scheduler.submit([Row("generate", adapter, ids, 8, sink=sink)])
        hold.set()
        assert done.acquire(timeout=60) and done.acquire(timeout=60), results
        chunks = engine.scheduler.stats_dict()["prefill_chunks"]
    finally:
        engine.close()
    assert chunks >= 7
    for adapter, prompt in (("alpha", long_prompt), ("beta", "w1 w2")):
        events = results[adapter]
        assert events[-1][0] == "done", events[-1]
        tokens = [e[1] for e in events if e[0] == "token"]
        assert engine.tokenizer.decode(tokens, skip_special_tokens=True) == reference(adapter, prompt, 8)


def test_a_negative_adapter_slice_is_refused(files, capsys):  # noqa: F811
    from deltatune.serve import serve_main

    with pytest.raises(ValueError, match="adapter_slice"):
        Engine(files["base"], files["adapters"], base_name=BASE, device="cpu", adapter_slice=-1)
    assert serve_main(["--base", files["base"], "--adapter-slice", "-1"]) == 2
    assert "--adapter-slice must be at least 0 (0: never pause), got -1" in capsys.readouterr().err


def test_serve_freezes_its_start_up_objects_once_the_engine_is_up(monkeypatch, tmp_path):
    """`deltatune serve` hands the base model's objects to `gc.freeze` after building the engine and before
    serving, so full collections don't walk them again (pauses on adapter attaches: benchmarks/attach_cost.py)."""
    import gc

    import uvicorn

    import deltatune.serve.app as app_module
    import deltatune.serve.engine as engine_module
    from deltatune.serve import serve_main

    seen = {}

    class FakeEngine:
        def __init__(self, *args, **kwargs):
            seen["at_engine"] = gc.get_freeze_count()

    monkeypatch.setattr(engine_module, "Engine", FakeEngine)
    monkeypatch.setattr(app_module, "create_app", lambda engine, **kw: object())
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.setdefault("at_run", gc.get_freeze_count()))
    gc.unfreeze()
    try:
        (tmp_path / "config.json").write_text("{}")  # a base folder serve's check accepts (never loaded)
        assert serve_main(["--base", str(tmp_path)]) == 0
    finally:
        gc.unfreeze()
    assert seen["at_engine"] == 0 and seen["at_run"] > 0


def test_a_prefill_token_budget_admits_a_burst_over_several_steps_with_the_same_answers(
    files,  # noqa: F811
    reference,  # noqa: F811
):
    """`max_prefill_tokens`: a burst of requests arriving together is prefilled a few prompts per step (the first
    prompt of a step whatever its length, a prompt shared by `n` rows once), while the running rows decode; every
    answer still equals `generate` of its adapter alone."""
    engine = Engine(files["base"], files["adapters"], base_name=BASE, device="cpu", max_prefill_tokens=5)
    sched = engine.scheduler
    prefill, folded, calls = sched._prefill, sched._decode_folded, []

    def recorded(solo, rows):
        calls.append(({(r.adapter, tuple(r.ids)) for r in rows}, sched._steps))
        prefill(solo, rows)

    def recorded_folded(lane, fresh, chunk):  # prompts that ride along in the running rows' step
        if fresh:
            calls.append(({(r.adapter, tuple(r.ids)) for r in fresh}, sched._steps))
        folded(lane, fresh, chunk)

    sched._prefill, sched._decode_folded = recorded, recorded_folded
    burst = [("alpha", "w1 w2 w3"), ("beta", "w4 w5"), ("alpha", "w6 w7 w8 w9 w10 w11"), ("beta", "w12")]
    burst += [("alpha", "w13 w14"), ("alpha", "w13 w14")]  # the same prompt twice: one prefill, counted once
    got: dict[int, list[int]] = {i: [] for i in range(len(burst))}
    done = threading.Semaphore(0)

    def sink_for(i):
        def sink(event):
            if event[0] == "token":
                got[i].append(event[1])
            else:
                assert event[0] == "done", event
                done.release()

        return sink

    hold = threading.Event()
    try:
        engine.call(lambda: hold.wait(30))  # the whole burst is queued before the scheduler looks
        sched.submit(
            [
                Row("generate", a, engine.tokenizer(p)["input_ids"], 6, sink=sink_for(i))
                for i, (a, p) in enumerate(burst)
            ]
        )
        hold.set()
        for _ in burst:
            assert done.acquire(timeout=120), "the requests did not finish"
    finally:
        engine.close()
    lengths = {(a, p): len(engine.tokenizer(p)["input_ids"]) for a, p in burst}
    by_step = {}
    for prompts, step in calls:
        by_step.setdefault(step, set()).update(prompts)
    assert len(by_step) >= 3  # not all in one step
    for prompts in by_step.values():
        tokens = [len(ids) for _, ids in prompts]
        assert sum(tokens) <= 5 or len(tokens) == 1, prompts  # within the budget, or one prompt alone
    assert sum(len(p) for p, _ in calls) == len(lengths)  # each distinct prompt prefilled once
    assert sched.stats["folded_prefills"] > 0  # (most of them in the running rows' steps)
    for i, (adapter, prompt) in enumerate(burst):
        assert engine.tokenizer.decode(got[i], skip_special_tokens=True) == reference(adapter, prompt, 6)
