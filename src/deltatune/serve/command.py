"""`deltatune serve`: the command line."""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import sys

from deltatune import dtypes, webguard

# Kept here, not in the engine, so that `deltatune serve --help` imports neither torch nor the model code.
TASKS = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS"}
SCHEDULERS = ("continuous", "static")

from deltatune.cli import HelpFormatter, api_key_from, listen_problem  # noqa: E402

logger = logging.getLogger("deltatune.serve")
API_KEY_ENV = "DELTATUNE_API_KEY"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        prog="deltatune serve",
        description="Serve one base model and many adapters over an OpenAI-compatible HTTP API.",
    )
    p.add_argument("--base", required=True, help="base model folder, hub name or embedded:minilm")
    p.add_argument(
        "--adapters",
        help="folder whose sub-folders are adapters or `deltatune train` run folders (their adapter/), each "
        "served by its folder name (or one adapter or run folder)",
    )
    p.add_argument(
        "--base-name", help="the `model` name that selects the base (default: the base folder's name)"
    )
    p.add_argument("--task", choices=["auto", *TASKS], default="auto", help="default: from the adapters")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--allowed-host", action="append", metavar="NAME", help=webguard.ALLOWED_HOST_HELP)
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--api-key", help=f"require this key on every endpoint (or set ${API_KEY_ENV})")
    p.add_argument("--max-tokens-cap", type=int, default=512, help="most tokens one completion may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="bigger request bodies get 413")
    p.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        default="continuous",
        help="continuous: rows join and leave the batch at every step (default); static: one generate per batch",
    )
    p.add_argument(
        "--max-batch", type=int, default=32, help="most rows decoding at once (static: in one call)"
    )
    p.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="static scheduler: how long a batch waits to fill"
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=256,
        help="continuous scheduler: longer prompts are prefilled this many tokens per step",
    )
    p.add_argument(
        "--no-fold-prefill",
        dest="fold_prefill",
        action="store_false",
        help="continuous scheduler: prefill new prompts in model calls of their own, between decoding steps (by "
        "default they ride along in the running rows' decoding step, where the model allows it)",
    )
    p.add_argument(
        "--adapter-slice",
        type=int,
        default=16,
        help="continuous scheduler: when a request waits for an adapter slot and every loaded adapter is in use, "
        "the one in use longest, at least this many steps, is paused (its rows resume later); 0: never (default 16)",
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=0,
        help="continuous scheduler: the most prompt tokens one step prefills for new requests (a burst joins over "
        "several steps while the running rows keep decoding); 0: no limit (default)",
    )
    p.add_argument("--max-queue", type=int, default=1024, help="waiting rows beyond this get 503")
    p.add_argument(
        "--max-loaded-adapters",
        type=int,
        default=32,
        help="adapters kept in memory; the least recently used are evicted beyond it (default 32)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/Ctrl-C, seconds running requests get to finish before they are cancelled",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--dtype",
        type=dtypes.argument,
        default="fp32",
        help=f"dtype the base model is loaded in: {dtypes.HELP}",
    )
    p.add_argument("--threads", type=int, help="CPU threads for the model (default: torch's choice)")
    p.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="server log level"
    )
    return p


