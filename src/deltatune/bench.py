"""`deltatune bench`: what a training step and a forward pass cost, against the bound and against PEFT.

An OPT-shaped model (random init, no download), batch 4 x seq 128, AdamW. Each training case runs in its
own process so its peak memory is its own; warm-up steps are dropped and the median step is reported.
Every time is also given as a ratio against a reference measured in the same run: these machines are
noisy, an absolute time means little.

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


# ---- one training case, in its own process -------------------------------------------------------------


def run_train_case(case: str, size: str, steps: int, warmup: int, device: str, batch: int, seq: int) -> dict:
    """Time `steps` training steps of one case (after `warmup`), and its peak memory."""
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

    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {
        "case": case,
        "loss": "chunked" if chunked else "standard",
        "step_s": statistics.median(times),
        "steps": len(times),
        "peak_mb": _peak_mb(device),
        "trainable_params": sum(p.numel() for p in params),
    }


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

    ours = many(copy.deepcopy(base))
    merged = get_peft_model(copy.deepcopy(base), LoraConfig(**LORA, init_lora_weights=False)).eval()
    merged.merge_adapter()
    variants = {
        "base": lambda x: base(input_ids=x),
        "lora": lambda x: ours(input_ids=x),
        "lora-merged": lambda x: merged(input_ids=x),
        "mixed8": lambda x: ours(input_ids=x, adapter_names=[names[i % 8] for i in range(x.shape[0])]),
    }
    for style in ("houlsby", "pfeiffer"):
        wrapped = get_peft_model(copy.deepcopy(base), BottleneckConfig(style=style, init="bert")).eval()
        variants[style] = lambda x, m=wrapped: m(input_ids=x)
    if with_peft:
        import peft

        theirs = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(**LORA, init_lora_weights=False), adapter_name=names[0]
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


def _train_table(rows: list[dict]) -> list[str]:
    by = {r["case"]: r for r in rows if "step_s" in r}
    lines = [
        f"{'case':<10} {'loss':<9} {'s/step':>7} {'x bound':>8} {'steps/s vs peft':>16} {'peak MB':>8} {'MB vs peft':>11}"
    ]
    for r in rows:
        if "step_s" not in r:
            lines.append(f"{r['case']:<10} FAILED: {r.get('error')}")
            continue
        bound = by.get("bound" if r["loss"] == "chunked" else "bound-std")
        peft_row = by.get("peft")
        xb = f"{r['step_s'] / bound['step_s']:.3f}" if bound else "-"
        vp = f"{peft_row['step_s'] / r['step_s']:.3f}x" if peft_row else "-"
        mp = f"{100 * (r['peak_mb'] / peft_row['peak_mb'] - 1):+.1f}%" if peft_row else "-"
        lines.append(
            f"{r['case']:<10} {r['loss']:<9} {r['step_s']:>7.3f} {xb:>8} {vp:>16} {r['peak_mb']:>8.0f} {mp:>11}"
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
    steps, warmup, rounds = (3, 1, 5) if quick else (6, 2, 15)
    with_peft = "peft" in peers
    common = ["--size", size, "--device", device, "--threads", str(threads)]
    train_rows = []
    for case in cases:
        if case == "peft" and not with_peft:
            continue
        print(f"  train: {case} ...", file=sys.stderr, flush=True)
        row = _subprocess(
            ["--worker", "train", "--case", case, "--steps", str(steps), "--warmup", str(warmup), *common]
        )
        row.setdefault("case", case)
        train_rows.append(row)
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
    lines += _train_table(train_rows)
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
    parser.add_argument("--out", default="bench-results", help="folder for the JSON results")
    # internal: one case in this process
    parser.add_argument("--worker", choices=["train", "latency"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=6, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=15, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    torch.set_num_threads(args.threads)
    peers = tuple(p for p in args.peers.split(",") if p)
    if args.worker:
        if args.worker == "train":
            data = run_train_case(args.case, args.size, args.steps, args.warmup, args.device, 4, 128)
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
        tuple(args.cases.split(",")),
        not args.no_latency,
        args.threads,
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
