"""The benchmark: its bounds mark what a method must compute, its workers report what the tables need, and it
runs end to end in --quick mode on a tiny model (timings themselves are not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from deltatune import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _marks_reached(arch: str, bound: str) -> tuple[int, int]:
    """(marks placed, marks whose gradient the backward computed) for one step of a tiny model's bound."""
    reached = []
    original = bench._NeedsGrad.backward

    def counting(ctx, grad):
        reached.append(1)
        return original(ctx, grad)

    bases = bench.Bases(arch, "tiny", "cpu")
    model, anchor = bench.make_bound(bases, bound)
    placed = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    bench._NeedsGrad.backward = staticmethod(counting)
    try:
        ids = bench._ids(arch, "tiny", 2, 8)
        labels = ids if bench.ARCHS[arch]["task"] == "causal" else torch.tensor([0, 1])
        model(input_ids=ids, labels=labels).loss.backward()
    finally:
        bench._NeedsGrad.backward = original
    assert anchor.grad is not None
    assert all(p.grad is None for p in model.parameters()), "a bound computes no weight gradient"
    return placed, len(reached)


@pytest.mark.parametrize(
    ("arch", "bound", "per_block"),
    [
        ("llama", "bound-qv", 2),
        ("llama", "bound-all", 7),  # q k v o gate up down
        ("opt", "bound-houlsby", 2),
        ("gpt2", "bound-pfeiffer", 1),
        ("bert", "bound-qv", 2),
        ("llama", "bound-ia3", 3),  # k, v outputs; down_proj's input
        ("opt", "bound-oft", 2),  # q, v inputs
        ("bert", "bound-ia3", 4),  # key, value outputs; both output.dense inputs (PEFT matches the suffix)
        ("llama", "bound-prompt", 0.5),  # one mark: the virtual tokens' encoder
        ("gpt2", "bound-prefix", 0.5),  # one mark: the prefix keys/values' encoder
    ],
)
def test_bound_marks_every_trained_layer_and_its_gradient_is_computed(arch, bound, per_block):
    placed, reached = _marks_reached(arch, bound)
    assert placed == per_block * 2  # two blocks in the tiny models (prompt learning: one encoder in all)
    assert reached == placed


@pytest.mark.parametrize("bound", ["bound-qv", "bound-all", "bound-houlsby"])
def test_bound_carries_the_true_gradient_through_the_frozen_layers(bound):
    """What reaches block 1's input in a bound's backward is the loss's true gradient there (marks are
    identities that pass it on), not only the residual stream's share: a method with trained layers in block 0
    needs all of it, through the frozen weights of every layer above."""
    from deltatune.losses import causal_lm_loss

    bases = bench.Bases("llama", "tiny", "cpu")
    ids = bench._ids("llama", "tiny", 2, 8)
    model, _ = bench.make_bound(bases, bound)
    seen = {}

    def keep(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        h.retain_grad()
        seen["h"] = h

    handle = model.model.layers[1].register_forward_pre_hook(keep, with_kwargs=True)
    causal_lm_loss(model, ids, input_ids=ids).backward()
    handle.remove()
    plain = bench.build_model("llama", "tiny").requires_grad_(False)

    def leaf(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_()
        seen["ref"] = h
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    plain.model.layers[1].register_forward_pre_hook(leaf, with_kwargs=True)
    causal_lm_loss(plain, ids, input_ids=ids).backward()
    assert torch.allclose(seen["h"].grad, seen["ref"].grad, atol=1e-6)


@pytest.mark.parametrize(
    ("bound", "inputs", "outputs"),
    [("bound-ia3", {"down_proj"}, {"k_proj", "v_proj"}), ("bound-oft", {"q_proj", "v_proj"}, set())],
)
def test_bounds_mark_inputs_where_the_method_needs_the_input_gradient(bound, inputs, outputs):
    """OFT rotates a layer's input and (IA)^3 rescales a feed-forward layer's input: their gradients need
    `dY W` at that layer, even in the lowest block, so the mark goes on the input (a pre-hook); a layer whose
    output the method changes (LoRA, VeRA, (IA)^3 on k/v) is marked on its output."""
    model, _ = bench.make_bound(bench.Bases("llama", "tiny", "cpu"), bound)
    pre = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m._forward_pre_hooks}
    post = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m._forward_hooks}
    assert (pre, post) == (inputs, outputs)


