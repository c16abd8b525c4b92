"""`deltatune <command>`: the one module that knows every command.

Each command lives in its own module as `main(argv: list[str]) -> int` with its own argparse parser;
this file only dispatches, so that `deltatune --help` stays fast (nothing heavy is imported here).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "compare": ("deltatune.compare", "run every method on the same model and data and compare them"),
    "train": ("deltatune.train", "fine-tune a model with one method from a YAML config"),
    "demo": (
        "deltatune.demo",
        "a short LoRA run on the embedded MiniLM model: wrap, train, save, reload, merge",
    ),
    "estimate": ("deltatune.estimate", "back-of-envelope memory and GPU count for fine-tuning a model"),
    "bench": (
        "deltatune.bench",
        "systems benchmark: step time, memory and latency against the bound and PEFT",
    ),
    "merge": ("deltatune.tools", "merge an adapter into its base and write a plain model folder"),
    "generate": ("deltatune.tools", "generate text with a base model and an adapter"),
    "inspect": ("deltatune.tools", "show an adapter's config, size and base; check it fits a base model"),
    "serve": ("deltatune.serve", "serve one base and many adapters over HTTP"),
    "ui": ("deltatune.ui", "a local web board: runs, live curves, compare charts, launch jobs, playground"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: deltatune <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `deltatune <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from deltatune import __version__

        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"deltatune: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # transformers' load reports and weight-loading bars are noise in a command's output; our own progress
    # bars (tqdm, rich) are unaffected. Set TRANSFORMERS_VERBOSITY=info to see them again.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # bitsandbytes (imported by peft and QLoRA) warns that an optional hub kernel package is missing; its own
    # CPU kernels work without it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda r: "kernels-community" not in r.getMessage()
    )
    module = importlib.import_module(COMMANDS[command][0])
    entry = getattr(module, f"{command}_main", None) or module.main
    try:
        return int(entry(rest) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