def serve_main(argv: list[str] | None = None) -> int:
    """`deltatune serve`: register the adapters, load the base, then answer HTTP until SIGTERM/Ctrl-C."""
    args = _parser().parse_args(argv)
    import torch
    import uvicorn

    from deltatune.serve.app import create_app
    from deltatune.serve.engine import Engine

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    def fail(message: str) -> int:
        print(f"deltatune serve: error: {message}", file=sys.stderr)
        return 2

    api_key, problem = api_key_from(args.api_key, API_KEY_ENV)
    if problem is not None:
        return fail(problem)
    if args.adapters is not None and not os.path.isdir(args.adapters):
        return fail(f"--adapters {args.adapters!r} is not a folder")
    if (why := _check_options(args)) is not None:
        return fail(why)
    if (why := _device_error(args.device, torch)) is not None:
        return fail(why)
    if (why := listen_problem(args.host, args.port)) is not None:  # before the model loads, not minutes after
        return fail(why)
    # The base as every other command finds it: `embedded:minilm`, a folder (missing: said at once), or a hub
    # name (the hub unreachable: said in seconds, not after transformers' retries).
    from deltatune.embedded import check_model, resolve_model

    if (why := check_model(args.base)) is not None:
        return fail(f"--base: {why}")
    base_name = args.base_name or os.path.basename(os.path.normpath(args.base))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        engine = Engine(
            resolve_model(args.base),
            args.adapters,
            base_name=base_name,
            task=args.task,
            max_batch=args.max_batch,
            batch_wait_ms=args.batch_wait_ms,
            max_queue=args.max_queue,
            device=args.device,
            dtype=args.dtype,
            scheduler=args.scheduler,
            max_loaded_adapters=args.max_loaded_adapters,
            prefill_chunk=args.prefill_chunk,
            adapter_slice=args.adapter_slice,
            max_prefill_tokens=args.max_prefill_tokens,
            fold_prefill=args.fold_prefill,
        )
    except (OSError, ValueError) as e:
        return fail(str(e))
    freeze_startup_objects()
    if not webguard.is_loopback(args.host) and api_key is None:
        logger.warning("listening on %s without an API key: anyone who can reach it can use it", args.host)
    app = create_app(
        engine,
        api_key=api_key,
        max_tokens_cap=args.max_tokens_cap,
        max_body_bytes=args.max_body_bytes,
        # a loopback bind: this machine's names only, and those given
        allowed_hosts=webguard.allowed_hosts_for(args.host, args.allowed_host or ()),
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.shutdown_timeout,
    )
    return 0


def _check_options(args: argparse.Namespace) -> str | None:
    """The first numeric option out of its range, named with the value given and what it means (None when all
    are fine). The engine checks its own arguments too, for library callers; this names the flags."""
    ranges = [  # flag, value, least, what the least means
        ("--max-loaded-adapters", args.max_loaded_adapters, 1, " (one batch needs one adapter in memory)"),
        ("--prefill-chunk", args.prefill_chunk, 1, " (tokens per step)"),
        ("--max-prefill-tokens", args.max_prefill_tokens, 0, " (0: no limit)"),
        ("--adapter-slice", args.adapter_slice, 0, " (0: never pause)"),
        ("--max-tokens-cap", args.max_tokens_cap, 1, ""),
        ("--max-body-bytes", args.max_body_bytes, 1, ""),
        ("--max-batch", args.max_batch, 1, ""),
        ("--max-queue", args.max_queue, 1, ""),
        ("--threads", args.threads, 1, ""),
    ]
    for flag, value, least, meaning in ranges:
        if value is not None and value < least:
            return f"{flag} must be at least {least}{meaning}, got {value}"
    for flag, value, unit in (
        ("--batch-wait-ms", args.batch_wait_ms, "milliseconds"),
        ("--shutdown-timeout", args.shutdown_timeout, "seconds"),
    ):
        if not math.isfinite(value) or value < 0:
            return f"{flag} must be a finite number of {unit} >= 0, got {value}"
    if args.base_name is not None and (why := _base_name_problem(args.base_name)):
        return f"--base-name {args.base_name!r}: {why}"
    return webguard.names_problem(args.allowed_host)


def _base_name_problem(name: str) -> str | None:
    """Why a `--base-name` can't be the `model` clients send (None when it can). Slashes and colons are fine
    (`org/model`, as vLLM names its models)."""
    if not name.strip():
        return "is empty; give the name clients send as `model`, or leave it out for the base folder's name"
    if name != name.strip() or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "has spaces at an end or control characters; clients send the name exactly"
    if len(name) > 256:
        return f"is {len(name)} characters long; at most 256"
    return None


def _device_error(device: str, torch) -> str | None:
    """Why `--device` can't be used here (None when it can): checked before the model loads."""
    if device == "auto":
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N"
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {device}: torch sees no CUDA device here; use --device cpu (or auto)"
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            return f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s), numbered from 0"
    elif parsed.type != "cpu":
        return f"--device {device}: the server runs on cpu or cuda"
    return None


def freeze_startup_objects() -> None:
    """Move everything alive after start-up (the base model's modules and parameters, transformers, torch) out
    of the garbage collector's sight (`gc.freeze`), as a long-running server does once: a full collection
    otherwise walks all of it again, a pause that fell on adapter attaches (mean 12.6-13.0 ms against a median
    of ~8.5 ms in benchmarks/attach_cost.py; 8.5-10.1 ms mean with this) and on decoding steps. Frozen objects are still
    freed when their last reference goes; only reference cycles among them would stay."""
    gc.collect()
    gc.freeze()


main = serve_main
