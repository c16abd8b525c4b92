"""The engine: the base model, the adapter registry, and every operation that touches the model.

Only the scheduler's model thread calls the model (`load`, `evict`, `forward`, `classify`, `generate_static`);
the event loop reads the registry and asks the model thread for loads and unloads through `call()`.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from deltatune.checkpoint import adapter_weights_file, head_num_labels, tensor_shapes
from deltatune.methods import registry as methods  # the method table (self.registry is the adapters')
from deltatune.methods.mixed import BASE
from deltatune.model import PeftModel, read_adapter_tensors
from deltatune.serve.adapters import Entry, Registry, check_adapter_name
from deltatune.serve.command import SCHEDULERS, TASKS  # noqa: F401  (the command line's vocabulary)
from deltatune.serve.errors import ApiError, redact
from deltatune.serve.metrics import Metrics
from deltatune.tools import load_base
from deltatune.vocab import (  # DTYPES: fp32|float32, bf16|bfloat16, fp16|float16
    DTYPES,
    context_length,
    load_tokenizer,
)

logger = logging.getLogger("deltatune.serve")


class Engine:
    """The base model, its adapters, and the scheduler thread that runs every model call.

    Args:
        base: a Hugging Face model folder (or hub name).
        adapters_dir: a folder whose sub-folders holding `adapter_config.json` are served by folder name (or one
            adapter folder, served under its name); the only place runtime loads may read from.
        base_name: the `model` name that selects the base (default: the base folder's name).
        task: "auto" (from the adapters' `task_type`, else the base's architecture), "causal-lm" or "seq-cls".
        max_batch: most rows running at once (continuous) or in one call (static).
        batch_wait_ms: static scheduler: how long to wait for more rows after the first one arrives.
        max_queue: rows waiting beyond this are refused with 503.
        device: "auto" (CUDA when available), "cpu", "cuda", ...
        dtype: the base's dtype ("float32", "bfloat16", "float16").
        scheduler: "continuous" (rows join and leave the running batch at every decoding step) or "static"
            (the rows that arrive together run as one `generate`).
        max_loaded_adapters: adapters kept in memory at once (least recently used evicted beyond it).
        prefill_chunk: continuous scheduler: a prompt longer than this many tokens is prefilled this many tokens
            per step (so the running rows don't stall while it is read).
        adapter_slice: continuous scheduler: when a request waits for an adapter slot and every loaded adapter has
            running rows, the adapter that has had rows the longest, at least this many steps, is paused (its rows
            keep their caches and resume when it is loaded again) so the waiting one gets the slot; 0: never.
        max_prefill_tokens: continuous scheduler: the most prompt tokens one step prefills for new rows (the first
            prompt of a step is taken whatever its length; a prompt shared by `n` rows counts once); a burst of
            requests then joins over several steps while the running rows go on decoding; 0: no limit.
        fold_prefill: continuous scheduler: new prompts (and chunks of long ones) are prefilled inside their
            lane's decoding step, one model call for both (`packed.py`), where the model allows it; False: a
            prefill is a model call of its own, between two steps.
    """

    def __init__(
        self,
        base: str,
        adapters_dir: str | None = None,
        *,
        base_name: str | None = None,
        task: str = "auto",
        max_batch: int = 16,
        batch_wait_ms: float = 5.0,
        max_queue: int = 1024,
        device: str = "auto",
        dtype: str = "float32",
        scheduler: str = "continuous",
        max_loaded_adapters: int = 32,
        prefill_chunk: int = 256,
        adapter_slice: int = 16,
        max_prefill_tokens: int = 0,
        fold_prefill: bool = True,
    ):
        from transformers import AutoConfig

        from deltatune.serve.scheduler import ContinuousScheduler, StaticScheduler

        limits = [
            ("max_batch", max_batch, 1),
            ("max_queue", max_queue, 1),
            ("prefill_chunk", prefill_chunk, 1),
            ("adapter_slice", adapter_slice, 0),
            ("max_prefill_tokens", max_prefill_tokens, 0),
            ("batch_wait_ms", batch_wait_ms, 0),
        ]
        bad = [
            f"{k} must be >= {low}, got {v}" for k, v, low in limits if not (math.isfinite(v) and v >= low)
        ]
        if bad:
            raise ValueError("; ".join(bad))
        if task not in ("auto", *TASKS, *TASKS.values()):
            raise ValueError(f"task must be 'auto' or one of {list(TASKS)}, got {task!r}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {list(SCHEDULERS)}, got {scheduler!r}")
        self.base_name = base_name or os.path.basename(os.path.normpath(base))
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if device == "auto" else device)
        self.metrics = Metrics()

        self.task = "?"
        self.kind: str | None = "?"  # the adapters' peft_type: one kind per model (`PeftModel` holds one)
        self.registry = Registry(adapters_dir, self._check_task, max_loaded_adapters)
        found = self.registry.discover(self.base_name)
        configs = {}
        for name, directory in found.items():  # the task is decided from the configs that read
            with contextlib.suppress(Exception):
                configs[name] = self.registry.register(name, directory).config
        base_config = AutoConfig.from_pretrained(base)
        self.task = _decide_task(task, base_config, [c.task_type for c in configs.values()])
        self.kind = _decide_kind(
            [
                c.peft_type
                for c in configs.values()
                if c.task_type in (None, self.task) and methods.method_type(c.peft_type).servable
            ]
        )
        self.registry.entries.clear()
        self.registry.register_all(found)
        self.tokenizer = load_tokenizer(base)
        self.base = _load_base(
            base, self.task, self.registry.entries, self.tokenizer, DTYPES[dtype], self.device
        )
        self.peft: PeftModel | None = None
        # Adapter files are read in this thread while the model thread computes; it only attaches the weights.
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="deltatune-adapter-reader")
        self._reads: dict[str, tuple[Entry, Future]] = {}  # model thread only: reads under way or done
        self.base_labels = _base_labels(self.base.config)

        gen = getattr(self.base, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids) if self.eos_ids else 0
        self.context_length = context_length(self.base.config, self.tokenizer)
        self.vocab_size = getattr(self.base.config, "vocab_size", None) or len(self.tokenizer)
        params = inspect.signature(self.base.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.takes_positions = "position_ids" in params
        self.takes_logits_to_keep = "logits_to_keep" in params
        logger.info(
            "serving %s (%s) on %s, %d adapter%s registered (%d failed)",
            self.base_name,
            self.task,
            self.device,
            len(self.registry.entries),
            "" if len(self.registry.entries) == 1 else "s",
            len(self.registry.failed),
        )
        kind = (
            ContinuousScheduler if scheduler == "continuous" and self.task == "CAUSAL_LM" else StaticScheduler
        )
        self.scheduler_name = "continuous" if kind is ContinuousScheduler else "static"
        extra = (
            {
                "prefill_chunk": prefill_chunk,
                "adapter_slice": adapter_slice,
                "max_prefill_tokens": max_prefill_tokens,
                "fold_prefill": fold_prefill,
            }
            if kind is ContinuousScheduler
            else {}
        )
        self.scheduler = kind(
            self, max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_queue=max_queue, **extra
        )

    @property
    def batch_wait(self) -> float:
        """Static scheduler: seconds a batch waits to fill after its first row."""
        return self.scheduler.batch_wait

    @batch_wait.setter
    def batch_wait(self, seconds: float) -> None:
        self.scheduler.batch_wait = seconds

    # ---- names -------------------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """Every registered adapter (loaded or not)."""
        return self.registry.names()

    @property
    def loaded_adapters(self) -> list[str]:
        return self.registry.loaded_names()

    def resolve(self, model: str) -> str:
        """The adapter a request's `model` selects (BASE for the base); ApiError when there is none."""
        if model == self.base_name:
            return BASE
        check_adapter_name(model, "model")
        entry = self.registry.get(model)
        if entry is None:
            failed = self.registry.failed.get(model)
            if failed is not None:
                raise ApiError(
                    400, f"the adapter {model!r} can't be served: {failed}", "adapter_invalid", "model"
                )
            raise ApiError(
                404,
                f"the model {model!r} does not exist; available: {[self.base_name, *self.adapter_names][:50]}",
                "model_not_found",
                "model",
            )
        if entry.error is not None:
            raise ApiError(
                400, f"the adapter {model!r} could not be loaded: {entry.error}", "adapter_invalid", "model"
            )
        return model

    def labels(self, adapter: str) -> list[str]:
        entry = self.registry.get(adapter) if adapter != BASE else None
        return (entry.labels if entry is not None else None) or self.base_labels

    def is_solo(self, adapter: str) -> bool:
        entry = self.registry.get(adapter) if adapter != BASE else None
        return entry is not None and entry.solo

    # ---- runtime load / unload (event loop side) ---------------------------------------------------------
    def call(self, fn) -> Future:
        """Run `fn()` on the model thread, between two steps."""
        return self.scheduler.command(fn)

    def load(self, name: str, path: str | None = None) -> bool:
        """Register the adapter at `path` (under the adapters folder; default: `name`) as `name` and load it;
        False when it is registered but not loaded, because every slot holds an adapter that running rows use
        (it loads on first use, as an adapter registered at startup does). Blocking: call it from a worker
        thread."""
        check_adapter_name(name, "name")
        if name == self.base_name:
            raise ApiError(409, f"{name!r} is the base model's name", "name_taken", "name")
        directory = self.registry.runtime_dir(name, path)
        if self.registry.get(name) is not None:
            raise ApiError(409, f"an adapter named {name!r} is loaded already", "name_taken", "name")
        try:
            self.registry.register(name, directory, exclusive=True)
        except KeyError:
            raise ApiError(
                409, f"an adapter named {name!r} is loaded already", "name_taken", "name"
            ) from None
        except Exception as e:  # whatever is wrong with the files is this adapter's problem: a 400
            if not isinstance(e, (ValueError, OSError)):
                logger.exception("registering adapter %r failed", name)
            where = "" if path is None else f" (at {path!r})"
            raise ApiError(400, f"adapter {name!r}{where} could not be loaded: {e}", "adapter_invalid") from e

        entry = self.registry.get(name)
        try:  # the files are read here, in the caller's thread; the model thread only attaches them
            tensors: Any = read_adapter_tensors(directory, entry.config if entry is not None else None)
        except Exception as e:
            tensors = e

        def load_now() -> bool:
            # Never evict the adapter of a running row: it would fail as if it had been unloaded.
            try:
                return self.ensure_loaded(name, pinned=self.scheduler.pinned(), prepared=tensors)
            except ApiError:
                self.registry.unregister(name)
                raise

        return self.call(load_now).result()

    def unload(self, name: str) -> None:
        """Unregister an adapter and free its weights; its running and queued rows get 404. Blocking."""
        check_adapter_name(name, "name")
        if self.registry.get(name) is None:
            raise ApiError(404, f"no adapter named {name!r} is loaded", "model_not_found", "name")

        def unload_now() -> None:
            self._reads.pop(name, None)
            if self.registry.unregister(name) is None:
                raise ApiError(404, f"no adapter named {name!r} is loaded", "model_not_found", "name")
            if self.registry.is_loaded(name):
                self._drop(name, evicted=False)
            self.scheduler.fail_queued(
                name
            )  # (its running rows fail at the step's reaping, `_after_command`)

        self.call(unload_now).result()

    # ---- the model (model thread only) -------------------------------------------------------------------
    def ensure_loaded(
        self,
        name: str,
        pinned: set[str],
        may_load: bool = True,
        background: bool = False,
        prepared: Any = None,
    ) -> bool:
        """Make `name` loaded (evicting LRU adapters not in `pinned`); False when it can't fit right now (or
        isn't loaded and `may_load` is False). Raises ApiError (404 unknown, 400 failed load) naming it.

        `background`: don't read the files here: start reading them in the reader thread and return False until
        they are read (the scheduler is woken then), so the running rows don't wait for the disk. `prepared`: the
        files' tensors (or the exception reading them raised), read already by the caller."""
        if name == BASE:
            return True
        entry = self.registry.get(name)
        if entry is None:
            raise ApiError(404, f"the adapter {name!r} was unloaded", "model_not_found", "model")
        if entry.error is not None:
            raise ApiError(
                400, f"the adapter {name!r} could not be loaded: {entry.error}", "adapter_invalid", "model"
            )
        if self.registry.is_loaded(name):
            self.registry.touch(name)
            return True
        if not may_load:
            return False
        read = self._reads.get(name)
        if read is not None and read[0] is not entry:  # re-registered since: read it again
            del self._reads[name]
            read = None
        if background and read is None:
            if len(self._reads) >= self.registry.max_loaded:  # read ahead at most as many as fit in memory
                return False
            future = self._reader.submit(read_adapter_tensors, entry.directory, entry.config)
            self._reads[name] = (entry, future)
            future.add_done_callback(lambda _: self.call(lambda: None))  # wake the model thread
            return False
        if read is not None and not read[1].done():
            return False
        if read is not None and read[1].exception() is not None:
            del self._reads[name]
            prepared = read[1].exception()
        if isinstance(prepared, BaseException):  # unreadable files: it fails, whether a slot is free or not
            raise self._load_failed(entry, prepared)
        victims = self.registry.victims(pinned)
        if victims is None:
            return False
        if read is not None:
            del self._reads[name]
            prepared = read[1].result()
        for victim in victims:
            self._drop(victim, evicted=True)
        start = time.monotonic()
        try:
            self._load_weights(entry, prepared)
        except Exception as e:  # any failure is this adapter's: named, recorded, the server keeps serving
            raise self._load_failed(entry, e) from e
        self.registry.mark_loaded(name, time.monotonic() - start)
        self.metrics.adapter_events.labels(event="load").inc()
        self.metrics.loaded_adapters.set(len(self.registry.loaded))
        return True

    def _load_failed(self, entry: Entry, e: BaseException) -> ApiError:
        """Record why an adapter's weights failed to load (its requests get this until it is registered again)."""
        expected = isinstance(e, (ValueError, OSError))  # a bad file: its message says it all
        entry.error = redact(str(e) if expected else f"{type(e).__name__}: {e}")
        logger.warning("adapter %r failed to load: %s", entry.name, entry.error, exc_info=not expected)
        self.registry.stats.failed_loads += 1
        self.metrics.adapter_events.labels(event="failed_load").inc()
        return ApiError(
            400, f"the adapter {entry.name!r} could not be loaded: {entry.error}", "adapter_invalid", "model"
        )

    def read_ready(self, name: str) -> bool:
        """Whether `name` is not in memory and its files were read in the reader thread (it can attach now)."""
        read = self._reads.get(name)
        return read is not None and read[1].done() and not self.registry.is_loaded(name)

    def prune_reads(self, wanted: set[str]) -> None:
        """Forget the read-ahead of adapters no waiting row wants any more (their rows were cancelled): the reads
        ahead are bounded, and must not stay taken by adapters nobody waits for."""
        for name in [n for n in self._reads if n not in wanted]:
            self._reads.pop(name)[1].cancel()

    def _load_weights(self, entry: Entry, tensors: dict[str, torch.Tensor] | None = None) -> None:
        config = entry.config  # read and checked when it was registered; the tensors were checked against it
        if not methods.method_type(config.peft_type).servable:
            raise ValueError(methods.not_servable(config.peft_type))
        if self.peft is None:
            try:
                self.peft = PeftModel.from_pretrained(
                    self.base, entry.directory, adapter_name=entry.name, config=config, tensors=tensors
                )
            except Exception:
                self.base.requires_grad_(False)  # a failed load unwraps the base with gradients on
                raise
        else:
            before = set(self.peft.adapter_names)
            try:
                self.peft.load_adapter(
                    entry.directory, adapter_name=entry.name, config=config, tensors=tensors
                )
            except Exception:
                if entry.name in self.peft.adapter_names and entry.name not in before:
                    with contextlib.suppress(Exception):
                        self.peft.delete_adapter(entry.name)
                raise
        # The new adapter's layers (their dropout) to eval mode. `self.peft.eval()` would call `train()` on every
        # module of the model (~25% of an attach on a small model); the base is in eval mode already.
        for module in self.peft.modules():
            if module.training:
                module.train(False)

    def _drop(self, name: str, evicted: bool) -> None:
        if self.peft is not None and name in self.peft.adapter_names:
            if len(self.peft.adapter_names) == 1:
                self.base = self.peft.unload()
                self.base.requires_grad_(False)
                self.peft = None
            else:
                self.peft.delete_adapter(name)
        self.registry.mark_unloaded(name, evicted)
        if evicted:
            self.metrics.adapter_events.labels(event="evict").inc()
        self.metrics.loaded_adapters.set(len(self.registry.loaded))

    def module_for(self, adapters: list[str], solo: str | None) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The module to call and the extra arguments that give each row its adapter."""
        if self.peft is None:
            return self.base, {}
        if solo is not None:
            self.peft.set_adapter(solo)
            return self.peft, {}
        return self.peft, {"adapter_names": list(adapters)}

    def classify(self, rows: list) -> list[list[float]]:
        width = max(len(row.ids) for row in rows)
        batch = {
            "input_ids": torch.full((len(rows), width), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        }
        if rows[0].token_type_ids is not None:
            batch["token_type_ids"] = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            batch["input_ids"][i, : len(row.ids)] = torch.tensor(row.ids)
            batch["attention_mask"][i, : len(row.ids)] = 1
            if row.token_type_ids is not None:
                batch["token_type_ids"][i, : len(row.ids)] = torch.tensor(row.token_type_ids)
        solo = rows[0].adapter if self.is_solo(rows[0].adapter) else None
        module, extra = self.module_for([row.adapter for row in rows], solo)
        logits = module(**{k: v.to(self.device) for k, v in batch.items()}, **extra).logits.float()
        out = []
        for row, row_logits in zip(rows, logits):
            if not bool(torch.isfinite(row_logits).all()):
                from deltatune.serve.sampling import non_finite

                out.append(non_finite(row.adapter))
            else:
                out.append(row_logits.softmax(-1).cpu().tolist())
        return out

    # ---- health ------------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        reg = self.registry
        return {
            "status": "ok",
            "base": self.base_name,
            "task": self.task,
            "device": str(self.device),
            "scheduler": self.scheduler_name,
            "adapters": self.adapter_names,
            "loaded_adapters": self.loaded_adapters,
            "max_loaded_adapters": reg.max_loaded,
            "failed_adapters": {k: redact(v) for k, v in reg.failed.items()},
            "queued_rows": self.scheduler.queued(),
            "stats": {
                **self.scheduler.stats_dict(),
                "adapter_loads": reg.stats.loads,
                "adapter_evictions": reg.stats.evictions,
                "adapter_load_seconds": round(reg.stats.load_seconds, 3),
            },
        }

    def close(self) -> None:
        self.scheduler.close()
        self._reader.shutdown(wait=False, cancel_futures=True)

    def _check_task(self, config: Any) -> None:
        if self.task != "?" and config.task_type not in (None, self.task):
            raise ValueError(f"it is a {config.task_type} adapter and this server serves {self.task}")
        if not methods.method_type(config.peft_type).servable:
            raise ValueError(methods.not_servable(config.peft_type))
        if self.kind not in ("?", None, config.peft_type):
            raise ValueError(
                f"it is a {config.peft_type} adapter and this server serves {self.kind} adapters (one model holds "
                "adapters of one kind: serve these with a server of their own)"
            )
        if self.kind is None:  # no adapter at startup: the first one registered decides
            self.kind = config.peft_type


def _decide_kind(peft_types: list[str]) -> str | None:
    """The kind of adapter a server serves (a model holds adapters of one kind): LoRA when any adapter is one
    (the kind the mixed-adapter batches are built for), else the kind most adapters are (then by name); None when
    there is none yet."""
    if not peft_types:
        return None
    counts = collections.Counter(peft_types)
    return min(counts, key=lambda t: (t != "LORA", -counts[t], t))


def _decide_task(task: str, base_config: Any, task_types: list[str | None]) -> str:
    if task != "auto":
        return TASKS.get(task, task)
    kinds = {t for t in task_types if t in TASKS.values()}
    if len(kinds) == 1:
        return kinds.pop()
    if any(
        a.endswith("ForSequenceClassification") for a in getattr(base_config, "architectures", None) or []
    ):
        return "SEQ_CLS"
    return "CAUSAL_LM"


def _load_base(base, task, entries: dict[str, Entry], tokenizer, dtype, device) -> torch.nn.Module:
    num_labels = None
    if task == "SEQ_CLS":
        for entry in entries.values():
            if entry.config.task_type == "SEQ_CLS" and (num_labels := _adapter_num_labels(entry)) is not None:
                break
    model = load_base(base, task, num_labels, dtype=dtype)
    if task == "SEQ_CLS" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    return model.to(device).eval().requires_grad_(False)


def _adapter_num_labels(entry: Entry) -> int | None:
    """How many labels an adapter's classification head has (its head's shape, read from the weights' header;
    else its saved labels). The head decides: a label_map.json edited to another count made a base that no
    adapter of the server fitted."""
    with contextlib.suppress(Exception):
        if (num := head_num_labels(tensor_shapes(adapter_weights_file(entry.directory)))) is not None:
            return num
    return len(entry.labels) if entry.labels else None


def _base_labels(config: Any) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label[k]) for k in sorted(id2label, key=int)]
