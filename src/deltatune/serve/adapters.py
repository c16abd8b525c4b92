"""The adapter registry: every adapter folder the server knows, which of them are in memory, and the rules.

Folders under `--adapters` are *registered* at startup: their name is checked and their config read and checked,
their weights are not loaded. Weights load on first use (on the model thread) and the least recently used
adapter not needed by a running row is evicted beyond `max_loaded`. The registry does the bookkeeping; the
engine does the loading.

Names: letters, digits, '-' and '_' (1 to 128), not starting with '_' or '-', and not a name `torch.nn.Module`
uses itself (`train`, `to`, `forward`, `training`, ...): adapters live in module dictionaries keyed by name.

Symlinks, at startup and at runtime alike: an adapter folder, and every file the server reads from it, must
resolve (after following symlinks) to a place inside the `--adapters` folder. Links that stay inside are fine;
anything leading outside is refused (skipped at startup and listed in `/health`; a 400 at runtime).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from deltatune.checkpoint import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, run_adapter
from deltatune.config import CONFIG_NAME, load_config
from deltatune.methods.mixed import BASE
from deltatune.serve.errors import ApiError, hide_root, redact

_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
RESERVED = frozenset(n for n in dir(nn.ModuleDict()) if not n.startswith("__")) | {BASE}
NAME_RULE = (
    "an adapter name is 1 to 128 letters, digits, '-' or '_', starts with a letter or digit, and is not a name "
    "torch.nn.Module uses itself (such as 'train', 'to', 'forward', 'half', 'training')"
)
SERVED_FILES = (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, "label_map.json", "config.json")


def name_error(name: Any) -> str | None:
    """Why `name` can't be an adapter's name (None when it can)."""
    if not isinstance(name, str) or not _PATTERN.fullmatch(name):
        return f"invalid adapter name {name!r}: {NAME_RULE}"
    if name in RESERVED:
        return f"the adapter name {name!r} is reserved: {NAME_RULE}"
    return None


def check_adapter_name(name: Any, param: str) -> None:
    """Refuse a bad adapter name with a 400 that states the rule."""
    if (why := name_error(name)) is not None:
        raise ApiError(400, why, "invalid_model_name", param)


@dataclass
class Entry:
    """A registered adapter: where it is, its checked config, and its labels (classification)."""

    name: str
    directory: str
    config: Any
    labels: list[str] | None = None
    solo: bool = False  # DoRA: can't share a mixed batch
    error: str | None = None  # its weights failed to load (until registered again)


@dataclass
class AdapterStats:
    loads: int = 0
    evictions: int = 0
    failed_loads: int = 0
    load_seconds: float = 0.0
    by_name: dict[str, int] = field(default_factory=dict)


class Registry:
    """Registered adapters (thread-safe lookups) and the LRU order of the loaded ones (model thread only)."""

    def __init__(self, root: str | None, task_check, max_loaded: int):
        if max_loaded < 1:
            raise ValueError(
                f"--max-loaded-adapters must be at least 1 (one batch needs at least one adapter in memory), "
                f"got {max_loaded}"
            )
        self.max_loaded = max_loaded
        self.task_check = task_check  # config -> None, or raises ValueError when this server can't serve it
        self.entries: dict[str, Entry] = {}
        self.failed: dict[str, str] = {}
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.stats = AdapterStats()
        self._lock = threading.Lock()
        self.single = False
        if root is None:
            self.root = None
            return
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"--adapters {os.path.basename(os.path.normpath(root))!r} is not a folder"
            )
        self.root = os.path.realpath(root)
        # `--adapters` may be one adapter folder itself, or one `deltatune train` run folder: it is served
        # under its folder name.
        self.single = os.path.isfile(os.path.join(self.root, CONFIG_NAME)) or bool(run_adapter(self.root))
        shown = os.path.basename(self.root) if self.single else "<adapters>"
        hide_root(root, shown)

    # ---- discovery and registration ------------------------------------------------------------------
    def discover(self, base_name: str) -> dict[str, str]:
        """Adapter folders under the root by name (bad names are listed in `failed`)."""
        if self.root is None:
            return {}
        if self.single:
            candidates = [(os.path.basename(self.root), self.root)]
        else:
            candidates = [(e, os.path.join(self.root, e)) for e in sorted(os.listdir(self.root))]
        found = {}
        for entry, directory in candidates:
            # a `deltatune train` run folder (`--adapters runs`) is served by its run's name, from its adapter/
            directory = run_adapter(directory) or directory
            if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
                continue
            why = name_error(entry) or (f"{entry!r} is the base model's name" if entry == base_name else None)
            if why is None:
                why = self._outside(directory)
            if why is not None:
                self._fail(entry, why)
                continue
            found[entry] = directory
        return found

    def _outside(self, directory: str) -> str | None:
        """The symlink rule: None when the folder and the files served from it resolve inside the root."""
        real = os.path.realpath(directory)
        if not _inside(real, self.root):
            return "the folder is a link leading outside the adapters folder"
        for name in SERVED_FILES:
            path = os.path.join(directory, name)
            if os.path.lexists(path) and not _inside(os.path.realpath(path), self.root):
                return f"{name} is a link leading outside the adapters folder"
        return None

    def register(self, name: str, directory: str, exclusive: bool = False) -> Entry:
        """Read and check an adapter's config and its weights' header (no tensor is loaded); raises ValueError
        saying which file and field is wrong (not where the folder is), or KeyError when `exclusive` and the
        name is taken."""
        _check_config_file(directory)
        try:
            config = load_config(directory)
        except Exception as e:  # any malformed field: the message names the file and the problem
            raise ValueError(f"{CONFIG_NAME} is invalid: {_short(e)}") from e
        self.task_check(config)
        _check_weights_header(directory, config)
        entry = Entry(
            name,
            directory,
            config,
            labels=_adapter_labels(directory),
            solo=bool(getattr(config, "use_dora", False)),
        )
        with self._lock:
            if exclusive and name in self.entries:
                raise KeyError(name)
            self.entries[name] = entry
            self.failed.pop(name, None)
        return entry

    def register_all(self, found: dict[str, str]) -> None:
        for name, directory in found.items():
            try:
                self.register(name, directory)
            except (ValueError, OSError) as e:
                self._fail(name, str(e))
            except Exception as e:  # a bug here must not stop the server from starting: skip, log, list it
                logging.getLogger("deltatune.serve").exception("registering adapter %r failed", name)
                self._fail(name, f"{type(e).__name__}: {e}")

    def _fail(self, name: str, why: str) -> None:
        logging.getLogger("deltatune.serve").warning("adapter %r skipped: %s", name, why)
        with self._lock:
            self.failed[name] = redact(why)

    def unregister(self, name: str) -> Entry | None:
        with self._lock:
            return self.entries.pop(name, None)

    def runtime_dir(self, name: str, path: str | None) -> str:
        """The folder `POST /v1/adapters` may load (`path` relative to the root; default: `name`)."""
        if self.root is None:
            raise ApiError(
                400, "the server was started without --adapters; nothing can be loaded", "no_adapters_dir"
            )
        rel = name if path is None else path
        if "\x00" in rel or os.path.isabs(rel) or "\\" in rel or ".." in rel.split("/"):
            raise ApiError(
                400,
                "path must be relative to the adapters folder, without '..' or NUL",
                "invalid_path",
                "path",
            )
        directory = os.path.join(self.root, rel)
        directory = run_adapter(directory) or directory  # a run folder: its adapter/, as at startup
        if not _inside(os.path.realpath(directory), self.root):
            raise ApiError(400, "path leads outside the adapters folder", "invalid_path", "path")
        if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
            raise ApiError(404, f"no adapter at {rel!r} in the adapters folder", "adapter_not_found", "path")
        if (why := self._outside(directory)) is not None:
            raise ApiError(400, f"adapter at {rel!r}: {why}", "invalid_path", "path")
        return directory

    # ---- lookups ---------------------------------------------------------------------------------------
    def get(self, name: str) -> Entry | None:
        with self._lock:
            return self.entries.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self.entries)

    def is_loaded(self, name: str) -> bool:
        return name in self.loaded

    # ---- LRU (model thread) ------------------------------------------------------------------------------
    def touch(self, name: str) -> None:
        with self._lock:
            if name in self.loaded:
                self.loaded.move_to_end(name)

    def loaded_names(self) -> list[str]:
        with self._lock:
            return list(self.loaded)

    def victims(self, pinned: set[str]) -> list[str] | None:
        """Loaded adapters to evict so one more fits (LRU first, never a pinned one); None when it can't fit."""
        need = len(self.loaded) + 1 - self.max_loaded
        if need <= 0:
            return []
        out = [n for n in self.loaded if n not in pinned][:need]
        return out if len(out) == need else None

    def mark_loaded(self, name: str, seconds: float) -> None:
        with self._lock:
            self.loaded[name] = None
        self.stats.loads += 1
        self.stats.load_seconds += seconds

    def mark_unloaded(self, name: str, evicted: bool) -> None:
        with self._lock:
            self.loaded.pop(name, None)
        if evicted:
            self.stats.evictions += 1


