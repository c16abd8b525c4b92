"""Load test of `deltatune serve`: static vs continuous batching, in one run, on one random model.

Builds a random OPT (OPT-125m's shape, or a smaller one with --small) and 64 random LoRA adapters (r=8 on q_proj
and v_proj) in a temp folder, starts `deltatune serve` twice on 127.0.0.1 (`--scheduler static` and
`--scheduler continuous`, each with `--max-loaded-adapters 8`), and for each number of clients (16, 64) and
each adapter mix (the base alone, 8 adapters, 64 adapters of which at most 8 are in memory) runs the same
workload against the two servers back to back: C concurrent clients, each sending R streamed greedy completions
whose `max_tokens` is drawn between 8 and 64 (the same draws for both servers). Reports req/s, output tokens/s,
p50/p95 latency and p50/p95 time to first token, and the continuous/static ratios. Writes a JSON file. The phases
share `--budget` seconds (each its share of what is left, at most `--time-cap`), so the default run stays under
about 12 minutes; requests a phase could not start in its share are skipped and reported (done/planned).

    python benchmarks/serve_load.py --out serve_load.json                    # the full run (<= ~12 min)
    python benchmarks/serve_load.py --small --clients 16 --requests 2        # a quick look
    python benchmarks/serve_load.py --clients 16 --mixes base 8 --requests 4 --long-share 0.1 --long-tokens 192
                                    # a long tail of max_tokens: what static batching wastes, continuous doesn't

Run by hand; the numbers go in the README. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
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

N_ADAPTERS = 64
LOADED = 8


def build(folder: str, small: bool) -> tuple[str, str, list[str]]:
    """A random OPT (125m's shape, or a small one), a word-level tokenizer over its vocab, 64 LoRA adapters."""
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
    # No EOS in a random model's greedy output: every request runs to its max_tokens (a controlled workload).
    model.generation_config.eos_token_id = None
    model.save_pretrained(base)
    fast.save_pretrained(base)
    adapters = os.path.join(folder, "adapters")
    lora = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    # 8 distinct random adapters, each copied 8 times under its own name: 64 folders to register.
    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora), "seed0")
    for i in range(1, 8):
        peft.add_adapter(f"seed{i}", LoraConfig(task_type="CAUSAL_LM", **lora))
    seeds = os.path.join(folder, "seeds")
    peft.save_pretrained(seeds)
    for i in range(N_ADAPTERS):
        shutil.copytree(os.path.join(seeds, f"seed{i % 8}"), os.path.join(adapters, f"task{i}"))
    return base, adapters, words


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(base: str, adapters: str, scheduler: str, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "deltatune", "serve", "--base", base, "--adapters", adapters, "--base-name", "base",
        "--host", "127.0.0.1", "--port", str(port), "--scheduler", scheduler, "--max-batch", str(args.max_batch),
        "--batch-wait-ms", str(args.batch_wait_ms), "--max-loaded-adapters", str(LOADED), "--log-level", "warning",
        "--threads", str(args.threads), "--max-tokens-cap", str(max(args.max_tokens[1], args.long_tokens if args.long_share else 0)),
    ]  # fmt: skip
    if scheduler == "continuous" and args.adapter_slice is not None:
        cmd += ["--adapter-slice", str(args.adapter_slice)]
    if scheduler == "continuous" and args.max_prefill_tokens:
        cmd += ["--max-prefill-tokens", str(args.max_prefill_tokens)]
    if scheduler == "continuous" and not args.fold_prefill:
        cmd += ["--no-fold-prefill"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL), f"http://127.0.0.1:{port}"


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


async def one(
    client: httpx.AsyncClient, body: dict, stamps: list[float] | None = None
) -> tuple[float, float, int] | None:
    """(latency, time to first token, completion tokens) of one streamed request; None on an error. The arrival
    time of each text chunk (a token) goes into `stamps`, also for a request cancelled midway."""
    t0 = time.monotonic()
    first = None
    tokens = 0
    stamps = [] if stamps is None else stamps
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return None
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.monotonic())
                if first is None:
                    first = stamps[-1] - t0
    latency = time.monotonic() - t0
    return latency, first if first is not None else latency, tokens


