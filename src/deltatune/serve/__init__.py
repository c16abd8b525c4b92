"""`deltatune serve`: one base model in memory, many adapters, over an OpenAI-compatible HTTP API.

The package shows the design, one file each:

- `app`: the HTTP app (FastAPI), request models, the guard (API key, body cap, no 500 leaking), streaming.
- `scheduler`: the model thread; continuous batching (rows join and leave the running batch at every decoding
  step, each with its own KV cache rows and adapter) or static batching (`--scheduler static`).
- `adapters`: the registry of adapter folders (names, the symlink rule, configs checked at startup) and the
  LRU bookkeeping of the ones in memory.
- `engine`: the base model and every operation on it (load/evict adapters, forward, classify).
- `sampling`: each row's next token (greedy, temperature, top-p, its own seeded generator).
- `errors`, `metrics`, `command`: OpenAI's error body without server paths, Prometheus metrics, the CLI.
"""

from deltatune.serve.adapters import NAME_RULE, check_adapter_name
from deltatune.serve.app import create_app
from deltatune.serve.command import API_KEY_ENV, main, serve_main
from deltatune.serve.engine import Engine
from deltatune.serve.errors import ApiError
from deltatune.serve.scheduler import Row

__all__ = [
    "API_KEY_ENV",
    "NAME_RULE",
    "ApiError",
    "Engine",
    "Row",
    "check_adapter_name",
    "create_app",
    "main",
    "serve_main",
]
