"""Training on real corpora: memory vs number of rows, the tokenization cache, and padded vs grouped vs packed
throughput on skewed lengths.

    python benchmarks/data_scale.py                      # 1e4, 1e5, 1e6 rows; throughput on 600 rows
    python benchmarks/data_scale.py --rows 0             # throughput only (padded / grouped / packed)
    python benchmarks/data_scale.py --rows 10000,100000 --throughput-rows 0                    # memory only

Everything is generated here (a tiny Llama-shaped model with a word-level tokenizer, JSONL of random words),
so nothing is downloaded. Every training run is `deltatune train` in its own process (`python -m deltatune
train ...`), its peak RSS and times taken from its `summary.json` (`peak_mem_mb`, `data_load_s`,
`tokens_per_s`) and `metrics.jsonl`.

1. Memory: `deltatune train` for a few steps on N generated rows (no eval data: the validation split, 1% of
   them, is held out and evaluated on); the peak RSS of the training process, first (tokenizing) and second
   (cached) run, and the data loading time of each.
2. Throughput: one corpus whose lengths are log-normal between 16 and `--max-len` (default 1,024) tokens
   (median ~100), on a Llama-shaped model of hidden size 256 and 4 layers by default, one epoch each with
   padded batches, `group_by_length` and `packing` (rows of `--max-len` tokens, as many rows per batch as
   hold about the same number of tokens as a padded batch); real (non-pad) tokens/s and the eval loss on
   held-out rows after the epoch (same data, same tokens: the loss should match within noise).
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # python -P / PYTHONSAFEPATH leave it out
from _args import below_one, comma_ints, unwritable_folder, unwritable_out  # noqa: E402

VOCAB_WORDS = 2000


def make_model(folder: str, hidden: int = 64, layers: int = 2, max_len: int = 1024) -> str:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<eos>"] + [f"w{i}" for i in range(VOCAB_WORDS)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(words),
        max_position_embeddings=max_len + 8,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_rows(path: str, n: int, lengths, seed: int = 0) -> str:
    """JSONL of `n` rows of random words; a row's word count is drawn by `lengths(rng)`. Words follow a
    simple pattern (each word is likely the previous plus one), so there is something to learn."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            k, w = lengths(rng), rng.randrange(VOCAB_WORDS)
            words = []
            for _ in range(k):
                w = (w + 1) % VOCAB_WORDS if rng.random() < 0.7 else rng.randrange(VOCAB_WORDS)
                words.append(f"w{w}")
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return path