def workload(
    clients: int,
    requests: int,
    names: list[str],
    words: list[str],
    prompt_words: int,
    max_tokens: tuple[int, int] = (8, 64),
    long: tuple[float, int] = (0.0, 0),
) -> list[list[dict]]:
    """Each client's requests (the same for both schedulers): adapters round-robin, max_tokens uniform in
    `max_tokens`, or, with probability `long[0]`, `long[1]` (a long tail).

    The draws (prompts, max_tokens) depend on the number of clients only, not on `names`: the phases with 0, 8 and
    64 adapters send the same requests under other model names, so their tokens/s compare the adapters' cost and
    not the luck of the draw. (They used to be seeded with the number of names too; two draws of 32 requests
    differed by ~10% in the base model's decoding time alone, more than 8 adapters cost.)"""
    rng = random.Random(clients * 1000)
    tail = random.Random(clients * 1000 + 1)  # its own stream: the other draws stay as they were
    out = []
    for c in range(clients):
        mine = []
        for i in range(requests):
            k = c * requests + i
            n = rng.randint(*max_tokens)
            mine.append(
                {
                    "model": names[k % len(names)],
                    "prompt": " ".join(rng.choice(words[4:]) for _ in range(prompt_words)),
                    "max_tokens": long[1] if tail.random() < long[0] else n,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
            )
        out.append(mine)
    return out


async def phase(client: httpx.AsyncClient, plan: list[list[dict]], time_cap: float, sustained: bool) -> dict:
    before = (await client.get("/health")).json()["stats"]
    results: list[tuple[float, float, int]] = []
    errors = 0
    start_t = time.monotonic()
    deadline = start_t + time_cap
    # --sustained: a client that has sent all its requests goes on sending them again (fillers) until every
    # client's have been answered, so that all clients stay active while the phase is measured; the fillers still
    # running then are cancelled, and the tokens of theirs that arrived before count
    finished, all_done = 0, asyncio.Event()
    window_end = start_t
    filler_stamps: list[float] = []

    async def run_client(bodies: list[dict]) -> None:
        nonlocal errors, finished, window_end
        for body in bodies:
            if time.monotonic() > deadline:
                break
            got = await one(client, body)
            if got is None:
                errors += 1
            else:
                results.append(got)
        finished += 1
        if finished == len(plan):
            window_end = time.monotonic()
            all_done.set()
        i = 0
        while sustained and not all_done.is_set():
            stamps: list[float] = []
            task = asyncio.ensure_future(one(client, bodies[i % len(bodies)], stamps))
            stop = asyncio.ensure_future(all_done.wait())
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not task.done():
                task.cancel()  # the client hangs up: the server frees the row at its next step
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await task
            filler_stamps.extend(stamps)
            i += 1

    await asyncio.gather(*(run_client(b) for b in plan))
    wall = time.monotonic() - start_t
    window = window_end - start_t
    extra = sum(1 for t in filler_stamps if t <= window_end)
    if sustained:  # a static batch runs on after its clients hung up: one request more waits until it ended,
        # so that the next phase (the other server, on the same cores) doesn't run beside it
        await one(client, {**plan[0][0], "max_tokens": 1})
    after = (await client.get("/health")).json()["stats"]
    lat = sorted(r[0] for r in results)
    ttft = sorted(r[1] for r in results)
    tokens = sum(r[2] for r in results)

    def pct(xs: list[float], p: float) -> float:
        return round(xs[min(len(xs) - 1, int(p * len(xs)))], 3) if xs else float("nan")

    calls = after["model_calls"] - before["model_calls"]
    return {
        "requests": len(results),
        "errors": errors,
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(results) / wall, 3),
        "output_tokens_per_s": round(tokens / wall, 1),
        # --sustained: every token that arrived while all clients were active, the fillers' included
        "sustained_tokens_per_s": round((tokens + extra) / window, 1) if sustained and window > 0 else None,
        "filler_tokens": extra if sustained else None,
        "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
        "latency_p95_s": pct(lat, 0.95),
        "ttft_p50_s": round(statistics.median(ttft), 3) if ttft else None,
        "ttft_p95_s": pct(ttft, 0.95),
        "model_calls": calls,
        "adapter_loads": after["adapter_loads"] - before["adapter_loads"],
        # seconds the model thread spent attaching adapters, and adapters paused to give a waiting row their slot
        "adapter_load_s": round(
            after.get("adapter_load_seconds", 0) - before.get("adapter_load_seconds", 0), 2
        ),
        "adapter_pauses": after.get("adapter_pauses", 0) - before.get("adapter_pauses", 0),
        # continuous only: the running batch's mean size over its decoding steps (a request's first token
        # comes from its prefill); under 16 at 16 clients when clients with short requests ran out of them
        "rows_per_decode_step": round((tokens - len(results)) / steps, 2)
        if not sustained and (steps := after.get("decode_steps", 0) - before.get("decode_steps", 0))
        else None,
    }


