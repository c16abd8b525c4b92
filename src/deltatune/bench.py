"""`deltatune bench`: what a training step and a forward pass cost, against each method's bound and against PEFT.

A random-init model of a real architecture's shape (no download): `--arch llama` (SwiGLU MLP, RMSNorm, rotary
embeddings, grouped-query attention; ~125M parameters), `opt`, `gpt2` or `bert` (sequence classification);
batch 4 x seq 128, AdamW.

Step time: every case in one process, taking steps in turn (after a warm-up step each), so that all cases see
the same machine noise; ratios (to the case's bound, to PEFT's equivalent) are taken within each round, and
the median and the range over rounds reported. Peak memory: each case in its own process, measured from the
end of its set-up (the peak of the training steps, with the model in memory). These machines are noisy: an
absolute time means little, and processes run minutes apart differ by several percent.

**The bound** of a case is the frozen base's forward plus the backward that any method of that placement
must do: from the loss down to the outputs of the lowest trained layers (for top-layers, the input of the
lowest trained block; for full fine-tuning, the embeddings' outputs), with no weight gradient and nothing
below it. It runs the case's own base (its dtype, its quantization) and the same loss code as ours, and
makes autograd compute exactly the gradients a method needs by marking the trained layers' outputs: an
identity that joins them to the graph and passes their gradient on (through the frozen weights below them,
down to the lowest mark).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

from deltatune.bench_options import (  # noqa: F401  (re-exported: bench.ARCHS, bench.CASES, ...)
    ARCHS,
    CASES,
    DEFAULT_CASES,
    LATENCY_CASES,
    LORA,
    PEFT_PEER,
    TOP_LAYERS,
    VIRTUAL_TOKENS,
    Case,
    build_parser,
    skip_reason,
)
from deltatune.checkpoint import unwritable


def _max_positions(arch: str) -> int:
    """The longest sequence `build_model(arch, ...)` takes (BERT: its config's default)."""
    return {"llama": 2048, "opt": 2048, "gpt2": 1024}.get(arch, 512)


def build_model(arch: str, size: str, seed: int = 0) -> nn.Module:
    """A model of `arch`'s shape at `size`, random init."""
    import transformers as tf

    torch.manual_seed(seed)
    shape = ARCHS[arch]["sizes"][size]
    if arch == "llama":
        config = tf.LlamaConfig(
            max_position_embeddings=_max_positions("llama"), tie_word_embeddings=False, **shape
        )
        return tf.LlamaForCausalLM(config)
    if arch == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(max_position_embeddings=_max_positions("opt"), **shape))
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_positions=_max_positions("gpt2"), **shape))
    return tf.BertForSequenceClassification(tf.BertConfig(num_labels=2, **shape))


# ---- the cases --------------------------------------------------------------------------------------------


def _shared(model: nn.Module) -> nn.Module:
    """A copy of the modules that shares the model's parameter and buffer tensors (no weight memory)."""
    return copy.deepcopy(model, memo={id(t): t for t in (*model.parameters(), *model.buffers())})


def _lora_targets(arch: str, case: Case) -> list[str] | str:
    return "all-linear" if case.targets == "all" else ARCHS[arch]["qv"]


def _ours_config(arch: str, case: Case):
    """Our config of a case: the registry's config class of the method the case names (`kind`), with the bench's
    settings; (IA)^3, VeRA, OFT and full fine-tuning at their defaults (for the first three, PEFT's)."""
    from deltatune.methods import registry

    task = {"task_type": "SEQ_CLS"} if ARCHS[arch]["task"] == "cls" else {"task_type": "CAUSAL_LM"}
    config = registry.get(case.kind).config
    if case.kind == "lora":
        return config(**LORA, target_modules=_lora_targets(arch, case), use_dora=case.dora, **task)
    settings = {
        "houlsby": {"style": "houlsby"},
        "pfeiffer": {"style": "pfeiffer"},
        "top-layers": {"num_layers": TOP_LAYERS},
        "prompt-tuning": {"num_virtual_tokens": VIRTUAL_TOKENS},
        "prefix-tuning": {"num_virtual_tokens": VIRTUAL_TOKENS},
    }
    return config(**settings.get(case.kind, {}), **task)