def train(work: str, name: str, overrides: dict, cache: str) -> dict:
    out = os.path.join(work, "runs", name)
    args = [f"{k}={v}" for k, v in overrides.items()]
    env = os.environ | {"DELTATUNE_DATA_CACHE": cache, "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "deltatune",
            "train",
            "--overwrite",
            f"output_dir={out}",
            "progress=false",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        summary["metrics"] = [json.loads(line) for line in f if line.strip()]
    summary["wall_s"] = wall
    return summary


def memory(work: str, model: str, sizes: list[int], steps: int) -> list[dict]:
    rows = []
    for n in sizes:
        data = write_rows(os.path.join(work, f"rows-{n}.jsonl"), n, lambda rng: rng.randrange(8, 33), seed=n)
        cache = os.path.join(work, f"cache-{n}")
        common = {
            "model": model,
            "task": "causal-lm",
            "data": data,
            "max_steps": steps,
            "batch_size": 8,
            "max_length": 64,
            "save_every": 0,
            "eval_at_start": "false",
            "log_every": 1,
            # no eval_data: the validation split is carved from all N rows (two index views over the memory
            # map) and the run ends evaluating on it; 1% keeps that evaluation short at 10^6 rows
            "val_fraction": 0.01,
        }
        first = train(work, f"mem-{n}-first", common, cache)
        second = train(work, f"mem-{n}-second", common, cache)
        row = {
            "rows": n,
            "file_mb": os.path.getsize(data) / 2**20,
            "peak_rss_first_mb": first["peak_mem_mb"],
            "peak_rss_cached_mb": second["peak_mem_mb"],
            "data_load_first_s": first["data_load_s"],
            "data_load_cached_s": second["data_load_s"],
            "wall_first_s": first["wall_s"],
            "wall_cached_s": second["wall_s"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def throughput(
    work: str, model: str, n: int, max_len: int, batch: int, method: str, lr: float, seed: int = 0
) -> list[dict]:
    def lognormal(rng):  # word counts (one token each, plus EOS) between 16 and max_len - 1
        return int(min(max_len - 1, max(16, rng.lognormvariate(math.log(96), 0.9))))

    data = write_rows(os.path.join(work, "skewed.jsonl"), n, lognormal, seed=1)
    held = write_rows(os.path.join(work, "skewed-eval.jsonl"), 64, lognormal, seed=2)
    with open(data) as f:
        mean = sum(len(json.loads(line)["text"].split()) + 1 for line in f) / n
    rows_per_batch = max(1, round(batch * mean / max_len))
    common = {
        "model": model,
        "task": "causal-lm",
        "data": data,
        "eval_data": held,
        "epochs": 1,
        "max_length": max_len,
        "batch_size": batch,
        "save_every": 0,
        "eval_at_start": "false",
        "log_every": 5,
        "lr": lr,
        "method": method,
        "seed": seed,
    }
    modes = {
        "padded": {},
        "group_by_length": {"group_by_length": "true"},
        "packed": {"packing": "true", "batch_size": rows_per_batch},
    }
    cache = os.path.join(work, "cache-skewed")
    train(work, "warm-cache", common | {"max_steps": 1}, cache)  # tokenize once: every mode reads the cache
    results = []
    for mode, extra in modes.items():
        s = train(work, f"tp-{mode}-s{seed}", common | extra, cache)
        row = {
            "mode": mode,
            "seed": seed,
            "batch_size": extra.get("batch_size", batch),
            "steps": s["steps"],
            "real_tokens_per_s": s["tokens_per_s"],
            "eval_loss": s["eval_loss"],
            "train_loss": s["train_loss"],
            "runtime_s": s["runtime_s"],
            "packed_attention": s.get("packed_attention"),  # packed: how examples were kept apart
            "curve": [(m["tokens"], round(m["train_loss"], 4)) for m in s["metrics"] if "train_loss" in m],
        }
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    return results


def _row_counts(text: str) -> list[int] | None:
    """`--rows 1e4,100000` -> [10000, 100000] (0s dropped: `--rows 0` skips the memory test); None if a count
    isn't a finite number >= 0."""
    try:
        counts = [float(x) for x in text.split(",") if x]
    except ValueError:
        return None
    if not all(0 <= n < math.inf for n in counts):
        return None
    return [int(n) for n in counts if int(n) > 0]


def _bad_args(args: argparse.Namespace) -> str | None:
    """The first other setting out of range. Each ended in a traceback (`--max-len 0`: a ZeroDivisionError) or
    a failed training run, the throughput ones only after the memory runs, and `--out` after everything."""
    from deltatune.methods import registry

    if why := below_one(args, ("steps", "batch", "layers")):
        return why
    if args.throughput_rows < 0:
        return f"--throughput-rows must be 0 (skip) or more, got {args.throughput_rows}"
    if args.max_len < 17:
        return (
            f"--max-len must be at least 17 (the examples are 16 to --max-len - 1 words), got {args.max_len}"
        )
    if args.hidden < 8 or args.hidden % 8:
        return f"--hidden must be a positive multiple of 8 (4 attention heads of an even size), got {args.hidden}"
    if args.method not in registry.names():
        return f"--method: unknown {args.method!r}; choose from {', '.join(registry.names())}"
    if not 0 < args.lr <= 10:
        return f"--lr must be a positive number, at most 10 (as `deltatune train` takes), got {args.lr}"
    if comma_ints(args.seeds) is None:
        return f"--seeds must be comma-separated whole numbers, got {args.seeds!r}"
    if args.work and (why := unwritable_folder(args.work, "--work")):
        return why
    return unwritable_out(args.out) if args.out else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rows", default="10000,100000,1000000", help="row counts of the memory test (0: skip)"
    )
    parser.add_argument("--steps", type=int, default=3, help="training steps of each memory run")
    parser.add_argument(
        "--throughput-rows", type=int, default=600, help="rows of the skewed corpus (0: skip)"
    )
    parser.add_argument("--max-len", type=int, default=1024, help="longest example / packed row, in tokens")
    parser.add_argument("--batch", type=int, default=8, help="examples per padded batch")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the generated model")
    parser.add_argument("--layers", type=int, default=4, help="layers of the generated model")
    parser.add_argument("--method", default="full", help="method of the throughput runs")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate of the throughput runs")
    parser.add_argument(
        "--seeds",
        default="0",
        help="comma-separated seeds of the throughput runs (data order; the loss spread over seeds is the noise)",
    )
    parser.add_argument("--out", default=None, help="also write the results here (JSON)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    sizes = _row_counts(args.rows)
    if sizes is None:
        parser.error(f"--rows must be comma-separated row counts, each 0 (skip) or more, got {args.rows!r}")
    if why := _bad_args(args):
        parser.error(why)
    work = args.work
    if work is None:  # a scratch folder of our own (models, corpora, caches, runs: removed at exit)
        work = tempfile.mkdtemp(prefix="deltatune-data-scale-")
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    model = make_model(
        os.path.join(work, "model"), hidden=args.hidden, layers=args.layers, max_len=args.max_len
    )
    results = {"command": " ".join(sys.argv), "cpus": os.cpu_count()}
    if sizes:
        results["memory"] = memory(work, model, sizes, args.steps)
        base = results["memory"][0]
        for row in results["memory"]:
            print(
                f"{row['rows']:>9,} rows ({row['file_mb']:.0f} MB): peak RSS {row['peak_rss_first_mb']:.0f} MB first, "
                f"{row['peak_rss_cached_mb']:.0f} MB cached (+{row['peak_rss_first_mb'] - base['peak_rss_first_mb']:.0f} / "
                f"+{row['peak_rss_cached_mb'] - base['peak_rss_cached_mb']:.0f} MB vs {base['rows']:,}); data "
                f"{row['data_load_first_s']:.2f} s -> {row['data_load_cached_s']:.2f} s cached "
                f"({100 * row['data_load_cached_s'] / row['data_load_first_s']:.1f}%); whole run "
                f"{row['wall_first_s']:.1f} s -> {row['wall_cached_s']:.1f} s"
            )
    if args.throughput_rows:
        results["throughput"] = []
        for seed in comma_ints(args.seeds):
            rows = throughput(
                work, model, args.throughput_rows, args.max_len, args.batch, args.method, args.lr, seed
            )
            results["throughput"] += rows
            padded = rows[0]["real_tokens_per_s"]
            for row in rows:
                print(
                    f"{row['mode']:>16} (seed {seed}): {row['real_tokens_per_s']:8.0f} real tokens/s "
                    f"({row['real_tokens_per_s'] / padded:.2f}x padded), {row['steps']} steps of "
                    f"{row['batch_size']}, eval loss {row['eval_loss']:.4f}"
                    + (f", attention: {row['packed_attention']}" if row.get("packed_attention") else "")
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