async def main_async(args) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="deltatune-serve-load-") as folder:
        t0 = time.monotonic()
        base, adapters, words = build(folder, args.small)
        print(f"built the model and {N_ADAPTERS} adapters in {time.monotonic() - t0:.0f}s", flush=True)
        servers = {s: start(base, adapters, s, args) for s in ("static", "continuous")}
        try:
            clients = {}
            for name, (proc, url) in servers.items():
                # Idle keep-alive connections expire before the server's 5 s would close them under us.
                limits = httpx.Limits(max_connections=None, keepalive_expiry=1.0)
                clients[name] = httpx.AsyncClient(
                    base_url=url, timeout=args.time_cap + 300, trust_env=False, limits=limits
                )
                await wait_ready(clients[name], proc, timeout=300)
            names = [f"task{i}" for i in range(N_ADAPTERS)]
            for name in servers:  # warm-up
                await phase(
                    clients[name], workload(2, 1, ["base"], words, args.prompt_words), args.time_cap, False
                )
            # The whole run keeps to --budget: each phase may start requests for its share of what is left
            # (and at most --time-cap); requests not started by then are skipped, and counted as planned.
            phases_left = 2 * len(args.clients) * len(args.mixes)
            budget_end = time.monotonic() + args.budget
            for n_clients in args.clients:
                mixes = {"base": ["base"], "8": names[:8], "64": names}
                for key in args.mixes:
                    mix, models_ = ("base" if key == "base" else f"{key} adapters"), mixes[key]
                    plan = workload(
                        n_clients,
                        args.requests,
                        models_,
                        words,
                        args.prompt_words,
                        tuple(args.max_tokens),
                        (args.long_share, args.long_tokens),
                    )
                    pair = {}
                    for name in ("static", "continuous"):
                        cap = min(args.time_cap, max(5.0, (budget_end - time.monotonic()) / phases_left))
                        phases_left -= 1
                        pair[name] = await phase(clients[name], plan, cap, args.sustained)
                        r = pair[name]
                        r["planned"], r["time_cap_s"] = n_clients * args.requests, round(cap, 1)
                        print(
                            f"{n_clients:3d} clients, {mix:11s}, {name:10s}: {r['requests_per_s']:.2f} req/s, "
                            f"{r['output_tokens_per_s']:.1f} tok/s"
                            + (
                                f" ({r['sustained_tokens_per_s']} sustained, {r['filler_tokens']} from fillers)"
                                if args.sustained
                                else ""
                            )
                            + f", latency p50 {r['latency_p50_s']}s "
                            f"p95 {r['latency_p95_s']}s, TTFT p50 {r['ttft_p50_s']}s p95 {r['ttft_p95_s']}s, "
                            f"{r['requests']}/{r['planned']} done (cap {r['time_cap_s']}s), {r['errors']} errors, "
                            f"{r['adapter_loads']} loads ({r['adapter_load_s']}s), {r['adapter_pauses']} pauses"
                            + (
                                f", {r['rows_per_decode_step']} rows per decoding step"
                                if r["rows_per_decode_step"]
                                else ""
                            ),
                            flush=True,
                        )
                    # A static batch decodes every row to its longest max_tokens. With the clients' i-th requests
                    # in one batch, static decodes this many row-steps per output token, continuous one: the
                    # continuous/static tokens/s ratio that equal step costs allow (more only from static's idle
                    # gaps between batches, or from larger batches than static runs).
                    rounds = list(zip(*([b["max_tokens"] for b in bodies] for bodies in plan)))
                    work = sum(len(r) * max(r) for r in rounds) / sum(sum(r) for r in rounds)
                    ratio = pair["continuous"]["output_tokens_per_s"] / pair["static"]["output_tokens_per_s"]
                    steady = [pair[k]["sustained_tokens_per_s"] for k in ("static", "continuous")]
                    print(
                        f"    continuous/static tokens/s {ratio:.2f}x"
                        + (f" ({steady[1] / steady[0]:.2f}x sustained)" if all(steady) else "")
                        + f"; static's row-steps per token {work:.2f}",
                        flush=True,
                    )
                    base_row = next(
                        (r for r in rows if r["clients"] == n_clients and r["adapters"] == "base"), None
                    )
                    if base_row is not None:  # the same requests (see workload): what the adapters cost
                        vs_base = {
                            k: pair[k]["output_tokens_per_s"] / base_row[k]["output_tokens_per_s"]
                            for k in pair
                        }
                        print(
                            f"    {mix} / base tokens/s: continuous {vs_base['continuous']:.2f}x, "
                            f"static {vs_base['static']:.2f}x",
                            flush=True,
                        )
                    rows.append(
                        {
                            "clients": n_clients,
                            "adapters": mix,
                            "static_row_steps_per_token": round(work, 3),
                            **{k: v for k, v in pair.items()},
                        }
                    )
            for c in clients.values():
                await c.aclose()
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)
    return {
        "model": "random OPT, "
        + ("small (hidden 256, 4 layers, vocab 8192)" if args.small else "OPT-125m shape"),
        "lora": "r=8, q_proj+v_proj; 64 registered, at most 8 loaded",
        "clients": args.clients,
        "requests_per_client": args.requests,
        "prompt_words": args.prompt_words,
        "max_tokens": f"uniform in [{args.max_tokens[0]}, {args.max_tokens[1]}]"
        + (f"; {args.long_tokens} with probability {args.long_share}" if args.long_share else ""),
        "max_batch": args.max_batch,
        "batch_wait_ms": args.batch_wait_ms,
        "threads": args.threads,
        "adapter_slice": args.adapter_slice,
        "time_cap_s": args.time_cap,
        "budget_s": args.budget,
        "sustained": args.sustained,
        "max_prefill_tokens": args.max_prefill_tokens,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "results": rows,
    }


