"""What DoRA's row norms cost a training step on the CPU: by expansion (the default) or from `W + sBA` directly.

The fused DoRA needs `||W + s B A||` per output row of every adapted layer at every step. Made directly, that is
an `[out, in]` sum written and read per layer; by expansion (`deltatune.methods.lora.DORA_NORMS_BY_EXPANSION`)
it is `||W_i||²` (cached) `+ 2s B_i·(A W_iᵀ) + s² B_i (A Aᵀ) B_iᵀ`, with `A Wᵀ` from the base matmul itself. This
script builds the bench's model (`deltatune.bench`, random init, no download), then takes training steps of DoRA
on every linear layer with the norms made each way and of that placement's bound, in turn, round after round, in
one process, and reports the median and range of the paired per-round ratios.

    python benchmarks/dora_norms.py [--arch llama] [--size 125m] [--rounds 6] [--case dora-all] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _args import below_one, unwritable_out  # noqa: E402

import deltatune.methods.lora as lora_method  # noqa: E402
from deltatune.bench import ARCHS, Bases, make_step  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="llama", choices=sorted(ARCHS))
    parser.add_argument("--size", default="125m")
    parser.add_argument("--case", default="dora-all", choices=["dora", "dora-all"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the times and ratios as JSON here")
    args = parser.parse_args(argv)
    if args.size not in ARCHS[args.arch]["sizes"]:
        parser.error(f"--size {args.size!r}: {args.arch} has {', '.join(ARCHS[args.arch]['sizes'])}")
    if why := below_one(args, ("rounds", "batch", "seq", "threads")) or (
        args.out and unwritable_out(args.out)
    ):
        parser.error(why)
    torch.set_num_threads(args.threads)

    bases = Bases(args.arch, args.size, "cpu")
    step = make_step(bases, args.case, args.batch, args.seq)[0]
    bound = make_step(bases, "bound-all" if args.case == "dora-all" else "bound-qv", args.batch, args.seq)[0]

    def run(kind: str) -> float:
        lora_method.DORA_NORMS_BY_EXPANSION = kind != "direct"
        start = time.perf_counter()
        (bound if kind == "bound" else step)()
        return time.perf_counter() - start

    kinds = ("expansion", "direct", "bound")
    for kind in kinds:  # warm-up
        run(kind)
        run(kind)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(args.rounds):
        for kind in kinds:
            times[kind].append(run(kind))
        print(f"round {i + 1}: " + "  ".join(f"{k} {times[k][-1]:.3f} s" for k in kinds), flush=True)
    lora_method.DORA_NORMS_BY_EXPANSION = True

    def ratio(a: str, b: str) -> dict:
        r = [x / y for x, y in zip(times[a], times[b])]
        return {"median": statistics.median(r), "min": min(r), "max": max(r)}

    report = {
        "arch": args.arch,
        "size": args.size,
        "case": args.case,
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "times_s": times,
        "expansion_over_direct": ratio("expansion", "direct"),
        "expansion_over_bound": ratio("expansion", "bound"),
        "direct_over_bound": ratio("direct", "bound"),
    }
    for key in ("expansion_over_direct", "expansion_over_bound", "direct_over_bound"):
        r = report[key]
        print(f"{key.replace('_', ' ')}: {r['median']:.3f} (range {r['min']:.3f}-{r['max']:.3f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
