"""`deltatune serve`: one base model in memory, many adapters, over an OpenAI-compatible HTTP API.

The package shows the design, one file each:

- `app`: the HTTP app (FastAPI), request models, the guard (API key, body cap, no 500 leaking), streaming.
- `scheduler`: the model thread; continuous batching (rows join and leave the running batch at every decoding
  step, each with its own KV cache rows and adapter; long prompts prefilled in chunks between steps; adapters
  take turns in the memory slots when more are wanted than fit) or static batching (`--scheduler static`).
- `kvcache`: the running batch's KV cache, one preallocated slot per row (cheap joins and leaves).
- `adapters`: the registry of adapter folders (names, the symlink rule, configs checked at startup) and the
  LRU bookkeeping of the ones in memory.
- `engine`: the base model and every operation on it (load/evict adapters, forward, classify).
- `sampling`: each row's next token (greedy, temperature, top-p, its own seeded generator).
- `errors`, `metrics`, `command`: OpenAI's error body without server paths, Prometheus metrics, the CLI.
"""

import importlib

# Names are imported when first used (PEP 562), so that `deltatune serve --help` stays light: the command
# line needs only `command`, the model code (torch, transformers) loads when the server starts.
_HOMES = {
    "NAME_RULE": "adapters",
    "check_adapter_name": "adapters",
    "create_app": "app",
    "API_KEY_ENV": "command",
    "main": "command",
    "serve_main": "command",
    "Engine": "engine",
    "ApiError": "errors",
    "Row": "scheduler",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'deltatune.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"deltatune.serve.{_HOMES[name]}"), name)


__all__ = sorted(_HOMES)
