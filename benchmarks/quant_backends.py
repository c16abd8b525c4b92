"""Which library should hold the frozen quantized base on CPU? Measures every candidate on the same stack.

The stack is the linear layers of OPT-125m (12 blocks of q/k/v/out 768x768, fc1 768x3072, fc2 3072x768,
normal(0, 0.02) weights), frozen; each step is a forward and a backward to the input (what QLoRA's base does).
Each case runs in its own process (peak RSS is per process); rounds alternate the cases and times are
reported as a ratio to the fp32 case of the same round, since the machine is shared and noisy.

    python benchmarks/quant_backends.py                      # all cases, 2 rounds
    python benchmarks/quant_backends.py --rounds 3 --out quant_backends.json

Cases: fp32 (reference), nf4 with torchao's NF4Tensor and with bitsandbytes (deltatune's QuantizedLinear),
int8 per channel with deltatune's torch ops, torchao's Int8WeightOnlyConfig and bitsandbytes' Linear8bitLt
(in training mode, which on CPU dequantizes to fp32 rather than multiplying in int8).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # python -P / PYTHONSAFEPATH leave it out
from _args import below_one, unwritable_out  # noqa: E402

CASES = ["fp32", "nf4-torchao", "nf4-bitsandbytes", "int8-torch", "int8-torchao", "int8-bitsandbytes"]
HIDDEN, FFN, BLOCKS = 768, 3072, 12


def _case(name: str, tokens: int, steps: int, threads: int) -> dict:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shapes = [(HIDDEN, HIDDEN)] * 4 + [(FFN, HIDDEN), (HIDDEN, FFN)]

    if name == "fp32":

        def quantize(w):
            return w

        def linear(x, q):
            return F.linear(x, q)

        def dequantize(q):
            return q

        def nbytes(q):
            return q.numel() * 4

    elif name == "nf4-torchao":
        from torchao.quantization import to_nf4
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

        def quantize(w):
            return to_nf4(w, 64, 256)

        def linear(x, q):
            return linear_nf4(x, q)

        def dequantize(q):
            return q.get_original_weight()

        def nbytes(q):
            parts = (q.quantized_data, q.quantized_scalers, q.quantization_factor, q.scaler_mean, q.nf4)
            return sum(t.numel() * t.element_size() for t in parts)

    elif name == "int8-torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        def quantize(w):
            m = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            m.weight = torch.nn.Parameter(w, requires_grad=False)
            quantize_(m, Int8WeightOnlyConfig())
            return m.weight

        def linear(x, q):
            return F.linear(x, q)

        def dequantize(q):
            return q.dequantize()

        def nbytes(q):
            return q.qdata.numel() + q.scale.numel() * q.scale.element_size()

    elif name == "int8-bitsandbytes":
        import bitsandbytes as bnb

        def quantize(w):
            m = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False)
            m.load_state_dict({"weight": w})
            return m.to("cpu")  # Int8Params quantize when moved

        def linear(x, q):
            return q(x)

        def scales(q):  # the first forward moves them from the weight into the layer's state
            return q.weight.SCB if q.weight.SCB is not None else q.state.SCB

        def dequantize(q):
            return q.weight.data.float() * scales(q).float().unsqueeze(1) / 127

        def nbytes(q):
            return q.weight.data.numel() + scales(q).numel() * scales(q).element_size()

    else:
        from deltatune.methods.quant import QuantizedLinear

        quant, backend = name.split("-")

        def quantize(w):
            return QuantizedLinear.from_weight(w, None, quant, backend)

        def linear(x, q):
            return q(x)

        def dequantize(q):
            return q.dequantize()

        def nbytes(q):
            return sum(b.numel() * b.element_size() for b in q.buffers())

    start = time.perf_counter()
    blocks, errors, first = [], [], []
    for i in range(BLOCKS):
        block = []
        for shape in shapes:
            w = torch.randn(shape) * 0.02
            q = quantize(w)
            if i == 0:
                first.append(w)
                errors.append(((dequantize(q).float() - w).norm() / w.norm()).item())
            block.append(q)
        blocks.append(block)
    quantize_s = time.perf_counter() - start
    storage = sum(nbytes(q) for block in blocks for q in block)

    x = torch.randn(tokens, HIDDEN)
    fc1, w1 = blocks[0][4], first[4]
    reference = F.linear(x, w1)
    out_err = ((linear(x, fc1).float() - reference).norm() / reference.norm()).item()
    xg = x.clone().requires_grad_(True)
    grad = torch.randn(tokens, FFN)
    (gx,) = torch.autograd.grad(linear(xg, fc1), xg, grad)
    gref = grad @ dequantize(fc1).float()
    grad_err = ((gx - gref).norm() / gref.norm()).item()
    del first, w1, reference
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def forward(h):
        for q, k, v, o, f1, f2 in blocks:
            h = h + linear(linear(h, q) + linear(h, k) + linear(h, v), o)
            h = h + linear(torch.relu(linear(h, f1)), f2)
        return h

    times = []
    inputs = torch.randn(2, tokens // 2, HIDDEN)
    for _ in range(steps + 2):
        xx = inputs.clone().requires_grad_(True)
        t = time.perf_counter()
        forward(xx).pow(2).mean().backward()
        times.append(time.perf_counter() - t)
    return {
        "case": name,
        "quantize_s": round(quantize_s, 2),
        "storage_mb": round(storage / 2**20, 1),
        "step_ms": round(1000 * statistics.median(times[2:]), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rss_before_steps_mb": round(rss_before),
        "weight_rel_err": round(statistics.mean(errors), 5),
        "out_rel_err_vs_fp32": round(out_err, 5),
        "grad_rel_err_vs_dequantized": grad_err,
    }


def _bad_args(args: argparse.Namespace) -> str | None:
    """The first setting out of range: an unknown case failed in its child and the others ran on; `--cases ''`
    ran every case in a child per case; `--steps 0` or `--threads 0` failed in each child after quantizing, and
    `--rounds 0` wrote an empty table; `--out` was tried only at the end."""
    if unknown := [c for c in args.cases.split(",") if c not in CASES]:
        return f"--cases: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(CASES)}"
    if why := below_one(args, ("rounds", "steps", "threads")):
        return why
    if args.tokens < 2:
        return f"--tokens must be at least 2 (the timed steps run 2 rows of --tokens / 2), got {args.tokens}"
    return None if args.one else unwritable_out(args.out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="quant_backends.json")
    parser.add_argument("--one", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if why := _bad_args(args):
        parser.error(why)
    if args.one:
        print(json.dumps(_case(args.one, args.tokens, args.steps, args.threads)))
        return
    cases = args.cases.split(",")
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    for r in range(args.rounds):
        for case in cases:
            cmd = [sys.executable, __file__, "--one", case, "--tokens", str(args.tokens)]
            cmd += ["--steps", str(args.steps), "--threads", str(args.threads)]
            done = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
            )
            if done.returncode != 0:
                print(f"{case}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            runs[case].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {case}: {runs[case][-1]['step_ms']} ms/step", file=sys.stderr)
    fp32 = runs.get("fp32", [])
    rows = []
    for results in runs.values():
        if not results:
            continue
        ratios = [res["step_ms"] / ref["step_ms"] for res, ref in zip(results, fp32)] if fp32 else []
        rows.append(
            {
                **results[-1],
                "step_ms": statistics.median(r["step_ms"] for r in results),
                "step_vs_fp32": round(statistics.median(ratios), 2) if ratios else None,
                "step_ms_all": [r["step_ms"] for r in results],
                "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            }
        )
    header = f"{'case':18} {'quantize s':>10} {'storage MB':>10} {'ms/step':>8} {'x fp32':>7} {'peak RSS MB':>11} {'weight err':>10} {'out err':>8}"
    print(header)
    for row in rows:
        print(
            f"{row['case']:18} {row['quantize_s']:>10} {row['storage_mb']:>10} {row['step_ms']:>8} "
            f"{row['step_vs_fp32'] if row['step_vs_fp32'] is not None else '-':>7} {row['peak_rss_mb']:>11} "
            f"{row['weight_rel_err']:>10} {row['out_rel_err_vs_fp32']:>8}"
        )
    settings = {"tokens": args.tokens, "steps": args.steps, "threads": args.threads, "rounds": args.rounds}
    with open(args.out, "w") as f:
        json.dump({"settings": settings, "cases": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
