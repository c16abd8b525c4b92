"""`deltatune bench`: what a training step and a forward pass cost, against the bound and against PEFT.

An OPT-shaped model (random init, no download), batch 4 x seq 128, AdamW. Peak memory: each training case
in its own process. Step time: every case in one process, taking steps in turn (after a warm-up step each),
so that all cases see the same machine noise; ratios (to the bound, to PEFT, to full fine-tuning) are taken
within each round and the median reported. These machines are noisy: an absolute time means little, and
processes run minutes apart differ by several percent.

The bound is the frozen base's forward plus backward to its input embeddings with no weight gradient:
a LoRA step can't cost less. It is measured with the same loss code as the row it is compared to.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

SIZES = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "ffn_dim": 256,
        "num_attention_heads": 4,
        "word_embed_proj_dim": 64,
    },
    "125m": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "ffn_dim": 3072,
        "num_attention_heads": 12,
        "word_embed_proj_dim": 768,
    },
    "350m": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "ffn_dim": 4096,
        "num_attention_heads": 16,
        "word_embed_proj_dim": 512,
        "do_layer_norm_before": False,
    },
}
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
TRAIN_CASES = ("bound", "lora", "peft", "full", "bound-std", "lora-std")
LATENCY_CASES = ("base", "lora", "lora-merged", "houlsby", "pfeiffer", "mixed8", "peft", "peft-mixed8")


def build_model(size: str, seed: int = 0):
    """An OPT causal LM of the given shape, random init (OPT-125m/350m sizes, 50272-token vocabulary)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=50272, max_position_embeddings=2048, **SIZES[size])
    return OPTForCausalLM(config)


