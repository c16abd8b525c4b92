"""`deltatune ui`: a local web board for runs, comparisons, launching jobs and trying adapters.

    deltatune ui [--runs DIR] [--port 7860] [--host 127.0.0.1] [--api-key KEY]

- `runs.py`: finds train output folders and compare folders under `--runs` and reads them (read-only);
- `jobs.py`: starts `deltatune train` / `deltatune compare` as subprocesses, streams their output, stops them
  with SIGTERM (train then saves a resumable checkpoint);
- `playground.py`: a base with one or two adapters, answers side by side (`deltatune generate`'s code);
- `app.py`: the FastAPI app; `static/`: the page (vanilla JS, charts drawn as SVG, nothing fetched online).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

API_KEY_ENV = "DELTATUNE_API_KEY"

from deltatune.cli import HelpFormatter, api_key_from, listen_problem  # noqa: E402
from deltatune.webguard import (  # noqa: E402
    ALLOWED_HOST_HELP,
    allowed_hosts_for,
    is_loopback,
    names_problem,
)

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        prog="deltatune ui",
        description="A local web board: runs and their live curves, compare tables and charts, launch train "
        "or compare from a form, and a playground for adapters.",
    )
    p.add_argument(
        "--runs", default="runs", help="folder holding train and compare output folders (default runs)"
    )
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--allowed-host", action="append", metavar="NAME", help=ALLOWED_HOST_HELP)
    p.add_argument("--port", type=int, default=7860, help="TCP port to listen on")
    p.add_argument("--api-key", help=f"require this key on every page and endpoint (or set ${API_KEY_ENV})")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import uvicorn

    from deltatune.ui.app import create_app

    api_key, problem = api_key_from(args.api_key, API_KEY_ENV)
    if problem is None and os.path.exists(args.runs) and not os.path.isdir(args.runs):
        problem = f"--runs {args.runs!r} is a file; give a folder"
    problem = problem or names_problem(args.allowed_host) or listen_problem(args.host, args.port)
    if problem is not None:
        print(f"deltatune ui: error: {problem}", file=sys.stderr, flush=True)
        return 2
    if not is_loopback(args.host) and api_key is None:
        logger.warning("listening on %s without an API key: anyone who can reach it can use it", args.host)
    where = os.path.abspath(args.runs)
    if not os.path.isdir(args.runs):  # a mistyped --runs would show an empty board and say nothing
        where += ": a new folder, so no runs to show yet; runs launched from the board are written there"
    # bound to this machine only: refuse a Host header naming anything else (DNS rebinding, see webguard.py)
    extra = tuple(args.allowed_host or ())  # normalized where compared (`webguard.allowed_set`)
    app = create_app(
        args.runs, api_key=api_key, allowed_hosts=allowed_hosts_for(args.host, extra), proxy_hosts=extra
    )
    shown = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host  # IPv6
    print(f"deltatune ui: http://{shown}:{args.port}/  (runs: {where})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


ui_main = main