def _bnb_4bit(model: nn.Module) -> nn.Module:
    """Replace the linear layers (not the head) by bitsandbytes' `Linear4bit` (NF4, double quantization,
    block 64, fp32 compute), in place, one at a time: what `BitsAndBytesConfig(load_in_4bit=True)` builds."""
    import bitsandbytes as bnb

    from deltatune import inject

    heads = inject.output_head_names(model)
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(n == h or n.startswith(f"{h}.") for h in heads)
    ]
    for name in names:
        old = inject.get_module(model, name)
        new = bnb.nn.Linear4bit(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            compute_dtype=old.weight.dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            old.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True, blocksize=64
        )._quantize(old.weight.device)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data, requires_grad=False)
        inject.replace_module(model, name, new)
        del old
    return model


class Bases:
    """The base models the cases are built on, made once: the float base and its quantized versions. Cases with
    a frozen base share its weight tensors; full fine-tuning and top-layers train their own copy. With
    `own=True` (one case per process) the case takes the base itself, quantized in place if need be."""

    def __init__(self, arch: str, size: str, device: str, own: bool = False):
        self.arch, self.size, self.device, self.own = arch, size, device, own
        self.float = build_model(arch, size).to(device)
        self._quantized: dict[str, nn.Module] = {}

    def get(self, quantize: str | None = None, peer: str = "ours", trains_base: bool = False) -> nn.Module:
        if quantize is None:
            if self.own:
                return self.float
            return copy.deepcopy(self.float) if trains_base else _shared(self.float)
        key = f"{peer}-{quantize}"
        if key not in self._quantized:
            from deltatune.methods.quant import quantize_model

            source = self.float if self.own else copy.deepcopy(self.float)
            self._quantized[key] = _bnb_4bit(source) if peer == "peft" else quantize_model(source, quantize)
        return self._quantized[key] if self.own else _shared(self._quantized[key])


def make_method(bases: Bases, case: Case) -> nn.Module:
    """The model of one case, ready to train."""
    arch = bases.arch
    trains_base = case.kind in ("full", "top-layers")
    base = bases.get(case.quantize, case.peer, trains_base)
    if case.peer == "peft":
        import peft

        task = "SEQ_CLS" if ARCHS[arch]["task"] == "cls" else "CAUSAL_LM"
        if case.kind in ("ia3", "vera", "oft"):
            config = {"ia3": peft.IA3Config, "vera": peft.VeraConfig, "oft": peft.OFTConfig}[case.kind]
            return peft.get_peft_model(base, config(task_type=task))
        if case.kind in ("prompt-tuning", "prefix-tuning"):
            config = peft.PromptTuningConfig if case.kind == "prompt-tuning" else peft.PrefixTuningConfig
            return peft.get_peft_model(base, config(task_type=task, num_virtual_tokens=VIRTUAL_TOKENS))
        return peft.get_peft_model(
            base,
            peft.LoraConfig(
                **LORA, target_modules=_lora_targets(arch, case), use_dora=case.dora, task_type=task
            ),
        )
    from deltatune import get_peft_model

    return get_peft_model(base, _ours_config(arch, case))


class _NeedsGrad(torch.autograd.Function):
    """Identity that marks a tensor whose gradient a method needs: it makes the tensor part of the graph (through
    `anchor`, which requires grad), so autograd computes its gradient and everything above it, and passes that
    gradient on unchanged to where the tensor came from. Below a marked layer the gradient goes on through the
    frozen weights (`dX = dY W`: what a method needs for the trained layers further down) and stops where
    nothing was marked below (inputs that don't require grad). An earlier version dropped it at the mark, so a
    bound with every linear layer marked skipped the backward through them all and came out cheaper than a
    bound with two marks per block."""

    @staticmethod
    def forward(ctx, x, anchor):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(())