def _batch(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 50272, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_mb(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _peak_rss_mb()


# ---- training cases: time interleaved in one process, memory one process per case -------------------------


def make_case(case: str, size: str, device: str, batch: int, seq: int):
    """A training step function for `case` on a fresh model, and the number of trainable parameters."""
    from deltatune import LoraConfig, get_peft_model
    from deltatune.losses import causal_lm_loss

    model = build_model(size)
    chunked = not case.endswith("-std") and case != "peft"
    if case.startswith("lora"):
        model = get_peft_model(model, LoraConfig(**LORA))
    elif case == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    elif case.startswith("bound"):
        model.requires_grad_(False)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None
    ids = _batch(batch, seq).to(device)
    embed = (model.get_base_model() if hasattr(model, "get_base_model") else model).get_input_embeddings()

    def step() -> float:
        if case.startswith("bound"):
            inputs = {"inputs_embeds": embed(ids).detach().requires_grad_(True)}
        else:
            inputs = {"input_ids": ids}
        loss = causal_lm_loss(model, ids, **inputs) if chunked else model(**inputs, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, sum(p.numel() for p in params), "chunked" if chunked else "standard"


def _timed(step, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_train_memory(case: str, size: str, steps: int, device: str, batch: int, seq: int) -> dict:
    """Peak memory of `steps` training steps of one case (run this in its own process)."""
    step, trainable, loss = make_case(case, size, device, batch, seq)
    times = [_timed(step, device) for _ in range(steps)]
    return {
        "case": case,
        "loss": loss,
        "peak_mb": _peak_mb(device),
        "trainable_params": trainable,
        "alone_step_s": statistics.median(times),
    }


def run_train_timing(cases: list[str], size: str, rounds: int, device: str, batch: int, seq: int) -> dict:
    """Step times of every case, interleaved step by step in this one process, so that all of them see the
    same machine noise; each case's ratio to the bound (and to PEFT) is taken within a round, then the median."""
    steps = {case: make_case(case, size, device, batch, seq)[0] for case in cases}
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {c: [] for c in cases}
    for _ in range(rounds):
        for case, step in steps.items():
            times[case].append(_timed(step, device))
    return {"times": times}


# ---- forward latency, all variants in one process, measured round-robin ---------------------------------


def run_latency(
    size: str, rounds: int, device: str, shapes: list[tuple[int, int]], with_peft: bool
) -> list[dict]:
    from deltatune import BottleneckConfig, LoraConfig, get_peft_model

    base = build_model(size).to(device).eval()
    names = [f"a{i}" for i in range(8)]

    def many(model):
        model = get_peft_model(model, LoraConfig(**LORA, init_lora_weights=False), adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, LoraConfig(**LORA, init_lora_weights=False))
        return model.eval()

    def shared(model):
        """A copy of the modules that shares the base's weight tensors, so every variant reads the same memory
        (separate copies of the weights alone differ by several percent at batch 1 on these machines)."""
        return copy.deepcopy(model, memo={id(t): t for t in (*model.parameters(), *model.buffers())})

    ours = many(shared(base))
    merged = (
        get_peft_model(copy.deepcopy(base), LoraConfig(**LORA, init_lora_weights=False))
        .merge_and_unload()
        .eval()
    )
    variants = {
        "base": lambda x: base(input_ids=x),
        "lora": lambda x: ours(input_ids=x),
        "lora-merged": lambda x: merged(input_ids=x),
        "mixed8": lambda x: ours(input_ids=x, adapter_names=[names[i % 8] for i in range(x.shape[0])]),
    }
    for style in ("houlsby", "pfeiffer"):
        wrapped = get_peft_model(shared(base), BottleneckConfig(style=style, init="bert")).eval()
        variants[style] = lambda x, m=wrapped: m(input_ids=x)
    if with_peft:
        import peft

        theirs = peft.get_peft_model(
            shared(base), peft.LoraConfig(**LORA, init_lora_weights=False), adapter_name=names[0]
        )
        for name in names[1:]:
            theirs.add_adapter(name, peft.LoraConfig(**LORA, init_lora_weights=False))
        theirs.eval()
        variants["peft"] = lambda x: theirs(input_ids=x)
        variants["peft-mixed8"] = lambda x: theirs(
            input_ids=x, adapter_names=[names[i % 8] for i in range(x.shape[0])]
        )
    results = []
    with torch.no_grad():
        for batch, seq in shapes:
            x = _batch(batch, seq).to(device)
            times: dict[str, list[float]] = {k: [] for k in variants}
            for r in range(rounds + 1):
                for name, fn in variants.items():
                    if name.endswith("mixed8") and batch == 1:
                        continue
                    if device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    fn(x)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    if r > 0:  # the first round warms up
                        times[name].append(time.perf_counter() - start)
            base_ms = statistics.median(times["base"]) * 1000
            for name, ts in times.items():
                if ts:
                    ms = statistics.median(ts) * 1000
                    results.append(
                        {"case": name, "batch": batch, "seq": seq, "ms": ms, "vs_base": ms / base_ms}
                    )
    return results


# ---- the parent: run cases in subprocesses, print the tables ---------------------------------------------


def _subprocess(args: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(
        [sys.executable, "-m", "deltatune.bench", *args, "--worker-out", out],
        capture_output=True,
        text=True,
        env=env,
    )
    try:
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def _paired(times: dict[str, list[float]], case: str, ref: str | None) -> float | None:
    if ref is None or ref not in times or case not in times:
        return None
    return statistics.median(a / b for a, b in zip(times[case], times[ref]))


def _train_rows(timing: dict, memory: list[dict]) -> list[dict]:
    times = timing.get("times", {})
    rows = []
    for mem in memory:
        case = mem["case"]
        row = dict(mem)
        if case in times:
            row["step_s"] = statistics.median(times[case])
            bound = "bound" if mem.get("loss") == "chunked" else "bound-std"
            row["x_bound"] = _paired(times, case, bound)
            peft_ratio = _paired(times, "peft", None if case == "peft" else case)
            row["throughput_vs_peft"] = 1.0 if case == "peft" else peft_ratio
            full = _paired(times, "full", case) if case != "full" else 1.0
            row["steps_per_s_vs_full"] = full
        rows.append(row)
    by = {r["case"]: r for r in rows}
    for r in rows:
        if "peak_mb" in r and "peft" in by and "peak_mb" in by["peft"]:
            r["mem_vs_peft"] = r["peak_mb"] / by["peft"]["peak_mb"] - 1
        if "peak_mb" in r and "full" in by and "peak_mb" in by["full"]:
            r["mem_vs_full"] = r["peak_mb"] / by["full"]["peak_mb"] - 1
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _train_table(rows: list[dict]) -> list[str]:
    lines = [
        f"{'case':<10} {'loss':<9} {'s/step':>7} {'x bound':>8} {'vs peft':>8} {'vs full':>8} "
        f"{'peak MB':>8} {'MB vs peft':>11} {'MB vs full':>11}"
    ]
    for r in rows:
        if "peak_mb" not in r:
            lines.append(f"{r['case']:<10} FAILED: {r.get('error')}")
            continue
        lines.append(
            f"{r['case']:<10} {r['loss']:<9} {_fmt(r.get('step_s'), '7.3f')} {_fmt(r.get('x_bound'), '8.3f')} "
            f"{_fmt(r.get('throughput_vs_peft'), '7.3f') + 'x':>8} {_fmt(r.get('steps_per_s_vs_full'), '7.2f') + 'x':>8} "
            f"{r['peak_mb']:>8.0f} {_fmt(100 * r['mem_vs_peft'] if 'mem_vs_peft' in r else None, '+10.1f') + '%':>11} "
            f"{_fmt(100 * r['mem_vs_full'] if 'mem_vs_full' in r else None, '+10.1f') + '%':>11}"
        )
    return lines


def bench(
    size: str = "125m",
    peers: tuple[str, ...] = ("peft",),
    quick: bool = False,
    device: str | None = None,
    cases: tuple[str, ...] = TRAIN_CASES,
    latency: bool = True,
    threads: int = 2,
    out: str | None = None,
) -> dict:
    """Run the benchmark and return (and optionally write) its results."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    mem_steps, train_rounds, rounds = (2, 3, 5) if quick else (3, 8, 15)
    with_peft = "peft" in peers
    common = ["--size", size, "--device", device, "--threads", str(threads)]
    cases = tuple(c for c in cases if c != "peft" or with_peft)
    memory = []
    for case in cases:
        print(f"  memory: {case} (own process) ...", file=sys.stderr, flush=True)
        row = _subprocess(["--worker", "memory", "--case", case, "--steps", str(mem_steps), *common])
        row.setdefault("case", case)
        memory.append(row)
    train_rows = []
    if cases:
        print(
            f"  step time: {len(cases)} cases interleaved, {train_rounds} rounds ...",
            file=sys.stderr,
            flush=True,
        )
        timing = _subprocess(
            ["--worker", "timing", "--cases", ",".join(cases), "--rounds", str(train_rounds), *common]
        )
        train_rows = _train_rows(timing, memory)
    latency_rows = []
    if latency:
        print("  latency: all variants, round-robin ...", file=sys.stderr, flush=True)
        got = _subprocess(
            [
                "--worker",
                "latency",
                "--rounds",
                str(rounds),
                *common,
                *(["--peers", "peft"] if with_peft else []),
            ]
        )
        latency_rows = got.get("rows", [got])
    import transformers

    result = {
        "size": size,
        "device": device,
        "threads": threads,
        "batch": 4,
        "seq": 128,
        "quick": quick,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "train": train_rows,
        "latency": latency_rows,
    }
    if with_peft:
        try:
            import peft

            result["peft"] = peft.__version__
        except ImportError:
            result["peft"] = None
    lines = [f"deltatune bench: OPT-{size}-shaped, batch 4 x seq 128, {device}, {threads} threads", ""]
    lines += _train_table(train_rows) if train_rows else []
    if latency_rows and "ms" in latency_rows[0]:
        lines += ["", f"{'forward':<12} {'batch x seq':>11} {'ms':>9} {'vs base':>8}"]
        lines += [
            f"{r['case']:<12} {str(r['batch']) + ' x ' + str(r['seq']):>11} {r['ms']:>9.1f} {r['vs_base']:>8.3f}"
            for r in latency_rows
        ]
    result["table"] = "\n".join(lines)
    print(result["table"])
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"bench-{size}.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deltatune bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="125m", help="OPT shape (default 125m)")
    parser.add_argument(
        "--peers", default="peft", help="comma-separated peers to run beside ours ('peft' or '')"
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    parser.add_argument(
        "--cases", default=",".join(TRAIN_CASES), help=f"training cases (default {','.join(TRAIN_CASES)})"
    )
    parser.add_argument("--no-latency", action="store_true", help="skip the forward-latency table")
    parser.add_argument("--no-train", action="store_true", help="skip the training table")
    parser.add_argument("--out", default="bench-results", help="folder for the JSON results")
    # internal: one case in this process
    parser.add_argument("--worker", choices=["memory", "timing", "latency"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=15, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    torch.set_num_threads(args.threads)
    peers = tuple(p for p in args.peers.split(",") if p)
    if args.worker:
        if args.worker == "memory":
            data = run_train_memory(args.case, args.size, args.steps, args.device, 4, 128)
        elif args.worker == "timing":
            data = run_train_timing(args.cases.split(","), args.size, args.rounds, args.device, 4, 128)
        else:
            data = {
                "rows": run_latency(args.size, args.rounds, args.device, [(1, 128), (8, 64)], "peft" in peers)
            }
        with open(args.worker_out, "w") as f:
            json.dump(data, f)
        return 0
    unknown = [c for c in args.cases.split(",") if c not in TRAIN_CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(TRAIN_CASES)}")
    if "peft" in peers:
        try:
            import peft  # noqa: F401
        except ImportError:
            parser.error("--peers peft: peft is not installed (pip install peft), or pass --peers ''")
    bench(
        args.size,
        peers,
        args.quick,
        args.device,
        () if args.no_train else tuple(args.cases.split(",")),
        not args.no_latency,
        args.threads,
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
