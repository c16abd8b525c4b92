"""Load test of `deltatune serve`: requests/s and p50/p95 latency with 1, 2 and 8 adapters (and the base alone).

Builds a random model of OPT-125m's shape (or a smaller one with --small) and 8 random LoRA adapters in a temp
folder, starts `deltatune serve` on 127.0.0.1 in a subprocess, and for each adapter count loads exactly that
many adapters (runtime DELETE/POST /v1/adapters), then runs C concurrent clients, each sending N greedy
completions round-robin over the loaded adapters, stopping early at a time cap. Writes a JSON file.

    python benchmarks/serve_load.py --clients 16 --requests 6 --max-tokens 16 --out serve_load.json

Run by hand; the numbers go in the README. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from deltatune import LoraConfig, get_peft_model

N_ADAPTERS = 8


def build(folder: str, small: bool) -> tuple[str, str, list[str]]:
    """A random OPT (125m's shape, or a small one), a word-level tokenizer over its vocab, 8 LoRA adapters."""
    shape = (
        dict(
            hidden_size=256,
            num_hidden_layers=4,
            ffn_dim=1024,
            num_attention_heads=4,
            vocab_size=8192,
            word_embed_proj_dim=256,
        )
        if small
        else {}
    )
    config = OPTConfig(**shape)  # OPTConfig's defaults are OPT-125m's shape
    words = ["<s>", "<pad>", "</s>", "<unk>", *(f"t{i}" for i in range(4, config.vocab_size))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    base = os.path.join(folder, "opt-125m-random" if not small else "opt-small-random")
    torch.manual_seed(0)
    model = OPTForCausalLM(config).eval()
    model.save_pretrained(base)
    fast.save_pretrained(base)
    names = [f"task{i}" for i in range(N_ADAPTERS)]
    torch.manual_seed(1)
    lora = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora), names[0])
    for name in names[1:]:
        peft.add_adapter(name, LoraConfig(task_type="CAUSAL_LM", **lora))
    adapters = os.path.join(folder, "adapters")
    peft.save_pretrained(adapters)  # no adapter named "default": each goes in its own sub-folder
    return base, adapters, words


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(client: httpx.AsyncClient, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"deltatune serve exited with {proc.returncode}")
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError("deltatune serve did not come up in time")


async def set_adapters(client: httpx.AsyncClient, names: list[str]) -> None:
    loaded = set((await client.get("/health")).json()["adapters"])
    for name in loaded - set(names):
        (await client.delete(f"/v1/adapters/{name}")).raise_for_status()
    for name in sorted(set(names) - loaded):
        (await client.post("/v1/adapters", json={"name": name})).raise_for_status()


async def phase(client: httpx.AsyncClient, models_: list[str], words: list[str], args) -> dict:
    """C clients, N requests each (round-robin over `models_`), stopping at the time cap."""
    before = (await client.get("/health")).json()["stats"]
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(words[4:]) for _ in range(args.prompt_words)) for _ in range(64)]
    latencies: list[float] = []
    tokens = 0
    errors = 0
    start = time.monotonic()
    deadline = start + args.time_cap

    async def run_client(c: int) -> None:
        nonlocal tokens, errors
        for i in range(args.requests):
            if time.monotonic() > deadline:
                return
            k = c * args.requests + i
            body = {
                "model": models_[k % len(models_)],
                "prompt": prompts[k % len(prompts)],
                "max_tokens": args.max_tokens,
                "temperature": 0,
            }
            t0 = time.monotonic()
            r = await client.post("/v1/completions", json=body)
            if r.status_code != 200:
                errors += 1
                continue
            latencies.append(time.monotonic() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    await asyncio.gather(*(run_client(c) for c in range(args.clients)))
    wall = time.monotonic() - start
    after = (await client.get("/health")).json()["stats"]
    calls = after["model_calls"] - before["model_calls"]
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {
        "adapters": models_,
        "requests": len(latencies),
        "errors": errors,
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 3),
        "completion_tokens_per_s": round(tokens / wall, 1),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p95_s": round(q[18], 3),
        "model_calls": calls,
        "mean_rows_per_call": round((after["rows"] - before["rows"]) / max(calls, 1), 2),
    }


async def main_async(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="deltatune-serve-load-") as folder:
        t0 = time.monotonic()
        base, adapters, words = build(folder, args.small)
        print(f"built the model and {N_ADAPTERS} adapters in {time.monotonic() - t0:.0f}s", flush=True)
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "deltatune",
            "serve",
            "--base",
            base,
            "--adapters",
            adapters,
            "--base-name",
            "base",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-batch",
            str(args.max_batch),
            "--batch-wait-ms",
            str(args.batch_wait_ms),
            "--log-level",
            "warning",
            "--threads",
            str(args.threads),
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        try:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", timeout=args.time_cap + 120, trust_env=False
            ) as client:
                await wait_ready(client, proc, timeout=180)
                names = [f"task{i}" for i in range(N_ADAPTERS)]
                await phase(
                    client, ["base"], words, argparse.Namespace(**{**vars(args), "requests": 1})
                )  # warm-up
                results = []
                for count in (0, 1, 2, 8):
                    await set_adapters(client, names[:count])
                    row = await phase(client, names[:count] or ["base"], words, args)
                    row["adapter_count"] = count
                    results.append(row)
                    print(
                        f"{count} adapter(s): {row['requests_per_s']:.2f} req/s, p50 {row['latency_p50_s']:.2f}s, "
                        f"p95 {row['latency_p95_s']:.2f}s, {row['mean_rows_per_call']} rows/call",
                        flush=True,
                    )
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return {
        "model": "random OPT, "
        + ("small (hidden 256, 4 layers, vocab 8192)" if args.small else "OPT-125m shape"),
        "lora": "r=8, q_proj+v_proj",
        "clients": args.clients,
        "requests_per_client": args.requests,
        "prompt_words": args.prompt_words,
        "max_tokens": args.max_tokens,
        "max_batch": args.max_batch,
        "batch_wait_ms": args.batch_wait_ms,
        "threads": args.threads,
        "time_cap_s": args.time_cap,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "results": results,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=6, help="requests per client")
    p.add_argument("--prompt-words", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--time-cap", type=float, default=60.0, help="seconds per adapter count")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="server's torch threads (1: OpenMP spinning on shared cores is slow)",
    )
    p.add_argument("--small", action="store_true", help="a smaller model than OPT-125m, for slow machines")
    p.add_argument("--out", default="serve_load.json")
    args = p.parse_args()
    report = asyncio.run(main_async(args))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