def _bad_args(args: argparse.Namespace) -> str | None:
    """The first setting out of range (they ended in a ZeroDivisionError, or ran a meaningless benchmark)."""
    lo, hi = args.max_tokens
    checks = [
        (min(args.clients) >= 1, f"--clients must each be at least 1, got {args.clients}"),
        (args.requests >= 1, f"--requests must be at least 1, got {args.requests}"),
        (args.prompt_words >= 1, f"--prompt-words must be at least 1, got {args.prompt_words}"),
        (1 <= lo <= hi, f"--max-tokens LO HI must have 1 <= LO <= HI, got {lo} {hi}"),
        (0 <= args.long_share <= 1, f"--long-share must be from 0 to 1, got {args.long_share}"),
        (args.long_tokens >= 1, f"--long-tokens must be at least 1, got {args.long_tokens}"),
        (args.max_batch >= 1, f"--max-batch must be at least 1, got {args.max_batch}"),
        (
            0 <= args.batch_wait_ms < float("inf"),
            f"--batch-wait-ms must be a finite number >= 0, got {args.batch_wait_ms}",
        ),
        (
            0 < args.time_cap < float("inf"),
            f"--time-cap must be a finite number of seconds > 0, got {args.time_cap}",
        ),
        (
            0 < args.budget < float("inf"),
            f"--budget must be a finite number of seconds > 0, got {args.budget}",
        ),
        (args.threads >= 1, f"--threads must be at least 1, got {args.threads}"),
        (
            args.adapter_slice is None or args.adapter_slice >= 0,
            f"--adapter-slice must be at least 0, got {args.adapter_slice}",
        ),
        (
            args.max_prefill_tokens >= 0,
            f"--max-prefill-tokens must be at least 0, got {args.max_prefill_tokens}",
        ),
    ]
    return next((why for ok, why in checks if not ok), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    p.add_argument(
        "--mixes",
        nargs="+",
        choices=["base", "8", "64"],
        default=["base", "8", "64"],
        help="adapter mixes to run",
    )
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--prompt-words", type=int, default=16)
    p.add_argument(
        "--max-tokens", type=int, nargs=2, default=[8, 64], metavar=("LO", "HI"), help="uniform range"
    )
    p.add_argument(
        "--long-share",
        type=float,
        default=0.0,
        help="share of requests given --long-tokens instead (a long tail: static batching decodes every row "
        "of a batch to its longest)",
    )
    p.add_argument("--long-tokens", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument(
        "--time-cap",
        type=float,
        default=120.0,
        help="most seconds per phase (requests not started by then are skipped)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=540.0,
        help="seconds for all the phases together (each gets its share of what is left, at most --time-cap); "
        "with the model build and the servers' start the default run stays under ~12 minutes",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="each server's torch threads (1: OpenMP spinning on shared cores is slow)",
    )
    p.add_argument(
        "--adapter-slice",
        type=int,
        default=None,
        help="the continuous server's --adapter-slice (default: the server's own; 0: never pause an adapter)",
    )
    p.add_argument(
        "--sustained",
        action="store_true",
        help="keep every client sending (its requests again) until all clients' requests are answered, and "
        "report the tokens/s of that window: the throughput at C clients, without the tail in which clients "
        "that drew short requests have run out of them",
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=0,
        help="the continuous server's --max-prefill-tokens (0: no cap)",
    )
    p.add_argument(
        "--no-fold-prefill",
        dest="fold_prefill",
        action="store_false",
        help="the continuous server's --no-fold-prefill (prompts prefilled in model calls of their own)",
    )
    p.add_argument("--small", action="store_true", help="a smaller model than OPT-125m, for slow machines")
    p.add_argument("--out", default="serve_load.json")
    args = p.parse_args()
    if why := _bad_args(args):
        p.error(why)
    report = asyncio.run(main_async(args))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