def make_bound(bases: Bases, bound: str) -> tuple[nn.Module, torch.Tensor]:
    """The frozen base of a bound, with its marks: (model, the anchor whose gradient the marks feed)."""
    parts = bound.split("-")[1:]
    placement, quantize = parts[0], (parts[1] if len(parts) > 1 else None)
    base = bases.get(quantize)
    anchor = torch.zeros((), requires_grad=True, device=bases.device)

    def mark_output(module, args, output):
        return _NeedsGrad.apply(output, anchor)

    def mark_input(module, args, kwargs):
        if args:
            return (_NeedsGrad.apply(args[0], anchor), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _NeedsGrad.apply(kwargs["hidden_states"], anchor)}

    if placement in ("qv", "all", "houlsby", "pfeiffer", "ia3", "oft"):
        # the layers the method wraps, found the way the method finds them
        case = {"qv": Case("lora"), "all": Case("lora", targets="all")}.get(placement, Case(placement))
        from deltatune import get_peft_model

        wrapped = get_peft_model(_shared(base), _ours_config(bases.arch, case))
        wraps = {
            "lora": "lora_A",
            "houlsby": "adapter_down",
            "pfeiffer": "adapter_down",
            "ia3": "ia3_l",
            "oft": "oft_R",
        }
        layers_ = [
            (n, m)
            for n, m in wrapped.get_base_model().named_modules()
            if getattr(m, "is_delta_layer", False) and hasattr(m, wraps[case.kind])
        ]
        # What the method's gradient needs at each layer it wraps: the gradient of the layer's output (LoRA,
        # VeRA, bottleneck adapters, (IA)^3 rescaling outputs), or of its input (OFT rotates the input, (IA)^3
        # rescales a feed-forward layer's input: both need `dX = dY W` through that layer, even the lowest).
        inputs = {n for n, m in layers_ if case.kind == "oft" or case.kind == "ia3" and m.feedforward}
        del wrapped
        for name, _ in layers_:
            if name in inputs:
                base.get_submodule(name).register_forward_pre_hook(mark_input, with_kwargs=True)
            else:
                base.get_submodule(name).register_forward_hook(mark_output)
    elif placement == "top2":
        from deltatune import TopLayersConfig
        from deltatune.methods import layers

        lowest = layers.trained_blocks(base, TopLayersConfig(num_layers=TOP_LAYERS))[0]
        base.get_submodule(lowest).register_forward_pre_hook(mark_input, with_kwargs=True)
    elif placement in ("prompt", "prefix"):
        # Prompt learning trains extra *inputs* (virtual tokens in front of the embeddings, or keys/values in
        # front of every layer's): its bound is the base run on that same longer input, with the gradient of
        # those inputs computed (through every layer, down to the lowest that reads them) and nothing else.
        # So the bound is the method's own model with the trained tensor frozen and its encoder's output
        # marked: the same forward and backward, without the parameter's gradient, or the optimizer's step.
        from deltatune import get_peft_model

        kind = {"prompt": "prompt-tuning", "prefix": "prefix-tuning"}[placement]
        wrapped = get_peft_model(base, _ours_config(bases.arch, Case(kind)))
        for p in wrapped.parameters():
            p.requires_grad_(False)
        for module in wrapped.modules():
            for encoder in getattr(module, "prompt_encoder", {}).values():
                encoder.register_forward_hook(mark_output)
        wrapped.train()
        return wrapped, anchor
    elif placement == "full":
        for module in base.modules():
            if isinstance(module, nn.Embedding):
                module.register_forward_hook(mark_output)
    else:
        raise ValueError(f"unknown bound {bound!r}")
    base.requires_grad_(False)
    return base, anchor


