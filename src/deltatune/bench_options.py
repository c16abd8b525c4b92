"""`deltatune bench`'s command line and the shapes and cases it names (the benchmark itself, and what it measures
and how, is in `deltatune.bench`), kept apart so that `deltatune bench --help` imports no torch."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

# ---- the architectures ------------------------------------------------------------------------------------

ARCHS: dict[str, dict] = {
    "llama": {
        "task": "causal",
        "qv": ["q_proj", "v_proj"],
        "sizes": {
            "tiny": dict(
                hidden_size=64,
                intermediate_size=172,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=1000,
            ),
            # ~125M parameters: the SmolLM/Llama recipe at GPT-2-small width, untied head, GQA 12:4
            "125m": dict(
                hidden_size=768,
                intermediate_size=2048,
                num_hidden_layers=12,
                num_attention_heads=12,
                num_key_value_heads=4,
                vocab_size=32000,
            ),
        },
    },
    "opt": {
        "task": "causal",
        "qv": ["q_proj", "v_proj"],
        "sizes": {
            "tiny": dict(
                hidden_size=64,
                num_hidden_layers=2,
                ffn_dim=256,
                num_attention_heads=4,
                word_embed_proj_dim=64,
                vocab_size=1000,
            ),
            "125m": dict(
                hidden_size=768,
                num_hidden_layers=12,
                ffn_dim=3072,
                num_attention_heads=12,
                word_embed_proj_dim=768,
                vocab_size=50272,
            ),
            "350m": dict(
                hidden_size=1024,
                num_hidden_layers=24,
                ffn_dim=4096,
                num_attention_heads=16,
                word_embed_proj_dim=512,
                do_layer_norm_before=False,
                vocab_size=50272,
            ),
        },
    },
    "gpt2": {
        "task": "causal",
        "qv": ["c_attn"],  # GPT-2 computes q, k and v in one Conv1D (PEFT's default target for GPT-2)
        # a method (all its cases) or a case the architecture can't take, and why
        "unsupported": {"oft": "OFT adapts nn.Linear layers only (as PEFT's), and GPT-2's are Conv1D"},
        "sizes": {
            "tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=1000),
            "125m": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257),
        },
    },
    "bert": {
        "task": "cls",
        "unsupported": {
            "peft-prefix-tuning": "PEFT's prefix tuning refuses transformers 5's BERT (no past key values)"
        },
        "qv": ["query", "value"],
        "sizes": {
            "tiny": dict(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=256,
                vocab_size=1000,
            ),
            "125m": dict(
                hidden_size=768,
                num_hidden_layers=12,
                num_attention_heads=12,
                intermediate_size=3072,
                vocab_size=30522,
            ),  # bert-base, 110M
        },
    },
}


@dataclass(frozen=True)
class Case:
    """One training method. `placement` + `quantize` name its bound."""

    kind: str  # lora | houlsby | pfeiffer | top-layers | full | ia3 | vera | oft | prompt-tuning | prefix-tuning
    peer: str = "ours"  # ours | peft
    targets: str = "qv"  # qv | all
    dora: bool = False
    quantize: str | None = None  # nf4 | int8
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def bound(self) -> str:
        if self.kind == "lora":
            return "bound-" + self.targets + (f"-{self.quantize}" if self.quantize else "")
        if self.kind == "vera":  # on LoRA's default targets, q/v: the same marks (their outputs) as LoRA's
            return "bound-qv"
        return "bound-" + {"top-layers": "top2", "prompt-tuning": "prompt", "prefix-tuning": "prefix"}.get(
            self.kind, self.kind
        )


CASES: dict[str, Case] = {
    "lora-qv": Case("lora"),
    "lora-all": Case("lora", targets="all"),
    "dora": Case("lora", dora=True),
    "dora-all": Case("lora", targets="all", dora=True),
    "qlora-nf4": Case("lora", quantize="nf4"),
    "qlora-int8": Case("lora", quantize="int8"),
    "houlsby": Case("houlsby"),
    "pfeiffer": Case("pfeiffer"),
    "top-layers": Case("top-layers"),
    "full": Case("full"),
    "peft-lora-qv": Case("lora", peer="peft"),
    "peft-lora-all": Case("lora", peer="peft", targets="all"),
    "peft-dora": Case("lora", peer="peft", dora=True),
    "peft-dora-all": Case("lora", peer="peft", targets="all", dora=True),
    # PEFT's LoRA on bitsandbytes' own Linear4bit (NF4, double-quantized, block 64: the same storage)
    "peft-qlora-nf4": Case("lora", peer="peft", quantize="nf4"),
    # the registry's other weight-space methods, each with PEFT's own defaults (the same as ours): (IA)^3 on
    # keys, values and the FFN's input; VeRA r=256 and OFT (blocks of 32, Cayley-Neumann) on q/v
    "ia3": Case("ia3"),
    "vera": Case("vera"),
    "oft": Case("oft"),
    "peft-ia3": Case("ia3", peer="peft"),
    "peft-vera": Case("vera", peer="peft"),
    "peft-oft": Case("oft", peer="peft"),
    # prompt learning, 20 virtual tokens (prompt tuning) or 20 keys/values per layer (prefix tuning)
    "prompt-tuning": Case("prompt-tuning"),
    "prefix-tuning": Case("prefix-tuning"),
    "peft-prompt-tuning": Case("prompt-tuning", peer="peft"),
    "peft-prefix-tuning": Case("prefix-tuning", peer="peft"),
}
# PEFT's row for each of our cases
PEFT_PEER = {
    "lora-qv": "peft-lora-qv",
    "lora-all": "peft-lora-all",
    "dora": "peft-dora",
    "dora-all": "peft-dora-all",
    "qlora-nf4": "peft-qlora-nf4",
    "ia3": "peft-ia3",
    "vera": "peft-vera",
    "oft": "peft-oft",
    "prompt-tuning": "peft-prompt-tuning",
    "prefix-tuning": "peft-prefix-tuning",
}
DEFAULT_CASES = (
    "lora-qv",
    "lora-all",
    "dora",
    "qlora-nf4",
    "qlora-int8",
    "houlsby",
    "pfeiffer",
    "top-layers",
    "full",
    "ia3",
    "vera",
    "oft",
    "prompt-tuning",
    "prefix-tuning",
    "peft-lora-qv",
    "peft-lora-all",
    "peft-dora",
    "peft-qlora-nf4",
    "peft-ia3",
    "peft-vera",
    "peft-oft",
    "peft-prompt-tuning",
    "peft-prefix-tuning",
)
VIRTUAL_TOKENS = 20
LORA = {"r": 8, "lora_alpha": 16}
TOP_LAYERS = 2
LATENCY_CASES = (
    "base",
    "lora",
    "lora-merged",
    "dora",
    "houlsby",
    "pfeiffer",
    "mixed8",
    "peft",
    "peft-mixed8",
    "peft-dora",
)


def build_parser() -> argparse.ArgumentParser:
    from deltatune.cli import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="deltatune bench",
        description="systems benchmark: what a training step and a forward pass cost, against each method's bound "
        "and against PEFT (see `deltatune.bench` for how it measures)",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--arch", choices=list(ARCHS), default="llama", help="model shape (default llama)")
    parser.add_argument("--size", default="125m", help="tiny, 125m (every arch) or 350m (opt); default 125m")
    parser.add_argument(
        "--peers", default="peft", help="comma-separated peers to run beside ours ('peft' or '')"
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved timing rounds (default 6, quick 3)"
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available, else cpu"
    )
    parser.add_argument(
        "--amp",
        choices=["none", "fp16", "bf16"],
        default="none",
        help="autocast dtype; fp16 adds the grad scaler",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per training step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument(
        "--cases",
        default=",".join(DEFAULT_CASES),
        help=f"training cases, from: {', '.join(CASES)} (each brings its bound)",
    )
    parser.add_argument("--no-latency", action="store_true", help="skip the forward-latency table")
    parser.add_argument("--no-train", action="store_true", help="skip the training table")
    parser.add_argument("--no-memory", action="store_true", help="skip the one-process-per-case memory runs")
    parser.add_argument("--out", default="bench-results", help="folder for the JSON results")
    # internal: one worker in this process
    parser.add_argument("--worker", choices=["memory", "timing", "latency"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`deltatune bench`: parse first (so `--help` is instant), then run the benchmark."""
    build_parser().parse_args(argv)
    from deltatune import bench

    return bench.main(argv)


def skip_reason(arch: str, case: str) -> str | None:
    """Why `arch` can't take `case` (a method it can't adapt, or a peer that refuses it), or None."""
    unsupported = ARCHS[arch].get("unsupported", {})
    return unsupported.get(case) or unsupported.get(CASES[case].kind)
