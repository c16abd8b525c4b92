"""`deltatune estimate`: the article's back-of-envelope, made a command.

How much accelerator memory fine-tuning a model takes with each method, and how many GPUs of a given
size that means. Every term is stated, so the number can be checked by hand:

- weights: frozen parameters x the base's bytes (16-bit 2, int8 ~1, NF4 ~0.516 with double-quantized
  scales) + trainable parameters x the training precision's bytes;
- gradients: trainable parameters x the training precision's bytes;
- optimizer: AdamW's two states per trainable parameter x `state_bytes`;
- activations: per transformer block `s*b*h*(34 + 5*a*s/h)` bytes in 16-bit (Korthikanti et al., 2022);
  with gradient checkpointing only each block's input (`2*s*b*h`) plus one block's worth are kept. Only
  blocks that gradients pass through count (top-layer fine-tuning stops at its first trained block).

The shape (hidden size, blocks, heads) comes from `--hidden/--layers/--heads`, or when none is given from the
released model `--params` names (7b: Llama-2-7B; 8b: Llama-3-8B; 0.5b: Qwen2.5-0.5B; ...) or whose parameter
count is within 15% of it, or else from a GPT-3-like aspect ratio.

With the article's assumptions (16-bit weights, gradients and Adam states; checkpointing; batch 1 at
GPT-3's 2048-token context) GPT-3 175B needs ~1.4 TB for full fine-tuning (~18 A100-80GB) and ~183 GB
with LoRA on an 8-bit base (~3 of them).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

from deltatune.cli import HelpFormatter
from deltatune.methods import registry

BASE_BYTES = {"16": 2.0, "32": 4.0, "int8": 1.0, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}
GB = 1e9


@dataclass(frozen=True)
class Published:
    """A released model's shape, as its `config.json` gives it (all are Llama-like: RoPE, a gated MLP, RMSNorm)."""

    name: str
    nominal: float  # the size its name says: 7e9 for Llama-2-7B
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False  # the output layer is the embedding matrix
    qkv_bias: bool = False

    @property
    def params(self) -> int:
        """Its parameter count from the shape: the embeddings (and the output layer, unless tied); per block q and o
        (h x h), k and v (h x kv_heads*head_dim, with their biases where it has them), the gated MLP's three
        matrices and two norms; the final norm."""
        h, kv = self.hidden, self.kv_heads * (self.hidden // self.heads)
        attention = 2 * h * h + 2 * h * kv + (h + 2 * kv if self.qkv_bias else 0)
        block = attention + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * block + h


# The published configs (huggingface.co/<org>/<name>/blob/main/config.json). For a size several share, the first
# listed is the one `--params <size>` means: 7b is Llama-2-7B, 3b Llama-3.2-3B.
PUBLISHED = (
    Published("Llama-2-7B", 7e9, 4096, 32, 32, 32, 11008, 32000),
    Published("Llama-2-13B", 13e9, 5120, 40, 40, 40, 13824, 32000),
    Published("Llama-2-70B", 70e9, 8192, 80, 64, 8, 28672, 32000),
    Published("Llama-3-8B", 8e9, 4096, 32, 32, 8, 14336, 128256),
    Published("Llama-3.2-1B", 1e9, 2048, 16, 32, 8, 8192, 128256, tied=True),
    Published("Llama-3.2-3B", 3e9, 3072, 28, 24, 8, 8192, 128256, tied=True),
    Published("Mistral-7B-v0.1", 7e9, 4096, 32, 32, 8, 14336, 32000),
    Published("Qwen2.5-0.5B", 0.5e9, 896, 24, 14, 2, 4864, 151936, tied=True, qkv_bias=True),
    Published("Qwen2.5-1.5B", 1.5e9, 1536, 28, 12, 2, 8960, 151936, tied=True, qkv_bias=True),
    Published("Qwen2.5-3B", 3e9, 2048, 36, 16, 2, 11008, 151936, tied=True, qkv_bias=True),
    Published("Qwen2.5-7B", 7e9, 3584, 28, 28, 4, 18944, 152064, qkv_bias=True),
    Published("Qwen2.5-14B", 14e9, 5120, 48, 40, 8, 13824, 152064, qkv_bias=True),
    Published("Qwen2.5-32B", 32e9, 5120, 64, 40, 8, 27648, 152064, qkv_bias=True),
    Published("Qwen2.5-72B", 72e9, 8192, 80, 64, 8, 29568, 152064, qkv_bias=True),
)
MATCH_TOLERANCE = 0.15  # a released model's count within 15% of --params lends its shape


def published_model(params: float) -> Published | None:
    """The released model a parameter count names: the first whose size it is (7e9: Llama-2-7B), else the one
    whose count is nearest, if within `MATCH_TOLERANCE` of it; None when none is."""
    if not params > 0:
        return None
    for model in PUBLISHED:
        if math.isclose(params, model.nominal, rel_tol=1e-9):
            return model
    nearest = min(PUBLISHED, key=lambda m: abs(math.log(m.params / params)))
    return nearest if abs(nearest.params - params) <= MATCH_TOLERANCE * params else None


@dataclass
class Shape:
    """A transformer's size. When only the parameter count is known it is the shape of the released model that
    count names (`published_model`), or else a GPT-3-like aspect ratio (params ~ 12*L*h^2 with L = h/128 and
    h/128 heads); a hidden size, block count or head count given turns the released shapes off."""

    params: float
    hidden: int
    layers: int
    heads: int
    published: Published | None = None  # the released model whose shape this is

    @property
    def kv_hidden(self) -> int:
        """The keys'/values' width: narrower than `hidden` for a released model with grouped-query attention."""
        model = self.published
        return model.kv_heads * (model.hidden // model.heads) if model else self.hidden

    @property
    def intermediate(self) -> int | None:
        return self.published.intermediate if self.published else None

    @classmethod
    def from_params(
        cls, params: float, hidden: int | None = None, layers: int | None = None, heads: int | None = None
    ) -> Shape:
        if hidden is None and layers is None and heads is None and (model := published_model(params)):
            return cls(params, model.hidden, model.layers, model.heads, model)
        h = hidden or int(round((params * 128 / 12) ** (1 / 3) / 128) * 128) or 128
        n_layers = layers or max(1, h // 128)
        return cls(params, h, n_layers, heads or max(1, h // 128))


@dataclass
class Estimate:
    method: str
    params: float
    trainable: float
    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    activations_gb: float
    total_gb: float
    gpus: int
    gpu_mem_gb: float


MAX_PARAMS = 1e15  # a thousand times the largest models: a typo (1e30) beyond it


def _uses_rank(method: str) -> bool:
    """Whether `--r` changes a method's estimate (LoRA and its kin), found from its formula."""
    shape = Shape.from_params(7e9)
    return trainable_params(shape, method, r=8) != trainable_params(shape, method, r=16)


def trainable_params(
    shape: Shape,
    method: str,
    r: int = 8,
    targets_per_layer: int = 2,
    num_layers: int = 2,
    reduction_factor: int = 16,
) -> float:
    """Trainable parameters of a method (heads ignored: they are tiny next to a large model); the formula is
    the method's own, in the registry."""
    options = {"r": r, "targets_per_layer": targets_per_layer, "num_layers": num_layers}
    options["reduction_factor"] = reduction_factor
    return registry.get(method).trainable_params(shape, options)


def estimate(
    params: float,
    method: str = "full",
    *,
    quantize: str | None = None,
    precision: str = "16",
    state_bytes: float | None = None,
    r: int = 8,
    targets_per_layer: int = 2,
    num_layers: int = 2,
    batch: int = 1,
    seq: int = 2048,
    checkpointing: bool = True,
    gpu_mem: float = 80.0,
    hidden: int | None = None,
    layers: int | None = None,
    heads: int | None = None,
    trainable: float | None = None,
) -> Estimate:
    """Memory for fine-tuning a model of `params` parameters with `method` (see the module docstring).

    `trainable` replaces the method's own count of trainable parameters (when it is known exactly).

    Raises:
        ValueError: an unknown method/precision, or a quantized base for a method that trains the base.
    """
    spec = registry.get(method)  # raises for an unknown method, listing them
    if spec.quantize and quantize not in (None, spec.quantize):
        raise ValueError(
            f"{method} quantizes the base to {spec.quantize}; --quantize {quantize} contradicts it"
        )
    quantize = quantize or spec.quantize
    if precision not in ("16", "32"):
        raise ValueError(f"precision must be '16' or '32', got {precision!r}")
    if quantize not in (None, "int8", "nf4"):
        raise ValueError(f"quantize must be 'int8' or 'nf4', got {quantize!r}")
    if quantize and not spec.quantized_base:
        raise ValueError(
            f"{method} fine-tuning trains the base weights, which can't stay quantized; use lora with --quantize"
        )
    shape = Shape.from_params(params, hidden, layers, heads)
    train_bytes = BASE_BYTES[precision]
    states = train_bytes if state_bytes is None else state_bytes
    if trainable is None:
        trainable = trainable_params(shape, method, r, targets_per_layer, num_layers)
    frozen = shape.params - trainable if spec.in_place else shape.params
    weights = frozen * BASE_BYTES[quantize or precision] + trainable * train_bytes
    gradients = trainable * train_bytes
    optimizer = trainable * 2 * states
    s, b, h, a = seq, batch, shape.hidden, shape.heads
    per_block = s * b * h * (34 + 5 * a * s / h) * train_bytes / 2
    blocks = spec.backprop_blocks(shape, {**registry.ESTIMATE_OPTIONS, "num_layers": num_layers})
    activations = (
        (blocks * 2 * s * b * h * train_bytes / 2 + per_block) if checkpointing else blocks * per_block
    )
    total = weights + gradients + optimizer + activations
    return Estimate(
        method,
        shape.params,
        trainable,
        weights / GB,
        gradients / GB,
        optimizer / GB,
        activations / GB,
        total / GB,
        max(1, math.ceil(total / GB / gpu_mem - 1e-9)),
        gpu_mem,
    )


_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def param_count(text: str) -> float:
    """A parameter count as people write it: 175e9, 1.3e9, or with a suffix, 7b / 7B / 125m / 1.5t / 350k."""
    value = text.strip()
    scale = _SUFFIXES.get(value[-1:].lower(), 1.0)
    try:
        count = float(value[:-1] if scale != 1.0 else value) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a parameter count: write it as 7b, 125m, 1.3e9 or 175e9"
        ) from None
    # `--params 7` meant 7b: no transformer has so few parameters, so say so rather than print a table of zeros
    if scale == 1.0 and 0 < count < 1000:
        raise argparse.ArgumentTypeError(
            f"{text!r} is {value} parameters, too few for a transformer; write the count with its unit, "
            f"e.g. {value}b for {value} billion or {value}m for {value} million (or {value}e9)"
        )
    return count


def _shape_source(shape: Shape) -> str:
    """Whose shape the estimate assumed, for the header ("" for a shape given or from the aspect ratio)."""
    model = shape.published
    return f"the shape of {model.name}, which has {model.params:.3g}: " if model else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deltatune estimate",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--params",
        type=param_count,
        required=True,
        help="parameter count, e.g. 7b, 125m, 1.3e9 or 175e9. Unless --hidden, --layers or --heads is given, the "
        "shape is that of the released model of that size (7b: Llama-2-7B, 8b: Llama-3-8B, 0.5b: Qwen2.5-0.5B, ...) "
        "or with a count within 15%% of it, else a GPT-3-like one",
    )
    parser.add_argument(
        "--method",
        default="all",
        choices=["all", *registry.names()],
        help="the method to estimate, or 'all' (every registered method)",
    )
    parser.add_argument("--r", type=int, default=8, help="LoRA/DoRA rank")
    parser.add_argument("--targets-per-layer", type=int, default=2, help="LoRA targets per block (2: q, v)")
    parser.add_argument("--num-layers", type=int, default=2, help="blocks trained by top-layer fine-tuning")
    parser.add_argument(
        "--quantize",
        choices=["int8", "nf4"],
        default=None,
        help="frozen base quantization (LoRA, adapters); the qlora-* methods set their own",
    )
    parser.add_argument("--precision", choices=["16", "32"], default="16", help="training precision in bits")
    parser.add_argument(
        "--state-bytes", type=float, default=None, help="bytes per Adam state (default: as --precision)"
    )
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep every activation")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GB per GPU (80: A100-80GB)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default: see --params)")
    parser.add_argument("--layers", type=int, default=None, help="blocks (default: see --params)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default: see --params)")
    parser.add_argument("--json", action="store_true", help="print the estimates as JSON")
    args = parser.parse_args(argv)
    for name in (
        "params",
        "gpu_mem",
        "state_bytes",
        "batch",
        "seq",
        "r",
        "targets_per_layer",
        "hidden",
        "layers",
    ):
        value = getattr(args, name)
        if value is not None and not (0 < value < float("inf")):
            parser.error(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if args.heads is not None and args.heads < 1:
        parser.error(f"--heads must be a positive number, got {args.heads}")
    if args.num_layers < 0:
        parser.error(f"--num-layers must not be negative, got {args.num_layers}")
    if args.params > MAX_PARAMS:
        parser.error(
            f"--params {args.params:.3g} is beyond any model (the largest have about 2e12); give e.g. 7b"
        )
    shape = Shape.from_params(args.params, args.hidden, args.layers, args.heads)
    if shape.hidden % shape.heads:
        parser.error(f"--heads {shape.heads} doesn't divide the hidden size {shape.hidden}")
    # every block has at least its query and output projections (h x h each): a shape given beyond --params is a
    # typo (the shape made from --params alone is what it is, even for a toy count)
    least = 2 * shape.layers * shape.hidden**2
    if (args.hidden is not None or args.layers is not None) and least > args.params:
        parser.error(
            f"hidden {shape.hidden} x {shape.layers} blocks needs at least {least:.3g} parameters (the query and "
            f"output projections alone), more than --params {args.params:.3g}: give a matching --params, "
            "--hidden or --layers"
        )
    methods = registry.names() if args.method == "all" else [args.method]
    ranked = [m for m in methods if _uses_rank(m)]
    if ranked and args.r > shape.hidden:
        parser.error(
            f"--r {args.r} is larger than the hidden size {shape.hidden}: a LoRA update's rank is at most the "
            "smaller side of the matrix it adapts"
        )
    rows = []
    for method in methods:
        # With every method listed, a quantized base applies to those that can train on one (and don't set
        # their own: the qlora-* methods).
        spec = registry.get(method)
        quantize = (
            None if args.method == "all" and (not spec.quantized_base or spec.quantize) else args.quantize
        )
        try:
            rows.append(
                estimate(
                    args.params,
                    method,
                    quantize=quantize,
                    precision=args.precision,
                    state_bytes=args.state_bytes,
                    r=args.r,
                    targets_per_layer=args.targets_per_layer,
                    num_layers=args.num_layers,
                    batch=args.batch,
                    seq=args.seq,
                    checkpointing=not args.no_checkpointing,
                    gpu_mem=args.gpu_mem,
                    hidden=args.hidden,
                    layers=args.layers,
                    heads=args.heads,
                )
            )
        except ValueError as e:
            parser.error(str(e))
    if args.json:
        # each row says which shape it assumed (the released model's name, or null for a given/aspect-ratio shape)
        where = {
            "hidden": shape.hidden,
            "layers": shape.layers,
            "heads": shape.heads,
            "kv_hidden": shape.kv_hidden,
            "intermediate": shape.intermediate,
            "published_model": shape.published.name if shape.published else None,
        }
        print(json.dumps([{**asdict(r), "shape": where} for r in rows], indent=2))
        return 0
    print(
        f"{args.params:.3g} parameters ({_shape_source(shape)}hidden {shape.hidden}, {shape.layers} blocks, "
        f"{shape.heads} heads); "
        f"{args.precision}-bit training, batch {args.batch} x {args.seq} tokens, "
        f"{'no ' if args.no_checkpointing else ''}gradient checkpointing"
        f"{', base ' + args.quantize + ' for LoRA/adapters' if args.quantize else ''}"
    )
    print(
        f"{'method':<13} {'trainable':>11} {'weights':>9} {'grads':>8} {'optim':>8} {'activ':>8} {'total GB':>9} "
        f"{'GPUs':>5}"
    )
    for e in rows:
        print(
            f"{e.method:<13} {e.trainable:>11.3g} {e.weights_gb:>9.1f} {e.gradients_gb:>8.1f} {e.optimizer_gb:>8.1f} "
            f"{e.activations_gb:>8.1f} {e.total_gb:>9.1f} {e.gpus:>5}"
        )
    print(f"GPUs: {args.gpu_mem:g} GB each, memory alone (no room kept for the framework or fragmentation).")
    return 0
