"""What a prompt's prefill costs the continuous server: as a model call of its own, or folded into the running rows'
decoding step (`deltatune.serve.packed`), in ms.

Builds a random OPT-125m-shaped model (transformers' OPTConfig defaults, fp32), fills a running batch of `--rows`
rows (20-token prompts, then 40 decoding steps: 60 columns of cache) and then times, from the same cache state
each time: one decoding step alone; the step followed by a prefill of a P-token prompt in a call of its own (what
the server did before, and does with `--no-fold-prefill`); and one folded call of both. Prints the medians and what
the prompt adds to the step either way, for P in `--prompt-tokens`.

    python benchmarks/folded_cost.py                       # 16 rows, prompts of 8, 20 and 40 tokens (~40 s)

Single-threaded by default (`--threads`, as `serve_load.py` runs the servers); run by hand, the numbers go in the
README.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from transformers import OPTConfig, OPTForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _args import below_one  # noqa: E402

from deltatune.methods.mixed import BASE  # noqa: E402
from deltatune.serve import packed  # noqa: E402
from deltatune.serve.kvcache import RowCache  # noqa: E402


@torch.inference_mode()  # (the cache's buffers are inference tensors, updated in place)
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=16, help="running rows")
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[8, 20, 40])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if why := below_one(args, ("rows", "repeats", "threads")):
        parser.error(why)
    if min(args.prompt_tokens) < 1:
        parser.error(f"--prompt-tokens must be at least 1, got {min(args.prompt_tokens)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = OPTConfig()
    config._attn_implementation = "sdpa"
    model = OPTForCausalLM(config).eval()
    vocab = config.vocab_size

    cache = RowCache()
    for _ in range(args.rows):
        out = model(input_ids=torch.randint(0, vocab, (1, 20)), use_cache=True, logits_to_keep=1)
        cache.join(
            [(layer.keys, layer.values) for layer in out.past_key_values.layers],
            torch.ones(1, 20, dtype=torch.long),
        )
    last = torch.randint(0, vocab, (args.rows,)).tolist()

    def step() -> None:
        mask, positions = cache.step_inputs()
        model(
            input_ids=torch.tensor(last).view(-1, 1),
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache.advance()

    def prefill(ids: list[int]) -> None:
        model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)

    def folded(ids: list[int]) -> None:
        cache.step_inputs()
        packed.run(model, model, {}, cache, last, [packed.Segment(BASE, ids)], torch.device("cpu"), "cache")
        cache.advance()

    for _ in range(40):
        step()
    saved = (
        [k.clone() for k in cache.k],
        [v.clone() for v in cache.v],
        cache.mask.clone(),
        cache.positions.clone(),
        cache.start,
        cache.end,
    )

    def restore() -> None:
        for buf, old in zip(cache.k + cache.v, saved[0] + saved[1]):
            buf.copy_(old)
        cache.mask.copy_(saved[2])
        cache.positions.copy_(saved[3])
        cache.start, cache.end = saved[4], saved[5]

    def timed(fn) -> float:
        restore()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    print(f"{args.rows} running rows, {cache.width} columns of cache, {args.threads} thread(s)")
    for tokens in args.prompt_tokens:
        ids = torch.randint(0, vocab, (tokens,)).tolist()
        alone, apart, together = [], [], []
        for _ in range(args.repeats):  # interleaved, so drifts of the machine hit all three alike
            alone.append(timed(step))
            apart.append(timed(lambda ids=ids: (step(), prefill(ids))))
            together.append(timed(lambda ids=ids: folded(ids)))
        a, b, c = (statistics.median(x) * 1e3 for x in (alone, apart, together))
        print(
            f"prompt of {tokens:3d} tokens: step {a:.1f} ms; step + own prefill {b:.1f} ms; folded {c:.1f} ms"
            f" -> the prompt adds {b - a:.1f} ms on its own, {c - a:.1f} ms folded"
        )


if __name__ == "__main__":
    main()
