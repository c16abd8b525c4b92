"""QLoRA's memory claim on an OPT-125m-shaped model: base-weight memory, peak training memory, output error.

    python benchmarks/quant_memory.py                         # prints the tables, writes quant_memory.json
    python benchmarks/quant_memory.py --steps 4 --threads 2 --out runs/quant_memory.json

1. Base-weight memory of the linear layers (every nn.Linear but the tied lm_head, weights and biases) in
   fp32, NF4 and int8, counting every tensor the quantized layers keep (codes, scales, code books).
2. Peak training memory of LoRA, QLoRA-NF4 and QLoRA-int8 (r=8 on q_proj/v_proj, AdamW, the same random
   tokens and seed), each in its own process. The model is built in fp32 (random init), quantized, and the
   freed memory handed back to the OS before the peak is reset (`/proc/self/clear_refs`), so the peak RSS
   is that of the training steps, as when a loader quantizes layer by layer; the process's lifetime peak
   (`getrusage`) is reported beside it.
3. Each quantized layer's output error against the fp32 layer on random inputs, next to its weight's relative
   error, which is what the output error is expected to be for inputs uncorrelated with the rounding.

The model is random (normal(0, 0.02) weights, OPT's init), not the trained OPT-125m: no download is needed,
and trained weights with outliers would show somewhat larger NF4 errors.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
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

CASES = {"lora": None, "qlora-nf4": "nf4", "qlora-int8": "int8"}
MAX_SEQ = 2048  # max_position_embeddings of the model below


def _opt_125m():
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        hidden_size=768,
        num_hidden_layers=12,
        ffn_dim=3072,
        num_attention_heads=12,
        vocab_size=50272,
        max_position_embeddings=MAX_SEQ,
        word_embed_proj_dim=768,
    )
    return OPTForCausalLM(config)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024


def _reset_peak() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _train_case(case: str, steps: int, batch: int, seq: int, threads: int) -> dict:
    import torch

    from deltatune import LoraConfig, get_peft_model
    from deltatune.methods.quant import quantize_model

    torch.set_num_threads(threads)
    model = _opt_125m()
    if CASES[case]:
        quantize_model(model, CASES[case])
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(2, 50272, (batch, seq), generator=torch.Generator().manual_seed(1))
    _reset_peak()
    rss_before = _status_mb("VmRSS")
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {
        "case": case,
        "rss_before_steps_mb": round(rss_before),
        "peak_rss_steps_mb": round(_status_mb("VmHWM")),
        "peak_rss_process_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "step_s": round(statistics.median(times[1:] or times), 2),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "trainable_params": model.get_nb_trainable_parameters()[0],
    }


def _linear_bytes(model, names: list[str]) -> int:
    total = 0
    for name in names:
        module = model.get_submodule(name)
        tensors = [*module.parameters(), *module.buffers()]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def _static(tokens: int) -> dict:
    import torch
    import torch.nn.functional as F

    from deltatune.methods.quant import quantize_model

    fp32 = _opt_125m().eval()
    names = [n for n, m in fp32.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    memory = {"fp32": _linear_bytes(fp32, names)}
    errors = {}
    g = torch.Generator().manual_seed(2)
    for quantize in ("nf4", "int8"):
        model = quantize_model(copy.deepcopy(fp32), quantize)
        memory[quantize] = _linear_bytes(model, names)
        out_err, weight_err = [], []
        with torch.no_grad():
            for name in names:
                reference, layer = fp32.get_submodule(name), model.get_submodule(name)
                x = torch.randn(tokens, reference.in_features, generator=g)
                y = F.linear(x, reference.weight, reference.bias)
                out_err.append(((layer(x) - y).norm() / y.norm()).item())
                w = reference.weight
                weight_err.append(((layer.dequantize() - w).norm() / w.norm()).item())
            ids = torch.randint(2, 50272, (2, 64), generator=g)
            logits, ref_logits = model(input_ids=ids).logits, fp32(input_ids=ids).logits
        errors[quantize] = {
            "layer_out_rel_err_mean": round(statistics.mean(out_err), 5),
            "layer_out_rel_err_max": round(max(out_err), 5),
            "weight_rel_err_mean": round(statistics.mean(weight_err), 5),
            "out_over_weight_err_max": round(max(o / w for o, w in zip(out_err, weight_err)), 3),
            "logits_rel_err": round(((logits - ref_logits).norm() / ref_logits.norm()).item(), 5),
        }
        del model
        gc.collect()
    return {
        "linear_layers": len(names),
        "memory_mb": {k: round(v / 2**20, 2) for k, v in memory.items()},
        "memory_vs_fp32": {k: round(v / memory["fp32"], 4) for k, v in memory.items()},
        "errors": errors,
    }


def _bad_args(args: argparse.Namespace) -> str | None:
    """The first setting out of range: each failed in a child process after the model was built and
    quantized (`--rounds 0` after all of it), and `--out` was tried only at the end."""
    if why := below_one(args, ("steps", "batch", "threads", "rounds")):
        return why
    if not 2 <= args.seq <= MAX_SEQ:
        return (
            f"--seq must be from 2 (a next-token loss) to {MAX_SEQ} (the model's positions), got {args.seq}"
        )
    if not (args.case or args.static):
        return unwritable_out(args.out)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the training cases, alternating them")
    parser.add_argument("--out", default="quant_memory.json")
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--static", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if why := _bad_args(args):
        parser.error(why)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if args.case:
        print(json.dumps(_train_case(args.case, args.steps, args.batch, args.seq, args.threads)))
        return
    if args.static:
        print(json.dumps(_static(args.batch * args.seq)))
        return

    def child(extra: list[str]) -> dict:
        cmd = [sys.executable, __file__, *extra, "--steps", str(args.steps), "--batch", str(args.batch)]
        cmd += ["--seq", str(args.seq), "--threads", str(args.threads)]
        done = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
        )
        if done.returncode != 0:
            sys.exit(f"{' '.join(extra)} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    static = child(["--static"])
    runs: dict[str, list[dict]] = {c: [] for c in CASES}
    for _ in range(args.rounds):
        for case in CASES:
            runs[case].append(child(["--case", case]))
            print(f"{case}: {runs[case][-1]}", file=sys.stderr)

    mem, ratio = static["memory_mb"], static["memory_vs_fp32"]
    print(f"\nBase-weight memory of the {static['linear_layers']} linear layers (weights + biases)")
    print(f"{'':6} {'MB':>8} {'x fp32':>7}  target")
    targets = {"fp32": "", "nf4": "<= 0.30", "int8": "<= 0.55"}
    for k in ("fp32", "nf4", "int8"):
        print(f"{k:6} {mem[k]:>8} {ratio[k]:>7}  {targets[k]}")
    lora_peak = statistics.median(r["peak_rss_steps_mb"] for r in runs["lora"])
    print(
        f"\nPeak RSS while training ({args.steps} steps, batch {args.batch} x {args.seq} tokens, r=8 q_proj/v_proj)"
    )
    print(
        f"{'case':11} {'steps MB':>9} {'x LoRA':>7} {'process MB':>11} {'s/step':>7} {'loss first->last':>17}"
    )
    rows = []
    for case, results in runs.items():
        row = {
            **results[-1],
            "peak_rss_steps_mb": statistics.median(r["peak_rss_steps_mb"] for r in results),
            "peak_rss_process_mb": statistics.median(r["peak_rss_process_mb"] for r in results),
            "step_s": statistics.median(r["step_s"] for r in results),
            "all_runs": results,
        }
        rows.append(row)
        print(
            f"{case:11} {row['peak_rss_steps_mb']:>9} {row['peak_rss_steps_mb'] / lora_peak:>7.2f} "
            f"{row['peak_rss_process_mb']:>11} {row['step_s']:>7} {row['loss_first']:>8} -> {row['loss_last']}"
        )
    print("\nQuantized layer output vs fp32 (random inputs)")
    print(
        f"{'':6} {'out err mean':>12} {'out err max':>11} {'weight err':>10} {'out/weight max':>14} {'logits err':>10}"
    )
    for k, e in static["errors"].items():
        print(
            f"{k:6} {e['layer_out_rel_err_mean']:>12} {e['layer_out_rel_err_max']:>11} {e['weight_rel_err_mean']:>10} "
            f"{e['out_over_weight_err_max']:>14} {e['logits_rel_err']:>10}"
        )
    settings = {k: getattr(args, k) for k in ("steps", "batch", "seq", "threads", "rounds")}
    with open(args.out, "w") as f:
        json.dump({"settings": settings, "static": static, "training": rows}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
