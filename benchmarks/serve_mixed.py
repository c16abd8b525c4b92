"""What 8 adapters cost the continuous server's tokens/s, without HTTP: the engine driven in-process.

`benchmarks/serve_load.py` measures the server over HTTP with a client process on the same 2 cores; its 16-client
phases last ~15 s and move by ±10% between runs, more than the adapters cost. This script builds the same model
and adapters (serve_load's `build`), starts one continuous `Engine` (`max_loaded_adapters` 8) and drives it with C
closed-loop client threads submitting rows directly, on serve_load's draws (the same prompts and `max_tokens` for
both), alternating base-only and 8-adapter rounds so slow drifts of the machine hit both alike. It reports each
round's tokens/s, decoding steps and the time in prefills and decoding steps, and the median ratio.

    python benchmarks/serve_mixed.py [--clients 16] [--requests 2] [--rounds 3] [--small] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _args import below_one, unwritable_out  # noqa: E402
from serve_load import build, workload  # noqa: E402

from deltatune.serve.engine import Engine  # noqa: E402
from deltatune.serve.scheduler import Row  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2, help="requests per client per round")
    parser.add_argument("--rounds", type=int, default=3, help="base-only / 8-adapter round pairs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--no-fold-prefill",
        dest="fold_prefill",
        action="store_false",
        help="prefill new prompts in model calls of their own (the engine's fold_prefill=False)",
    )
    parser.add_argument(
        "--small", action="store_true", help="a small random OPT (a quick check of the script)"
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if why := below_one(args, ("clients", "requests", "rounds", "threads")):
        parser.error(why)
    if args.out and (why := unwritable_out(args.out)):  # not only after the rounds
        parser.error(why)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="deltatune-serve-mixed-") as folder:
        base, adapters, words = build(folder, small=args.small)
        engine = Engine(
            base,
            adapters,
            base_name="base",
            scheduler="continuous",
            max_loaded_adapters=8,
            fold_prefill=args.fold_prefill,
        )
        sched = engine.scheduler
        spent = {"prefill": 0.0, "prefill_chunk": 0.0, "decode": 0.0, "decode_folded": 0.0}
        calls = ("_prefill", "_prefill_chunk", "_decode", "_decode_folded")
        for name in calls:  # time the model calls of each kind
            original = getattr(sched, name)

            def timed(*a, _original=original, _kind=name[1:], **k):
                start = time.perf_counter()
                try:
                    return _original(*a, **k)
                finally:
                    spent[_kind] += time.perf_counter() - start

            setattr(sched, name, timed)
        eight = [f"task{i}" for i in range(8)]
        plan = workload(args.clients, args.requests, eight, words, 16)

        def run(names: list[str]) -> dict:
            for key in spent:
                spent[key] = 0.0
            steps = sched.stats["decode_steps"]
            tokens = [0]

            def client(c: int, bodies: list[dict]) -> None:
                for i, body in enumerate(bodies):
                    done = threading.Event()

                    def sink(event, done=done):
                        if event[0] == "token":
                            tokens[0] += 1
                        elif event[0] in ("done", "error"):
                            done.set()

                    ids = engine.tokenizer(body["prompt"])["input_ids"]
                    adapter = engine.resolve(names[(c * args.requests + i) % len(names)])
                    sched.submit(
                        [Row("generate", adapter, ids, body["max_tokens"], 0.0, 1.0, None, sink=sink)]
                    )
                    done.wait()

            start = time.perf_counter()
            threads = [threading.Thread(target=client, args=(c, b)) for c, b in enumerate(plan)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            return {
                "tokens_per_s": round(tokens[0] / wall, 1),
                "tokens": tokens[0],
                "seconds": round(wall, 2),
                "decode_steps": sched.stats["decode_steps"] - steps,
                "prefill_s": round(spent["prefill"] + spent["prefill_chunk"], 2),
                "decode_s": round(spent["decode"], 2),
                # decoding steps that prompts rode along in (prefill and decoding in one call)
                "folded_s": round(spent["decode_folded"], 2),
            }

        run(eight)  # warm-up; loads the 8 adapters
        rounds = []
        for r in range(args.rounds):
            pair = {"base": run(["base"]), "8 adapters": run(eight)}
            pair["ratio"] = round(pair["8 adapters"]["tokens_per_s"] / pair["base"]["tokens_per_s"], 3)
            rounds.append(pair)
            print(f"round {r + 1}: {json.dumps(pair)}", flush=True)
        engine.close()
    ratios = [p["ratio"] for p in rounds]
    print(
        f"8 adapters / base tokens/s: median {statistics.median(ratios):.3f} (range {min(ratios)}-{max(ratios)})"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"clients": args.clients, "requests": args.requests, "rounds": rounds}, f, indent=1)


if __name__ == "__main__":
    main()
