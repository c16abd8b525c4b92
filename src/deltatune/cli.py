"""`deltatune <command>`: the one module that knows every command.

Each command lives in its own module as `main(argv: list[str]) -> int` with its own argparse parser;
this file only dispatches, so that `deltatune --help` stays fast (nothing heavy is imported here; a command
module imports torch and transformers inside its functions, so its `--help` is fast too).

Failures the user can fix (a bad config or data file, a missing model, a full disk, a file-size limit) end
with one line, `deltatune <command>: error: ...`, and a non-zero exit code; `--debug` (anywhere on the
command line) or `DELTATUNE_DEBUG=1` shows the traceback instead. Anything else is a bug, and is shown with
its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import traceback

COMMANDS: dict[str, tuple[str, str]] = {
    "compare": ("deltatune.compare", "run every method on the same model and data and compare them"),
    "train": ("deltatune.train.cli", "fine-tune a model with one method from a YAML config"),
    "demo": (
        "deltatune.demo",
        "a short LoRA run on the embedded MiniLM model: wrap, train, save, reload, merge",
    ),
    "estimate": ("deltatune.estimate", "back-of-envelope memory and GPU count for fine-tuning a model"),
    "bench": (
        "deltatune.bench_options",
        "systems benchmark: step time, memory and latency against the bound and PEFT",
    ),
    "merge": ("deltatune.tools", "merge an adapter into its base and write a plain model folder"),
    "generate": ("deltatune.tools", "generate text with a base model and an adapter"),
    "inspect": ("deltatune.tools", "show an adapter's config, size and base; check it fits a base model"),
    "serve": ("deltatune.serve", "serve one base and many adapters over HTTP"),
    "ui": ("deltatune.ui", "a local web board: runs, live curves, compare charts, launch jobs, playground"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every command's help formatter: each option's help ends with its default, unless the help says it
    already or there is none to say (a flag, an unset option)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text.lower()
            or any(action.default is v for v in (None, False, argparse.SUPPRESS))
            or (isinstance(action.default, (str, dict, list, tuple)) and not action.default)
            or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            or not action.option_strings
        ):
            return text
        return text + " (default: %(default)s)"


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: deltatune <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [
        "",
        "Run `deltatune <command> --help` for a command's options. `--debug` (or DELTATUNE_DEBUG=1) shows the",
        "traceback of an error instead of its one-line message.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        os.environ["DELTATUNE_DEBUG"] = "1"  # compare's per-method processes inherit it
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
    try:
        module = importlib.import_module(COMMANDS[command][0])
        entry = getattr(module, f"{command}_main", None) or module.main
        return int(entry(rest) or 0)
    except KeyboardInterrupt as e:  # Ctrl-C; or SIGTERM before a run's training began (train.loop.Terminated)
        signum = getattr(e, "signum", 2)  # SIGINT
        print("interrupted" if signum == 2 else f"stopped by {e}", file=sys.stderr)
        return 128 + signum
    except Exception as e:
        return report(command, e)


def report(command: str, error: Exception) -> int:
    """Print `error` the command line's way and return the exit code: one line for an error the user can fix
    (the traceback too with `--debug`), the traceback and a bug note for anything else. Call it inside an
    `except` block (it prints the exception being handled)."""
    message, code = explain(error)
    if message is None or debug():
        traceback.print_exc()
        if message is None:
            print(
                f"deltatune {command}: unexpected {type(error).__name__}; this is a bug in deltatune, please "
                "report it with the traceback above",
                file=sys.stderr,
            )
        return code
    print(f"deltatune {command}: error: {message}", file=sys.stderr)
    return code


def debug() -> bool:
    """Whether tracebacks are wanted (`--debug` or `DELTATUNE_DEBUG=1`)."""
    return os.environ.get("DELTATUNE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def explain(error: BaseException) -> tuple[str | None, int]:
    """The one-line message and exit code for an error the user can fix; `(None, 1)` for a bug."""
    from deltatune.errors import ConfigError, DataError, DeltatuneError, short

    if isinstance(error, DeltatuneError):
        return str(error), 2 if isinstance(error, (ConfigError, DataError)) else 1
    if isinstance(error, OSError):
        where = f" {short(error.filename, 300)}" if error.filename else ""
        if error.errno == errno.ENOSPC or error.errno == getattr(errno, "EDQUOT", -1):
            return (
                f"no space left on the device while writing{where}: free some space (or set another "
                "output_dir) and run again; a training run continues from its last checkpoint with --resume",
                1,
            )
        if error.errno == errno.EFBIG:
            return (
                f"file-size limit reached while writing{where} (see `ulimit -f`): raise the limit and run "
                "again; a training run continues from its last checkpoint with --resume",
                1,
            )
        if error.strerror:
            return f"{error.strerror}:{where}" if where else error.strerror, 1
        return str(error) or type(error).__name__, 1
    if isinstance(error, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({error}); save it as UTF-8", 2
    if isinstance(error, MemoryError):
        return "out of memory: use a smaller batch_size, max_length or model", 1
    if _peer_gone(error):
        return (
            f"rank {os.environ.get('RANK', '?')} stopped: another process of this distributed run ended (its own "
            "error, printed by it, says why)",
            1,
        )
    return None, 1


# What gloo and NCCL say in a collective when another rank's process has exited
_PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker crashing",
    "Broken pipe",
)


def _peer_gone(error: BaseException) -> bool:
    """A collective that failed because another rank of a `torchrun` run ended (with its own error): not a bug of
    this rank, whose traceback would bury the real error above it."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or not isinstance(error, RuntimeError):
        return False
    return any(s in str(error) for s in _PEER_GONE)


def api_key_from(flag_value: str | None, env_name: str) -> tuple[str | None, str | None]:
    """A server's API key, from `--api-key` or else the environment, and the problem with it (set but empty,
    which would otherwise mean "no key"), for `serve` and `ui` alike."""
    key = flag_value if flag_value is not None else os.environ.get(env_name)
    if key is not None and not key.strip():
        where = "--api-key" if flag_value is not None else f"${env_name}"
        return None, f"{where} is set but empty: give a real key, or unset it to run without one"
    return key, None


def listen_problem(host: str, port: int) -> str | None:
    """Why a server (`serve`, `ui`) couldn't listen on host:port (a port outside 0-65535, an unknown host, a port
    in use or not allowed), found by binding it once now as uvicorn will (SO_REUSEADDR), so that the error comes
    before minutes of loading, not after. None when it can."""
    import socket

    if not 0 <= port <= 65535:
        return f"--port must be from 0 (any free port) to 65535, got {port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        return f"--host {host!r} can't be resolved ({getattr(e, 'strerror', None) or e}); use an address such as 127.0.0.1 or 0.0.0.0"
    family, kind, proto, _, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return f"port {port} on {host} is already in use: stop what listens there or pick another --port"
        return f"can't listen on {host} port {port}: {e.strerror or e}"
    return None


if __name__ == "__main__":
    sys.exit(main())