def test_bound_of_oft_carries_the_gradient_below_the_lowest_rotated_layer():
    """With the mark on q_proj's input, block 0's `dY_q W_q` is computed: the gradient reaches that input."""
    bases = bench.Bases("llama", "tiny", "cpu")
    model, _ = bench.make_bound(bases, "bound-oft")
    seen = []
    model.model.layers[0].self_attn.q_proj.register_full_backward_hook(lambda m, gi, go: seen.append(gi[0]))
    ids = bench._ids("llama", "tiny", 2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    assert seen and seen[0] is not None and seen[0].abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_top_layers_bound_starts_at_the_lowest_trained_block(arch):
    bases = bench.Bases(arch, "tiny", "cpu")
    model, _ = bench.make_bound(bases, "bound-top2")
    hooked = [n for n, m in model.named_modules() if m._forward_pre_hooks]
    assert len(hooked) == 1 and hooked[0].endswith(".0")  # tiny models have 2 blocks: top-2 is all of them
    assert _marks_reached(arch, "bound-top2") == (1, 1)


def test_full_bound_marks_the_embeddings():
    placed, reached = _marks_reached("opt", "bound-full")
    assert placed == reached == 2  # token and learned position embeddings


def test_cases_each_have_a_bound_and_peft_peers_exist():
    assert bench.with_bounds(["lora-qv", "dora", "qlora-nf4", "peft-qlora-nf4", "full"]) == [
        "bound-qv",
        "bound-qv-nf4",
        "bound-full",
        "lora-qv",
        "dora",
        "qlora-nf4",
        "peft-qlora-nf4",
        "full",
    ]
    assert all(peer in bench.CASES for peer in bench.PEFT_PEER.values())


def test_memory_case_reports_peak_from_after_set_up():
    row = bench.run_train_memory("qlora-nf4", "opt", "tiny", steps=1, device="cpu", batch=2, seq=16)
    assert row["peak_mb"] > 0 and row["alone_step_s"] > 0 and row["loss"] == "chunked"
    assert row["peak_from"] == "after set-up"
    assert row["trainable_params"] == 2 * 2 * (8 * 64 + 64 * 8)


def test_noise_is_the_ratio_of_one_bound_timed_twice():
    times = {"bound-qv": [1.0, 2.0, 1.0], "bound-qv (again)": [1.1, 1.9, 1.0], "lora-qv": [1.0, 2.0, 1.0]}
    noise = bench._noise(times)
    assert noise == {"case": "bound-qv", "ratio": pytest.approx(1.0), "range": pytest.approx([0.95, 1.1])}
    assert set(times) == {"bound-qv", "lora-qv"}
    assert bench._noise(times) is None


def test_a_timing_sample_runs_a_quarter_second_of_steps_on_cuda_and_one_step_on_cpu():
    assert bench.steps_per_sample("cpu", 0.01) == 1  # CPU: the cases' steps interleave one by one
    assert bench.steps_per_sample("cuda", 0.05) == 5  # 0.25 s / 50 ms
    assert bench.steps_per_sample("cuda", 0.3) == 1
    assert bench.steps_per_sample("cuda", 1e-5) == 50  # capped
    out = bench.run_train_timing(["bound-qv", "lora-qv"], "opt", "tiny", 2, "cpu", 2, 16)
    assert out["steps_per_sample"] == 1 and all(len(t) == 2 for t in out["times"].values())
    assert out["loss"] == {
        "bound-qv": "chunked",
        "lora-qv": "chunked",
    }  # labelled as the memory run labels them
    bench._noise(out["times"])  # as the parent does: the bound timed twice leaves the table
    rows = bench._train_rows(out, [])
    assert [r["loss"] for r in rows] == ["chunked", "chunked"]


def test_paired_ratios_ranges_and_under_bound_flag():
    times = {
        "bound-qv": [1.0, 2.0, 1.0],
        "lora-qv": [1.1, 2.0, 1.05],
        "peft-lora-qv": [1.2, 2.6, 1.2],
        "dora": [0.9, 1.8, 0.95],
    }
    memory = [{"case": "lora-qv", "peak_mb": 110.0}, {"case": "peft-lora-qv", "peak_mb": 125.0}]
    rows = {r["case"]: r for r in bench._train_rows({"times": times}, memory)}
    assert rows["lora-qv"]["x_bound"] == pytest.approx(1.05)
    assert rows["lora-qv"]["x_bound_range"] == pytest.approx([1.0, 1.1])
    assert rows["lora-qv"]["vs_peft"] == pytest.approx(1.2 / 1.05)  # the median of 1.09, 1.3, 1.14
    assert rows["lora-qv"]["mem_vs_peft"] == pytest.approx(110 / 125)
    assert not rows["lora-qv"]["under_bound"] and rows["dora"]["under_bound"]
    assert "x_bound" not in rows["bound-qv"]


def test_quick_bench_runs_end_to_end_on_a_tiny_model(tmp_path, capsys):
    cases = "lora-qv,dora,peft-lora-qv"
    assert (
        bench.main(
            [
                "--arch",
                "llama",
                "--size",
                "tiny",
                "--quick",
                "--batch",
                "2",
                "--seq",
                "16",
                "--rounds",
                "1",
                "--no-memory",
                "--no-latency",
                "--cases",
                cases,
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "bench-llama-tiny-cpu.json").read_text())
    rows = {r["case"]: r for r in result["train"]}
    assert set(rows) == {*cases.split(","), "bound-qv"}
    assert all(rows[c]["x_bound"] > 0 for c in cases.split(","))
    assert rows["lora-qv"]["vs_peft"] > 0 and "vs_peft" not in rows["dora"]  # no peft-dora row asked
    assert result["cpu"]["torch_capability"]
    out = capsys.readouterr().out
    assert "x bound" in out
    # the first bound timed twice per round gives the noise of a paired ratio; its second timing isn't a row
    assert result["noise"]["case"] == "bound-qv" and result["noise"]["range"][0] <= result["noise"]["ratio"]
    assert "noise: bound-qv timed twice in each round" in out
    assert set(result["step_times"]) == {*cases.split(","), "bound-qv"}


def test_latency_rows_cover_every_variant():
    rows = bench.run_latency("llama", "tiny", rounds=1, device="cpu", shapes=[(1, 8), (8, 8)], with_peft=True)
    cases = {(r["case"], r["batch"]) for r in rows}
    assert {(c, 8) for c in bench.LATENCY_CASES} <= cases
    assert ("mixed8", 1) not in cases
    assert [r["vs_base"] for r in rows if r["case"] == "base"] == [1.0, 1.0]


def test_no_peers_means_no_peft_rows_in_the_latency_table_either(tmp_path):
    """The latency worker's own `--peers` default is 'peft': `--peers ''` must reach it."""
    argv = ["--arch", "llama", "--size", "tiny", "--quick", "--seq", "8", "--no-train", "--no-memory"]
    assert bench.main([*argv, "--peers", "", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench-llama-tiny-cpu.json").read_text())["latency"]
    assert {r["case"] for r in rows} == {c for c in bench.LATENCY_CASES if not c.startswith("peft")}


def test_gpu_check_without_cuda_prints_its_plan_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout
    for needle in (
        "pytest -q -m gpu",
        "bench --device cuda",
        "--amp fp16",
        "qlora-nf4",
        "peft-dora",
        "deltatune compare",
    ):
        assert needle in proc.stdout


def test_quick_bench_runs_the_registrys_other_methods_against_peft(tmp_path):
    """(IA)^3, VeRA, OFT, prompt and prefix tuning, ours and PEFT's, each against its own bound, on a tiny Llama
    (OFT's blocks of 32 need a width PEFT accepts: 64)."""
    cases = "ia3,vera,oft,prompt-tuning,prefix-tuning,peft-ia3,peft-vera,peft-oft,peft-prompt-tuning,peft-prefix-tuning"
    argv = ["--arch", "llama", "--size", "tiny", "--quick", "--batch", "2", "--seq", "16", "--rounds", "1"]
    assert bench.main([*argv, "--no-memory", "--no-latency", "--cases", cases, "--out", str(tmp_path)]) == 0
    rows = {r["case"]: r for r in json.loads((tmp_path / "bench-llama-tiny-cpu.json").read_text())["train"]}
    bounds = {"bound-ia3", "bound-qv", "bound-oft", "bound-prompt", "bound-prefix"}
    assert set(rows) == {*cases.split(","), *bounds}
    assert rows["vera"]["bound"] == "bound-qv" and rows["oft"]["bound"] == "bound-oft"
    assert all(rows[c]["vs_peft"] > 0 for c in ("ia3", "vera", "oft", "prompt-tuning", "prefix-tuning"))


def test_cases_an_architecture_cannot_take_are_skipped_with_the_reason(tmp_path, capsys):
    argv = ["--arch", "gpt2", "--size", "tiny", "--quick", "--batch", "2", "--seq", "16", "--rounds", "1"]
    assert (
        bench.main([*argv, "--no-memory", "--no-latency", "--cases", "oft,lora-qv", "--out", str(tmp_path)])
        == 0
    )
    assert "skipped oft: OFT adapts nn.Linear layers only" in capsys.readouterr().err
    rows = json.loads((tmp_path / "bench-gpt2-tiny-cpu.json").read_text())["train"]
    assert {r["case"] for r in rows} == {"lora-qv", "bound-qv"}
    assert bench.skip_reason("bert", "peft-prefix-tuning") and not bench.skip_reason("bert", "prefix-tuning")


def test_a_run_of_only_cases_the_architecture_cannot_take_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--arch", "gpt2", "--size", "tiny", "--cases", "oft,peft-oft", "--no-memory"])
    assert e.value.code == 2
    assert "no case left to run on --arch gpt2: OFT adapts nn.Linear layers only" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rounds", "0"], "--rounds must be at least 1, got 0"),
        (["--batch", "-3"], "--batch must be at least 1, got -3"),
        (["--threads", "0"], "--threads must be at least 1, got 0"),
        (["--seq", "1"], "--seq must be from 2 to 2028 on --arch llama (its 2048 positions, less prompt"),
        (["--arch", "bert", "--seq", "493"], "--seq must be from 2 to 492 on --arch bert (its 512 positions"),
        (["--peers", "peft,vllm"], "--peers: unknown peer(s) ['vllm']; the one peer is 'peft' ('' for none)"),
        (["--out", "{file}"], "is a file, not a folder; pick a folder that can be written"),
        (["--out", "{file}/sub"], "pick a folder that can be written"),
    ],
)
def test_bad_options_are_refused_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    """Each ended a long run in a traceback, ran for minutes with a meaningless setting, or failed only when
    writing the results at the end."""
    (tmp_path / "a-file").write_text("")
    argv = [a.replace("{file}", str(tmp_path / "a-file")) for a in argv]
    monkeypatch.setattr(bench, "bench", lambda *a, **k: pytest.fail("the benchmark started"))
    monkeypatch.setattr(bench, "_subprocess", lambda *a, **k: pytest.fail("a worker started"))
    with pytest.raises(SystemExit) as e:
        bench.main([*argv, "--size", "tiny"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_the_out_folder_is_made_before_any_work_and_the_longest_seq_is_accepted(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "bench", lambda *a, **k: seen.setdefault("out", os.path.isdir(a[9])))
    out = tmp_path / "new" / "results"
    assert bench.main(["--size", "tiny", "--arch", "bert", "--seq", "492", "--out", str(out)]) == 0
    assert seen == {"out": True} and os.listdir(out) == []  # the write check leaves nothing behind


@pytest.mark.parametrize("bound", ["bound-prompt", "bound-prefix"])
def test_prompt_learning_bound_is_the_methods_own_computation_without_its_update(bound):
    """The bound of prompt/prefix tuning runs the method's longer input: its loss equals the method's, and the
    gradient reaching the marked virtual tokens (keys/values) is the one the method's parameter gets."""
    bases = bench.Bases("llama", "tiny", "cpu")
    model, _ = bench.make_bound(bases, bound)
    method = bench.make_method(bases, bench.CASES[bound.replace("bound-", "") + "-tuning"])
    ids = bench._ids("llama", "tiny", 2, 8)
    kept = {}

    def keep(module, args, out):  # runs after the bound's mark: `out` is the marked tensor
        out.retain_grad()
        kept["out"] = out

    encoders = [e for m in model.modules() for e in getattr(m, "prompt_encoder", {}).values()]
    theirs = [e for m in method.modules() for e in getattr(m, "prompt_encoder", {}).values()]
    assert len(encoders) == len(theirs) == 1
    encoders[0].load_state_dict(theirs[0].state_dict())  # the same virtual tokens (each drew its own)
    encoders[0].register_forward_hook(keep)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    want = method(input_ids=ids, labels=ids).loss
    want.backward()
    trained = [p for p in method.parameters() if p.requires_grad]
    assert len(trained) == 1 and all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(kept["out"].grad, trained[0].grad)