_DICT_FIELDS = ("rank_pattern", "alpha_pattern")


def _check_config_file(directory: str) -> None:
    """The config file is UTF-8 JSON holding an object, and the fields that must be objects are."""
    path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
        data = json.loads(raw.decode("utf-8-sig"))  # -sig: a byte-order mark is skipped, as load_config does
    except UnicodeDecodeError as e:
        raise ValueError(f"{CONFIG_NAME} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{CONFIG_NAME} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{CONFIG_NAME} must hold a JSON object, not {type(data).__name__}")
    for key in _DICT_FIELDS:
        if key in data and not isinstance(data[key], dict):
            raise ValueError(
                f"{CONFIG_NAME}: {key} must be an object mapping module patterns to numbers (or be left out), "
                f"got {json.dumps(data[key])[:80]}"
            )


def _check_weights_header(directory: str, config: Any) -> None:
    """The weights file is there and its safetensors header reads; a LoRA config's rank is not larger than the
    saved matrices (a typo like r=300000 would otherwise allocate before the shape check). No tensor is loaded."""
    from safetensors import safe_open

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, LEGACY_WEIGHTS_NAME)):
            return  # read (without unpickling) when loaded
        raise ValueError(f"no {WEIGHTS_NAME} in its folder")
    try:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
            if not keys:
                raise ValueError("it holds no tensors")
            ranks = [f.get_slice(k).get_shape()[0] for k in keys if "lora_A" in k]
    except Exception as e:
        raise ValueError(f"{WEIGHTS_NAME} is corrupt or not safetensors: {_short(e)}") from e
    r = getattr(config, "r", None)
    if ranks and isinstance(r, int) and r > max(ranks) and not getattr(config, "rank_pattern", None):
        raise ValueError(
            f"{CONFIG_NAME}: r is {r} but the saved LoRA matrices have rank {max(ranks)}; fix r in the config"
        )


def _inside(path: str, root: str) -> bool:
    return path == root or os.path.commonpath([path, root]) == root


def _short(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
    return text if len(text) < 300 else text[:297] + "..."


def _adapter_labels(directory: str) -> list[str] | None:
    """Labels saved next to an adapter: `label_map.json` (`{label: id}`, as `deltatune train` writes it), or
    `id2label` in a `config.json` (transformers' format)."""
    for name in ("label_map.json", "config.json"):
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                data = json.load(f)
            id2label = {v: k for k, v in data.items()} if name == "label_map.json" else data.get("id2label")
            if id2label:
                return [str(id2label[k]) for k in sorted(id2label, key=int)]
        except (OSError, ValueError, AttributeError, KeyError, TypeError, RecursionError):
            continue
    return None


def now() -> float:
    return time.monotonic()