def _ids(arch: str, size: str, batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    vocab = ARCHS[arch]["sizes"][size]["vocab_size"]
    return torch.randint(2, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def make_step(bases: Bases, name: str, batch: int, seq: int, amp: str = "none"):
    """A training step function for case (or bound) `name`, its trainable parameter count, and its loss code."""
    from deltatune.losses import causal_lm_loss
    from deltatune.train.loop import fused_kwargs

    arch, device = bases.arch, bases.device
    is_bound = name.startswith("bound-")
    if is_bound:
        model, anchor = make_bound(bases, name)
        case = None
    else:
        case = CASES[name]
        model, anchor = make_method(bases, case), None
    model.train()
    causal = ARCHS[arch]["task"] == "causal"
    # ours train with deltatune's default causal-LM loss (fused, chunked head + cross-entropy), and so does
    # every bound; PEFT's rows use the model's own loss, as PEFT's users run it
    chunked = causal and (case is None or case.peer == "ours")
    params = [p for p in model.parameters() if p.requires_grad]
    # the trainer's optimizer (fused AdamW where torch has it), the same for every case and PEFT's rows
    optimizer = torch.optim.AdamW(params, lr=1e-5, **fused_kwargs(params)) if params else None
    ids = _ids(arch, bases.size, batch, seq).to(device)
    labels = (
        ids
        if causal
        else torch.randint(0, 2, (batch,), generator=torch.Generator().manual_seed(2)).to(device)
    )
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
    scaler = torch.amp.GradScaler(device) if amp == "fp16" else None

    def step() -> float:
        ctx = torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            loss = (
                causal_lm_loss(model, labels, input_ids=ids)
                if chunked
                else model(input_ids=ids, labels=labels).loss
            )
        (scaler.scale(loss) if scaler else loss).backward()
        if optimizer is not None:
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if anchor is not None:
            anchor.grad = None
        return loss.item()

    return step, sum(p.numel() for p in params), "chunked" if chunked else "standard"


# ---- measuring ---------------------------------------------------------------------------------------------


def _trim() -> None:
    """Give freed memory back to the OS (glibc), so that a peak measured from here counts what is alive."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak(device: str) -> bool:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True
    try:  # Linux: writing 5 to clear_refs resets the process's peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    from deltatune.train.loop import peak_rss_mb

    return peak_rss_mb()


def _timed(step, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_train_memory(
    case: str, arch: str, size: str, steps: int, device: str, batch: int, seq: int, amp: str = "none"
) -> dict:
    """Peak memory of `steps` training steps of one case (run this in its own process), from the end of the
    set-up: what training holds with the model in memory (building a random model and quantizing it has its own,
    earlier peak, reported as `setup_peak_mb`)."""
    bases = Bases(arch, size, device, own=True)
    step, trainable, loss = make_step(bases, case, batch, seq, amp)
    del bases
    _trim()
    setup_peak = _peak_mb(device)
    reset = _reset_peak(device)
    times = [_timed(step, device) for _ in range(steps)]
    return {
        "case": case,
        "loss": loss,
        "peak_mb": _peak_mb(device),
        "peak_from": "after set-up" if reset else "process start",
        "setup_peak_mb": setup_peak,
        "trainable_params": trainable,
        "alone_step_s": statistics.median(times),
    }


def run_train_timing(
    cases: list[str], arch: str, size: str, rounds: int, device: str, batch: int, seq: int, amp: str = "none"
) -> dict:
    """Step times of every case (bounds included), interleaved step by step in this one process, so that all of
    them see the same machine noise."""
    bases = Bases(arch, size, device)
    made = {case: make_step(bases, case, batch, seq, amp) for case in cases}
    steps, losses = {c: m[0] for c, m in made.items()}, {c: m[2] for c, m in made.items()}
    bounds = [c for c in cases if c.startswith("bound-")]
    if bounds:  # the first bound again, as its own model, last in each round: the noise of a paired ratio
        steps[bounds[0] + AGAIN] = make_step(bases, bounds[0], batch, seq, amp)[0]
    cases = list(steps)
    for step in steps.values():  # warm-up (on CUDA also the GEMM heuristics' and the caching allocator's)
        for _ in range(CUDA_WARMUP if device == "cuda" else 1):
            step()
    # (sized from one more timed step of each case on CUDA only: on CPU a sample is one step)
    reps = (
        steps_per_sample(device, min(_timed(step, device) for step in steps.values()))
        if device == "cuda"
        else 1
    )
    times: dict[str, list[float]] = {c: [] for c in cases}
    for r in range(rounds):
        for case, step in steps.items():
            times[case].append(_timed(lambda step=step: [step() for _ in range(reps)], device) / reps)
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return {"times": times, "steps_per_sample": reps, "loss": losses}


CUDA_WARMUP = 3
CUDA_SAMPLE_S = 0.25


def steps_per_sample(device: str, step_s: float) -> int:
    """How many steps one timing sample runs: one on CPU (a step of a 125M model is ~1 s, and a paired ratio
    wants the cases' steps interleaved one by one); on CUDA as many as take `CUDA_SAMPLE_S`, since a single
    step of tens of ms is timed with the jitter of launching its kernels and of the GPU's clock (one step per
    sample gave a noise range of 0.75-1.30 on an H200)."""
    if device != "cuda" or step_s <= 0:
        return 1
    return max(1, min(50, round(CUDA_SAMPLE_S / step_s)))


AGAIN = " (again)"


def _noise(times: dict[str, list[float]]) -> dict | None:
    """The paired ratio of one bound timed twice in each round (as two models): what the ratios' noise is.
    Removes the second timing from `times`."""
    again = next((c for c in times if c.endswith(AGAIN)), None)
    if again is None:
        return None
    second, first = times.pop(again), times[again[: -len(AGAIN)]]
    ratios = [a / b for a, b in zip(second, first)]
    return {
        "case": again[: -len(AGAIN)],
        "ratio": statistics.median(ratios),
        "range": [min(ratios), max(ratios)],
    }


def with_bounds(cases: list[str]) -> list[str]:
    """The cases and, first, the bound of each."""
    bounds = list(dict.fromkeys(CASES[c].bound for c in cases))
    return [*bounds, *cases]


# ---- forward latency, all variants in one process, measured round-robin ---------------------------------


def run_latency(
    arch: str, size: str, rounds: int, device: str, shapes: list[tuple[int, int]], with_peft: bool
) -> list[dict]:
    from deltatune import BottleneckConfig, LoraConfig, get_peft_model

    base = build_model(arch, size).to(device).eval()
    names = [f"a{i}" for i in range(8)]
    lora = dict(**LORA, target_modules=ARCHS[arch]["qv"], init_lora_weights=False)

    def many(model):
        model = get_peft_model(model, LoraConfig(**lora), adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, LoraConfig(**lora))
        return model.eval()

    ours = many(_shared(base))
    merged = get_peft_model(copy.deepcopy(base), LoraConfig(**lora)).merge_and_unload().eval()
    dora = get_peft_model(_shared(base), LoraConfig(**lora, use_dora=True)).eval()
    variants = {
        "base": lambda x: base(input_ids=x),
        "lora": lambda x: ours(input_ids=x),
        "lora-merged": lambda x: merged(input_ids=x),
        "dora": lambda x: dora(input_ids=x),  # unmerged
        "mixed8": lambda x: ours(input_ids=x, adapter_names=[names[i % 8] for i in range(x.shape[0])]),
    }
    for style in ("houlsby", "pfeiffer"):
        wrapped = get_peft_model(_shared(base), BottleneckConfig(style=style, init="bert")).eval()
        variants[style] = lambda x, m=wrapped: m(input_ids=x)
    if with_peft:
        import peft

        theirs = peft.get_peft_model(_shared(base), peft.LoraConfig(**lora), adapter_name=names[0])
        for name in names[1:]:
            theirs.add_adapter(name, peft.LoraConfig(**lora))
        theirs.eval()
        variants["peft"] = lambda x: theirs(input_ids=x)
        variants["peft-mixed8"] = lambda x: theirs(
            input_ids=x, adapter_names=[names[i % 8] for i in range(x.shape[0])]
        )
        their_dora = peft.get_peft_model(_shared(base), peft.LoraConfig(**lora, use_dora=True)).eval()
        variants["peft-dora"] = lambda x: their_dora(input_ids=x)
    results = []
    with torch.no_grad():
        for batch, seq in shapes:
            x = _ids(arch, size, batch, seq).to(device)
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
            for name, ts in times.items():
                if ts:
                    ratio = statistics.median(a / b for a, b in zip(ts, times["base"]))
                    results.append(
                        {
                            "case": name,
                            "batch": batch,
                            "seq": seq,
                            "ms": statistics.median(ts) * 1000,
                            "vs_base": ratio,
                        }
                    )
    return results


# ---- the parent: run cases in subprocesses, print the tables ---------------------------------------------


def cpu_capability() -> dict:
    """What the CPU offers for matrix math (from /proc/cpuinfo) and what torch dispatches to."""
    flags: set[str] = set()
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "?")()
    return {
        "model": model,
        "flags": [w for w in wanted if w in flags],
        "torch_capability": capability,
        "cores": os.cpu_count(),
    }


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


def _ratios(times: dict[str, list[float]], case: str, ref: str | None) -> list[float] | None:
    if ref is None or ref not in times or case not in times:
        return None
    return [a / b for a, b in zip(times[case], times[ref])]


def _train_rows(timing: dict, memory: list[dict]) -> list[dict]:
    """One row per case: median step time, paired ratios to its bound and to PEFT (median and range over rounds),
    peak memory and its ratio to PEFT's."""
    times = timing.get("times", {})
    mem = {m["case"]: m for m in memory}
    rows = []
    for case in times:
        row = {"case": case, **mem.get(case, {})}
        if "loss" not in row:  # the memory run's label, else the timing run's: chunked or standard
            row["loss"] = timing.get("loss", {}).get(case, "-")
        row["step_s"] = statistics.median(times[case])
        if case in CASES:
            row["bound"] = CASES[case].bound
            bound = _ratios(times, case, CASES[case].bound)
            if bound:
                row["x_bound"], row["x_bound_range"] = statistics.median(bound), [min(bound), max(bound)]
                row["under_bound"] = max(bound) < 1.0  # faster than its bound in every round
            peer = PEFT_PEER.get(case)
            vs = _ratios(times, peer, case)  # PEFT's step / ours = our throughput relative to PEFT's
            if vs:
                row["vs_peft"], row["vs_peft_range"] = statistics.median(vs), [min(vs), max(vs)]
                if "peak_mb" in mem.get(peer, {}) and "peak_mb" in row:
                    row["mem_vs_peft"] = row["peak_mb"] / mem[peer]["peak_mb"]
        rows.append(row)
    for case, m in mem.items():  # memory-only rows (timing failed)
        if case not in times:
            rows.append(dict(m))
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _train_table(rows: list[dict]) -> list[str]:
    lines = [
        f"{'case':<15} {'loss':<9} {'s/step':>7} {'x bound (range)':>20} {'vs PEFT (range)':>20} "
        f"{'peak MB':>8} {'MB vs PEFT':>10}"
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:<15} FAILED: {r.get('error')}")
            continue
        xb = r.get("x_bound")
        xb_s = "-" if xb is None else f"{xb:.3f} ({r['x_bound_range'][0]:.2f}-{r['x_bound_range'][1]:.2f})"
        vp = r.get("vs_peft")
        vp_s = "-" if vp is None else f"{vp:.3f}x ({r['vs_peft_range'][0]:.2f}-{r['vs_peft_range'][1]:.2f})"
        lines.append(
            f"{r['case']:<15} {r.get('loss', '-'):<9} {_fmt(r.get('step_s'), '7.3f')} {xb_s:>20} {vp_s:>20} "
            f"{_fmt(r.get('peak_mb'), '8.0f')} {_fmt(r.get('mem_vs_peft'), '10.3f')}"
            + ("  << under its bound in every round" if r.get("under_bound") else "")
        )
    return lines


def bench(
    arch: str = "llama",
    size: str = "125m",
    peers: tuple[str, ...] = ("peft",),
    quick: bool = False,
    device: str | None = None,
    cases: tuple[str, ...] = DEFAULT_CASES,
    latency: bool = True,
    memory: bool = True,
    threads: int = 2,
    out: str | None = None,
    batch: int = 4,
    seq: int = 128,
    amp: str = "none",
    rounds: int | None = None,
) -> dict:
    """Run the benchmark and return (and optionally write) its results."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    mem_steps, train_rounds, lat_rounds = (2, 3, 5) if quick else (3, 6, 15)
    train_rounds = rounds or train_rounds
    cases = tuple(c for c in cases if CASES[c].peer == "ours" or CASES[c].peer in peers)
    for case in [c for c in cases if skip_reason(arch, c)]:
        print(f"  skipped {case}: {skip_reason(arch, case)}", file=sys.stderr, flush=True)
    cases = tuple(c for c in cases if not skip_reason(arch, c))
    common = [
        "--arch",
        arch,
        "--size",
        size,
        "--device",
        device,
        "--threads",
        str(threads),
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        "--amp",
        amp,
    ]
    memory_rows = []
    for case in cases if memory else ():
        print(f"  memory: {case} (own process) ...", file=sys.stderr, flush=True)
        row = _subprocess(["--worker", "memory", "--case", case, "--steps", str(mem_steps), *common])
        row.setdefault("case", case)
        memory_rows.append(row)
    train_rows, timing, noise = [], {}, None
    if cases:
        timed = with_bounds(list(cases))
        print(
            f"  step time: {len(timed)} cases and bounds interleaved, {train_rounds} rounds ...",
            file=sys.stderr,
            flush=True,
        )
        timing = _subprocess(
            ["--worker", "timing", "--cases", ",".join(timed), "--rounds", str(train_rounds), *common]
        )
        if "error" in timing:
            memory_rows.append({"case": "timing", "error": timing["error"]})
            timing = {}
        noise = _noise(timing.get("times", {}))
        train_rows = _train_rows(timing, memory_rows)
    latency_rows = []
    if latency:
        print("  latency: all variants, round-robin ...", file=sys.stderr, flush=True)
        got = _subprocess(
            [
                "--worker",
                "latency",
                "--rounds",
                str(lat_rounds),
                *common,
                "--peers",
                ",".join(peers),
            ]
        )
        latency_rows = got.get("rows", [got])
    import transformers

    result = {
        "arch": arch,
        "size": size,
        "device": device,
        "threads": threads,
        "batch": batch,
        "seq": seq,
        "amp": amp,
        "quick": quick,
        "rounds": train_rounds,
        "steps_per_sample": timing.get("steps_per_sample", 1),
        "cpu": cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "train": train_rows,
        "latency": latency_rows,
        "step_times": timing.get("times", {}),  # every round, for other paired ratios
        "noise": noise,  # one bound timed twice per round: the spread of a paired ratio of equal work
    }
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    with contextlib.suppress(ImportError):
        import peft

        result["peft"] = peft.__version__
    cpu = result["cpu"]
    where = (
        result.get("gpu") or f"{cpu['model']} [{', '.join(cpu['flags'])}; torch {cpu['torch_capability']}]"
    )
    lines = [
        f"deltatune bench: {arch}-{size}-shaped, batch {batch} x seq {seq}, {device} ({where}), "
        f"{threads} threads, amp {amp}, {train_rounds} rounds"
        + (f" of {result['steps_per_sample']} steps a case" if result["steps_per_sample"] > 1 else ""),
        "",
    ]
    lines += _train_table(train_rows) if train_rows else []
    if noise:
        lines.append(
            f"noise: {noise['case']} timed twice in each round, second / first {noise['ratio']:.3f} "
            f"(range {noise['range'][0]:.2f}-{noise['range'][1]:.2f}): a ratio inside that range is equal work"
        )
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
        path = os.path.join(out, f"bench-{arch}-{size}-{device}{'' if amp == 'none' else '-' + amp}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, path)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.size not in ARCHS[args.arch]["sizes"]:
        parser.error(f"--size {args.size}: {args.arch} comes in {', '.join(ARCHS[args.arch]['sizes'])}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    if args.amp == "fp16" and (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cuda":
        parser.error("--amp fp16 (with the grad scaler) needs --device cuda; on CPU use --amp bf16")
    for flag in ("threads", "batch", "rounds", "steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    longest = _max_positions(args.arch)
    if not 2 <= args.seq <= longest - VIRTUAL_TOKENS:
        parser.error(
            f"--seq must be from 2 to {longest - VIRTUAL_TOKENS} on --arch {args.arch} (its {longest} positions, "
            f"less prompt tuning's {VIRTUAL_TOKENS} virtual tokens), got {args.seq}"
        )
    peers = tuple(p for p in args.peers.split(",") if p)
    if unknown_peers := [p for p in peers if p != "peft"]:
        parser.error(f"--peers: unknown peer(s) {unknown_peers}; the one peer is 'peft' ('' for none)")
    torch.set_num_threads(args.threads)
    if args.worker:
        if args.worker == "memory":
            data = run_train_memory(
                args.case, args.arch, args.size, args.steps, args.device, args.batch, args.seq, args.amp
            )
        elif args.worker == "timing":
            data = run_train_timing(
                args.cases.split(","),
                args.arch,
                args.size,
                args.rounds or 3,
                args.device,
                args.batch,
                args.seq,
                args.amp,
            )
        else:
            data = {
                "rows": run_latency(
                    args.arch,
                    args.size,
                    args.rounds or 15,
                    args.device,
                    [(1, args.seq), (8, args.seq // 2)],
                    "peft" in peers,
                )
            }
        with open(args.worker_out, "w") as f:
            json.dump(data, f)
        return 0
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    if cases and all(skip_reason(args.arch, c) for c in cases) and not args.no_train:
        why = "; ".join(dict.fromkeys(skip_reason(args.arch, c) for c in cases))
        parser.error(f"no case left to run on --arch {args.arch}: {why}")
    if "peft" in peers:
        try:
            import peft  # noqa: F401
        except ImportError:
            parser.error("--peers peft: peft is not installed (pip install peft), or pass --peers ''")
    if args.out and (why := unwritable(args.out)):
        parser.error(f"--out {args.out}: {why}; pick a folder that can be written (it is made if missing)")
    bench(
        args.arch,
        args.size,
        peers,
        args.quick,
        args.device,
        () if args.no_train else tuple(cases),
        not args.no_latency,
        not args.no_memory,
        args.threads,
        args.out,
        args.batch,
        args.seq,
        args.amp,
        args.rounds,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
