"""`deltatune train`, the command line: parses its options with nothing heavy imported (so `--help` is
instant), then loads the config and runs `deltatune.train.run.run`. Errors are reported by `deltatune.cli`
as one line."""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

from deltatune.cli import HelpFormatter


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deltatune train",
        description="Fine-tune a model with one method. Settings come from --config and key=value overrides "
        "(dotted keys for sections: fields.text=body, method_args.r=4); every key is listed in "
        "`deltatune.train.TrainConfig` and configs/*.yaml.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--config",
        default=None,
        help="a YAML file (see configs/); without it, the defaults: LoRA on the embedded MiniLM + builtin:spam",
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="check the settings and print all of them (defaults included) as YAML, a file --config takes, "
        "then exit without training",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="settings that replace the config's (e.g. lr=1e-4)"
    )
    return p


def train_main(argv: list[str]) -> int:
    """`deltatune train --config FILE [key=value ...] [--resume | --overwrite]`."""
    p = parser()
    args, unknown = p.parse_known_intermixed_args(argv)  # options may come between key=value overrides
    if unknown:
        p.error(_unknown_options(unknown, argv))
    if args.print_config and (args.resume or args.overwrite):
        p.error("--print-config prints the settings and runs nothing: drop --resume/--overwrite")
    from deltatune.errors import DeltatuneError

    try:
        from deltatune.train.config import config_yaml, load_train_config
        from deltatune.train.run import run

        config = load_train_config(args.config, args.overrides)
        if args.print_config:
            print(config_yaml(config), end="")
            return 0
        summary = run(config, resume=args.resume, overwrite=args.overwrite)
    except (DeltatuneError, OSError) as e:  # one line (also when called directly, as the web board does)
        from deltatune.cli import report

        return report("train", e)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(summary)
    if summary["status"] == "interrupted":
        return 128 + int(signal.Signals[summary["signal"]] if summary.get("signal") else signal.SIGINT)
    return 0


main = train_main


def _unknown_options(unknown: list[str], argv: list[str]) -> str:
    """argparse's message, and for an option like `--max-steps 3` (as `compare` takes them) the override meant."""
    message = f"unrecognized arguments: {' '.join(unknown)}"
    option = next((a for a in unknown if a.startswith("--") and len(a) > 2), None)
    if option is None:
        return message
    import dataclasses

    from deltatune.train.config import KEY_ALIASES, TrainConfig

    name, _, value = option[2:].partition("=")
    key = name.replace("-", "_")
    key = KEY_ALIASES.get(key.lower(), key)  # --learning-rate (transformers' name): lr
    settings = {f.name for f in dataclasses.fields(TrainConfig)}
    if key.split(".")[0] not in settings:  # --verbose: no such setting
        return f"{message}; train settings are key=value overrides, and none is named {key!r} (see configs/)"
    at = argv.index(option) + 1
    if not value and at < len(argv) and not argv[at].startswith("-") and "=" not in argv[at]:
        value = argv[at]
    return f"{message}; train settings are key=value overrides: {key}={value or '...'}"


def _print_summary(summary: dict[str, Any]) -> None:
    rows = [(k, v) for k, v in summary.items() if not isinstance(v, (dict, list)) and v is not None]
    if "before" in summary:
        rows += [(f"{k} (before training)", v) for k, v in summary["before"].items()]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(
            f"{key.ljust(width)}  {value:.4g}" if isinstance(value, float) else f"{key.ljust(width)}  {value}"
        )
