"""What attaching and evicting one LoRA adapter costs `deltatune serve` (`--max-loaded-adapters`), in ms.

Builds a random OPT-125m-shaped model (transformers' OPTConfig defaults), saves `--adapters` random LoRA adapters
(r=8 on q_proj and v_proj, as benchmarks/serve_load.py does) and reads their configs and files once (the serve
engine reads the configs when it registers the adapters, the files in its reader thread, not in the model thread;
releases without `load_adapter(config=)` ignore it and read the config again). Then it does what the engine's
model thread does when an adapter that isn't in memory is asked for, with at most `--loaded` adapters in memory: `delete_adapter` of the
least recently used one (evict), `load_adapter(directory, adapter_name=..., tensors=...)` and the walk that puts
the new layers in eval mode (attach), then `set_adapter` (a solo step). One round over the adapters warms up;
the next `--cycles` rounds are timed. Prints the median and mean per attach, per detach and per solo
`set_adapter`; `--profile` prints cProfile's top functions of the timed rounds instead of timing them alone.

    python benchmarks/attach_cost.py                 # 16 adapters, 8 loaded, 3 timed rounds (~10 s)
    python benchmarks/attach_cost.py --profile       # where the time goes

Single-threaded (torch.set_num_threads(1)); run by hand, the numbers go in the README.
"""

from __future__ import annotations

import argparse
import atexit
import cProfile
import os
import pstats
import shutil
import statistics
import tempfile
import time

import torch
from transformers import OPTConfig, OPTForCausalLM

from deltatune import LoraConfig, get_peft_model
from deltatune.config import load_config
from deltatune.model import PeftModel, read_adapter_tensors
from deltatune.serve.command import freeze_startup_objects


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=16, help="adapters saved and cycled through")
    p.add_argument(
        "--loaded", type=int, default=8, help="at most this many in memory (--max-loaded-adapters)"
    )
    p.add_argument("--cycles", type=int, default=3, help="timed rounds over the adapters")
    p.add_argument(
        "--profile", action="store_true", help="print cProfile's top functions of the timed rounds"
    )
    p.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="leave the start-up objects to the garbage collector (`deltatune serve` freezes them once started)",
    )
    args = p.parse_args()
    if args.loaded < 2:  # the least recently used adapter is deleted before the next is attached
        p.error(
            f"--loaded must be at least 2 (the only adapter in memory can't be evicted), got {args.loaded}"
        )
    if args.adapters <= args.loaded:
        p.error("--adapters must be more than --loaded, or nothing is ever evicted")
    if args.cycles < 1:
        p.error(f"--cycles must be at least 1, got {args.cycles}")
    torch.set_num_threads(1)

    folder = tempfile.mkdtemp(prefix="attach_cost_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the adapters written for the run
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig()).eval()
    lora = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    names = [f"a{i}" for i in range(args.adapters)]
    peft = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora), names[0])
    for name in names[1:]:
        peft.add_adapter(name, LoraConfig(task_type="CAUSAL_LM", **lora))
    peft.save_pretrained(folder)  # each under folder/<name>
    base = peft.unload().requires_grad_(False).eval()
    dirs = {n: os.path.join(folder, n) for n in names}
    configs = {n: load_config(d) for n, d in dirs.items()}  # read when the server registers the adapters
    tensors = {n: read_adapter_tensors(d) for n, d in dirs.items()}

    peft = PeftModel.from_pretrained(base, dirs[names[0]], adapter_name=names[0], tensors=tensors[names[0]])
    if not args.no_gc_freeze:
        freeze_startup_objects()  # as `deltatune serve` does once its engine is up
    loaded = [names[0]]  # least recently used first
    times: dict[str, list[float]] = {"attach": [], "detach": [], "set_adapter": []}

    def timed(what: str, fn, *a, **kw) -> None:
        start = time.perf_counter()
        fn(*a, **kw)
        times[what].append(time.perf_counter() - start)

    def attach(name: str) -> None:  # the engine's `_load_weights`
        peft.load_adapter(dirs[name], adapter_name=name, config=configs[name], tensors=tensors[name])
        for module in peft.modules():
            if module.training:
                module.train(False)

    def rounds(n: int) -> None:
        for _ in range(n):
            for name in names:
                if name in loaded:
                    continue
                if len(loaded) >= args.loaded:
                    timed("detach", peft.delete_adapter, loaded.pop(0))
                timed("attach", attach, name)
                loaded.append(name)
                timed("set_adapter", peft.set_adapter, name)

    rounds(1)
    for v in times.values():
        v.clear()
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        rounds(args.cycles)
        profile.disable()
        pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
        return
    rounds(args.cycles)
    print(
        f"OPT-125m shape, LoRA r=8 q_proj/v_proj, {args.adapters} adapters, {args.loaded} loaded, torch "
        f"{torch.__version__}, 1 thread, start-up objects {'not ' if args.no_gc_freeze else ''}frozen (gc.freeze)"
    )
    for what, v in times.items():
        print(
            f"{what:12s} median {1000 * statistics.median(v):6.2f} ms   mean {1000 * statistics.fmean(v):6.2f} ms"
            f"   (n={len(v)})"
        )


if __name__ == "__main__":
    main()
