"""`deltatune serve`: one base model in memory, many adapters, over an OpenAI-compatible HTTP API.

Every request row joins one queue. A single model thread takes what arrived within `batch_wait_ms` (at most
`max_batch` rows) and runs it as one mixed-adapter batch — `generate(..., adapter_names=[...])`, left-padded,
each row with its own adapter or the base. Sampling happens per row inside that one greedy call (each row's
temperature, top-p and seeded generator), so requests with any sampling settings share a batch, a greedy row
gives exactly what `generate` gives for its adapter alone, and a seeded row gives the same text whatever it was
batched with. The event loop only checks, tokenizes and waits; every tokenizer call happens on it (a fast
tokenizer is not safe to share between threads), every model call on the model thread.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from transformers import LogitsProcessor, LogitsProcessorList

from deltatune.checkpoint import head_num_labels, load_adapter_weights
from deltatune.config import CONFIG_NAME, load_config
from deltatune.methods.mixed import BASE
from deltatune.model import PeftModel
from deltatune.tools import load_base

logger = logging.getLogger(__name__)

API_KEY_ENV = "DELTATUNE_API_KEY"
TASKS = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS"}
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
_MAX_ROWS_PER_REQUEST = 256
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ApiError(Exception):
    """A refused request: an HTTP status and OpenAI's error body `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        type_: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


# ---- the model thread ---------------------------------------------------------------------------------------
@dataclass
class _Row:
    """One row of a batch: a prompt to continue (`generate`) or a text to classify (`classify`)."""

    kind: str
    adapter: str
    ids: list[int]
    max_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    token_type_ids: list[int] | None = None
    future: Future = field(default_factory=Future)


class _RowSampler(LogitsProcessor):
    """Temperature and top-p sampling per row inside a greedy `generate`: a sampling row draws its token with
    its own generator and leaves only that token finite, so the greedy step picks it; a row at temperature 0
    passes through untouched."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows
        self.generators: dict[int, torch.Generator] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()
        for i, row in enumerate(self.rows):
            if row.temperature <= 0:
                continue
            if i not in self.generators:
                seed = row.seed if row.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
                self.generators[i] = torch.Generator(device=scores.device).manual_seed(seed)
            probs = (scores[i].float() / row.temperature).softmax(-1)
            if row.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                # Keep the smallest set of most likely tokens whose mass reaches top_p (at least one).
                drop = sorted_probs.cumsum(-1) - sorted_probs >= row.top_p
                probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
            token = torch.multinomial(probs, 1, generator=self.generators[i])
            out[i] = float("-inf")
            out[i, token] = 0.0
        return out


class Engine:
    """The base model, its adapters, and the one thread that runs every model call in mixed batches.

    Args:
        base: a Hugging Face model folder (or hub name).
        adapters_dir: a folder whose sub-folders holding `adapter_config.json` are loaded by folder name, and
            the only place runtime loads may read from; None serves the base alone.
        base_name: the `model` name that selects the base (default: the base folder's name).
        task: "auto" (from the adapters' `task_type`, else the base's architecture), "causal-lm" or "seq-cls".
        max_batch: most rows in one model call.
        batch_wait_ms: how long the model thread waits for more rows after the first one arrives.
        max_queue: rows waiting beyond this are refused with 503.
        device: "auto" (CUDA when available), "cpu", "cuda", ...
        dtype: the base's dtype ("float32", "bfloat16", "float16").
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
    ):
        from transformers import AutoConfig, AutoTokenizer

        if max_batch < 1 or batch_wait_ms < 0 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1 and batch_wait_ms >= 0")
        if task not in ("auto", *TASKS, *TASKS.values()):
            raise ValueError(f"task must be 'auto' or one of {list(TASKS)}, got {task!r}")
        if adapters_dir is not None and not os.path.isdir(adapters_dir):
            raise FileNotFoundError(f"--adapters {adapters_dir!r} is not a folder")
        self.adapters_dir = os.path.realpath(adapters_dir) if adapters_dir else None
        self.base_name = base_name or os.path.basename(os.path.normpath(base))
        self.max_batch, self.batch_wait, self.max_queue = max_batch, batch_wait_ms / 1000, max_queue
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if device == "auto" else device)

        self.failed: dict[str, str] = {}
        found, configs = self._discover(), {}
        for name, directory in list(found.items()):
            try:
                configs[name] = load_config(directory)
            except (ValueError, OSError) as e:
                self._skip(name, e)
                del found[name]
        base_config = AutoConfig.from_pretrained(base)
        self.task = _decide_task(task, base_config, [c.task_type for c in configs.values()])
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.base = _load_base(base, self.task, found, configs, self.tokenizer, _DTYPES[dtype], self.device)
        self.peft: PeftModel | None = None
        self.labels: dict[str, list[str]] = {BASE: _base_labels(self.base.config)}
        self._solo: set[str] = set()

        gen = getattr(self.base, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids) if self.eos_ids else 0
        self.context_length = _context_length(self.base.config, self.tokenizer)
        self.vocab_size = getattr(self.base.config, "vocab_size", None) or len(self.tokenizer)

        self._lock = threading.Lock()
        for name, directory in found.items():
            try:
                self._load(name, directory)
            except (ValueError, OSError) as e:
                self._skip(name, e)
        logger.info(
            "serving %s (%s) on %s with adapters %s",
            self.base_name,
            self.task,
            self.device,
            self.adapter_names,
        )

        self.stats: dict[str, Any] = {
            "rows": 0,
            "model_calls": 0,
            "max_rows_per_call": 0,
            "max_adapters_per_call": 0,
        }
        self._rows_per_call: Counter[int] = Counter()
        self._queue: queue.Queue[_Row | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="deltatune-serve-model", daemon=True)
        self._thread.start()

    # ---- adapters ---------------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return self.peft.adapter_names if self.peft is not None else []

    def resolve(self, model: str) -> str:
        """The adapter a request's `model` selects (BASE for the base); ApiError when there is none."""
        if model == self.base_name:
            return BASE
        check_adapter_name(model, "model")
        if model not in self.adapter_names:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; available: {[self.base_name, *self.adapter_names]}",
                "model_not_found",
                "model",
            )
        return model

    def load(self, name: str, path: str | None = None) -> None:
        """Load the adapter at `path` (a folder under the adapters folder; default: `name`) as `name`."""
        check_adapter_name(name, "name")
        if self.adapters_dir is None:
            raise ApiError(
                400, "the server was started without --adapters; nothing can be loaded", "no_adapters_dir"
            )
        if name == self.base_name:
            raise ApiError(409, f"{name!r} is the base model's name", "name_taken", "name")
        rel = name if path is None else path
        if os.path.isabs(rel) or "\\" in rel or ".." in rel.split("/"):
            raise ApiError(
                400, "path must be relative to the adapters folder, without '..'", "invalid_path", "path"
            )
        directory = os.path.realpath(os.path.join(self.adapters_dir, rel))
        if os.path.commonpath([directory, self.adapters_dir]) != self.adapters_dir:
            raise ApiError(400, "path leads outside the adapters folder", "invalid_path", "path")
        if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
            raise ApiError(404, f"no adapter at {rel!r} in the adapters folder", "adapter_not_found", "path")
        with self._lock:
            if name in self.adapter_names:
                raise ApiError(409, f"an adapter named {name!r} is loaded already", "name_taken", "name")
            try:
                self._load(name, directory)
            except (ValueError, OSError) as e:
                raise ApiError(400, f"adapter {name!r} could not be loaded: {e}", "adapter_invalid") from e
            self.failed.pop(name, None)

    def unload(self, name: str) -> None:
        """Remove an adapter; requests already queued for it get 404."""
        check_adapter_name(name, "name")
        with self._lock:
            if name not in self.adapter_names:
                raise ApiError(404, f"no adapter named {name!r} is loaded", "model_not_found", "name")
            if len(self.adapter_names) == 1:
                self.base = self.peft.unload()
                self.base.requires_grad_(False)
                self.peft = None
            else:
                self.peft.delete_adapter(name)
            self.labels.pop(name, None)
            self._solo.discard(name)

    def _discover(self) -> dict[str, str]:
        if self.adapters_dir is None:
            return {}
        found = {}
        for entry in sorted(os.listdir(self.adapters_dir)):
            directory = os.path.join(self.adapters_dir, entry)
            if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
                continue
            if not _ADAPTER_NAME.fullmatch(entry) or entry == self.base_name:
                logger.warning(
                    "skipping %s: an adapter's folder name must be letters, digits, '-' or '_' "
                    "and differ from the base's name",
                    directory,
                )
                continue
            found[entry] = directory
        return found

    def _skip(self, name: str, error: Exception) -> None:
        logger.warning("adapter %r not loaded: %s", name, error)
        self.failed[name] = str(error)

    def _load(self, name: str, directory: str) -> None:
        config = load_config(directory)
        if config.task_type not in (None, self.task):
            raise ValueError(f"it is a {config.task_type} adapter and this server serves {self.task}")
        if config.peft_type not in ("LORA", "BOTTLENECK"):
            raise ValueError(f"{config.peft_type} checkpoints are whole models, not adapters to serve")
        if self.peft is None:
            try:
                self.peft = PeftModel.from_pretrained(self.base, directory, adapter_name=name)
            except Exception:
                self.base.requires_grad_(False)  # a failed load unwraps the base with gradients on
                raise
        else:
            self.peft.load_adapter(directory, adapter_name=name)
        self.peft.eval()
        if self.task == "SEQ_CLS":
            self.labels[name] = _adapter_labels(directory) or self.labels[BASE]
        if getattr(config, "use_dora", False):
            self._solo.add(name)  # DoRA can't share a mixed batch: its rows run in their own call

    # ---- queue and batches ------------------------------------------------------------------------------
    def submit(self, rows: list[_Row]) -> list[Future]:
        """Queue rows for the model thread; each future gets the row's result."""
        if self._queue.qsize() + len(rows) > self.max_queue:
            raise ApiError(503, "the server is busy; retry later", "overloaded", type_="server_error")
        for row in rows:
            self._queue.put(row)
        return [row.future for row in rows]

    def close(self) -> None:
        """Stop the model thread after the rows already queued."""
        self._queue.put(None)
        self._thread.join(timeout=60)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "base": self.base_name,
            "task": self.task,
            "device": str(self.device),
            "adapters": self.adapter_names,
            "failed_adapters": dict(self.failed),
            "queued_rows": self._queue.qsize(),
            "stats": {
                **self.stats,
                "rows_per_call": {str(k): v for k, v in sorted(self._rows_per_call.items())},
            },
        }

    def _loop(self) -> None:
        while True:
            rows = self._collect()
            if rows is None:
                return
            groups: dict[tuple[str, str | None], list[_Row]] = {}
            for row in rows:
                key = (row.kind, row.adapter if row.adapter in self._solo else None)
                groups.setdefault(key, []).append(row)
            for group in groups.values():
                for part in self._fit_context(group):
                    self._run(part)

    def _fit_context(self, rows: list[_Row]) -> list[list[_Row]]:
        """Split rows so no call runs past the context: left padding makes every row as long as the longest
        prompt, and every row runs for the most tokens any row asks for."""
        limit = self.context_length or float("inf")
        parts: list[list[_Row]] = []
        width = new = 0
        for row in rows:
            w, n = max(width, len(row.ids)), max(new, row.max_tokens)
            if not parts or w + n > limit:
                parts.append([])
                w, n = len(row.ids), row.max_tokens
            parts[-1].append(row)
            width, new = w, n
        return parts

    def _collect(self) -> list[_Row] | None:
        first = self._queue.get()
        if first is None:
            return None
        rows = [first]
        deadline = time.monotonic() + self.batch_wait
        while len(rows) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                row = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if row is None:
                self._queue.put(None)
                break
            rows.append(row)
        return [row for row in rows if row.future.set_running_or_notify_cancel()]

    def _run(self, rows: list[_Row]) -> None:
        live: list[_Row] = []
        try:
            with self._lock, torch.inference_mode():
                for row in rows:
                    if row.adapter == BASE or row.adapter in self.adapter_names:
                        live.append(row)
                    else:
                        row.future.set_exception(
                            ApiError(
                                404, f"the adapter {row.adapter!r} was unloaded", "model_not_found", "model"
                            )
                        )
                if not live:
                    return
                results = self._generate(live) if live[0].kind == "generate" else self._classify(live)
                self.stats["rows"] += len(live)
                self.stats["model_calls"] += 1
                self.stats["max_rows_per_call"] = max(self.stats["max_rows_per_call"], len(live))
                adapters = len({row.adapter for row in live})
                self.stats["max_adapters_per_call"] = max(self.stats["max_adapters_per_call"], adapters)
                self._rows_per_call[len(live)] += 1
        except Exception as e:
            logger.exception("a batch of %d rows failed", len(live))
            for row in live:
                if not row.future.done():
                    row.future.set_exception(e)
            return
        for row, result in zip(live, results):
            row.future.set_result(result)

    def _model_call(self, rows: list[_Row]) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The module to call and the extra arguments that give each row its adapter."""
        if self.peft is None:
            return self.base, {}
        if rows[0].adapter in self._solo:
            self.peft.set_adapter(rows[0].adapter)
            return self.peft, {}
        return self.peft, {"adapter_names": [row.adapter for row in rows]}

    def _generate(self, rows: list[_Row]) -> list[list[int]]:
        width = max(len(row.ids) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row.ids) :] = torch.tensor(row.ids)
            mask[i, width - len(row.ids) :] = 1
        module, extra = self._model_call(rows)
        processors = LogitsProcessorList([_RowSampler(rows)] if any(r.temperature > 0 for r in rows) else [])
        out = module.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=max(row.max_tokens for row in rows),
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            logits_processor=processors,
            **extra,
        )
        return [out[i, width : width + row.max_tokens].tolist() for i, row in enumerate(rows)]

    def _classify(self, rows: list[_Row]) -> list[list[float]]:
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
        module, extra = self._model_call(rows)
        logits = module(**{k: v.to(self.device) for k, v in batch.items()}, **extra).logits
        return logits.float().softmax(-1).cpu().tolist()


def check_adapter_name(name: str, param: str) -> None:
    """Refuse a name that could be a path: letters, digits, '-' and '_' only."""
    if not _ADAPTER_NAME.fullmatch(name):
        raise ApiError(
            400,
            f"invalid adapter name {name!r}: use letters, digits, '-' and '_' (no '/', '.' or '..')",
            "invalid_model_name",
            param,
        )


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


def _load_base(base, task, found, configs, tokenizer, dtype, device) -> torch.nn.Module:
    num_labels = None
    if task == "SEQ_CLS":
        for name, directory in found.items():
            if (
                configs[name].task_type == "SEQ_CLS"
                and (num_labels := _adapter_num_labels(directory)) is not None
            ):
                break
    model = load_base(base, task, num_labels, dtype=dtype)
    if task == "SEQ_CLS" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    return model.to(device).eval().requires_grad_(False)


def _adapter_num_labels(directory: str) -> int | None:
    """How many labels an adapter's classification head has (its saved labels, else its head's shape)."""
    labels = _adapter_labels(directory)
    if labels:
        return len(labels)
    with contextlib.suppress(ValueError, OSError):
        return head_num_labels(load_adapter_weights(directory))
    return None


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
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            continue
    return None


def _base_labels(config: Any) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def _context_length(config: Any, tokenizer: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 10**7 else None


# ---- requests -----------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=16)
    stream: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None


class ChatMessage(_Body):
    role: str
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ClassifyRequest(_Body):
    model: str
    input: str | list[str]


class AdapterRequest(_Body):
    name: str
    path: str | None = None


# ---- the HTTP app -------------------------------------------------------------------------------------------
class _Guard:
    """ASGI middleware: the API key (constant-time compare) and the body size cap, both before any parsing."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.api_key is not None and not self._key_ok(headers):
            error = ApiError(
                401,
                "a valid API key is needed: 'Authorization: Bearer <key>'",
                "invalid_api_key",
                type_="authentication_error",
            )
            await error.response()(scope, receive, send)
            return
        too_large = ApiError(413, f"the request body is over {self.max_body} bytes", "body_too_large")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await too_large.response()(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                await too_large.response()(scope, receive, send)
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _key_ok(self, headers: dict[bytes, bytes]) -> bool:
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        return hmac.compare_digest(given, self.api_key)


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    max_tokens_cap: int = 512,
    max_body_bytes: int = 1 << 20,
) -> FastAPI:
    """The FastAPI app over `engine` (closed when the app shuts down).

    Args:
        engine: the model and its adapters.
        api_key: when set, every endpoint needs `Authorization: Bearer <key>` (or `x-api-key: <key>`).
        max_tokens_cap: the most tokens one completion may ask for.
        max_body_bytes: bigger request bodies are refused with 413 before they are parsed.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await run_in_threadpool(engine.close)

    app = FastAPI(title="deltatune serve", lifespan=lifespan)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return ApiError(
                400,
                f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                "invalid_json",
            ).response()
        # Drop pydantic's union-member tags ("str", "list[int]") from the location: the field path stays.
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(p for p in loc if p not in ("str", "int", "float", "bool") and "[" not in p) or None
        return ApiError(400, f"{param or 'body'}: {first.get('msg')}", "invalid_value", param).response()

    @app.exception_handler(HTTPException)
    async def _http(_request, e: HTTPException):
        return ApiError(
            e.status_code, str(e.detail), "not_found" if e.status_code == 404 else None
        ).response()

    @app.exception_handler(Exception)
    async def _internal(_request, e: Exception):
        logger.exception("request failed")
        return ApiError(
            500, f"internal error: {type(e).__name__}", "internal_error", type_="server_error"
        ).response()

    @app.get("/health")
    async def health():
        return engine.health()

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [{"id": engine.base_name, "object": "model", "created": created, "owned_by": "deltatune"}]
        data += [
            {
                "id": n,
                "object": "model",
                "created": created,
                "owned_by": "deltatune",
                "parent": engine.base_name,
            }
            for n in engine.adapter_names
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/adapters")
    async def load_adapter(req: AdapterRequest):
        await run_in_threadpool(engine.load, req.name, req.path)
        return {"id": req.name, "object": "model", "parent": engine.base_name, "loaded": True}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        await run_in_threadpool(engine.unload, name)
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        _require_task(engine, "CAUSAL_LM", "/v1/completions")
        if req.echo or req.logprobs:
            raise ApiError(400, "echo and logprobs are not supported", "unsupported", "echo")
        adapter = engine.resolve(req.model)
        prompts = _prompt_ids(engine, req.prompt)
        results = await _generate(engine, adapter, prompts, req, req.max_tokens, max_tokens_cap)
        choices = [
            {"text": text, "index": i, "logprobs": None, "finish_reason": finish}
            for i, (text, finish, _) in enumerate(results)
        ]
        return _reply("cmpl", "text_completion", req.model, choices, prompts, results, req.n)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        _require_task(engine, "CAUSAL_LM", "/v1/chat/completions")
        adapter = engine.resolve(req.model)
        prompts = [_chat_ids(engine, req.messages)]
        results = await _generate(
            engine, adapter, prompts, req, req.max_completion_tokens or req.max_tokens, max_tokens_cap
        )
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            for i, (text, finish, _) in enumerate(results)
        ]
        return _reply("chatcmpl", "chat.completion", req.model, choices, prompts, results, req.n)

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest):
        _require_task(engine, "SEQ_CLS", "/v1/classify")
        adapter = engine.resolve(req.model)
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts or len(texts) > _MAX_ROWS_PER_REQUEST:
            raise ApiError(
                400, f"input must hold 1 to {_MAX_ROWS_PER_REQUEST} texts", "invalid_value", "input"
            )
        enc = engine.tokenizer(texts)
        rows = []
        for i, ids in enumerate(enc["input_ids"]):
            _check_length(engine, len(ids), 0, "input")
            types = enc["token_type_ids"][i] if "token_type_ids" in enc else None
            rows.append(_Row("classify", adapter, ids, token_type_ids=types))
        probs = await _wait(engine, rows)
        labels = engine.labels.get(adapter) or engine.labels[BASE]
        data = []
        for i, p in enumerate(probs):
            names = labels if len(labels) == len(p) else [f"LABEL_{j}" for j in range(len(p))]
            best = max(range(len(p)), key=p.__getitem__)
            data.append(
                {"index": i, "label": names[best], "score": p[best], "probabilities": dict(zip(names, p))}
            )
        tokens = sum(len(ids) for ids in enc["input_ids"])
        return {
            "id": f"clf-{uuid.uuid4().hex}",
            "object": "classification",
            "created": int(time.time()),
            "model": req.model,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    return app


def _require_task(engine: Engine, task: str, endpoint: str) -> None:
    if engine.task != task:
        other = "/v1/classify" if engine.task == "SEQ_CLS" else "/v1/completions"
        raise ApiError(
            400,
            f"{endpoint} needs a {task} model; this server serves {engine.task}: use {other}",
            "wrong_task",
        )


def _prompt_ids(engine: Engine, prompt: str | list) -> list[list[int]]:
    if isinstance(prompt, str) or prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt or len(prompt) > _MAX_ROWS_PER_REQUEST:
        raise ApiError(
            400, f"prompt must hold 1 to {_MAX_ROWS_PER_REQUEST} prompts", "invalid_value", "prompt"
        )
    out = []
    for p in prompt:
        ids = engine.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p)
        if not ids:
            raise ApiError(400, "the prompt is empty", "invalid_value", "prompt")
        if any(not 0 <= t < engine.vocab_size for t in ids):
            raise ApiError(
                400, f"prompt token ids must lie in [0, {engine.vocab_size})", "invalid_value", "prompt"
            )
        out.append(ids)
    return out


def _chat_ids(engine: Engine, messages: list[ChatMessage]) -> list[int]:
    if not getattr(engine.tokenizer, "chat_template", None):
        raise ApiError(
            400, "this model's tokenizer has no chat template; use /v1/completions", "no_chat_template"
        )
    try:
        text = engine.tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # the template itself may raise (a role it doesn't allow, say)
        raise ApiError(
            400, f"the chat template refused the messages: {e}", "invalid_value", "messages"
        ) from e
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ApiError(400, "the messages are empty", "invalid_value", "messages")
    return ids


def _check_length(engine: Engine, prompt_tokens: int, max_tokens: int, param: str) -> None:
    if engine.context_length is not None and prompt_tokens + max_tokens > engine.context_length:
        raise ApiError(
            400,
            f"this model's maximum context length is {engine.context_length} tokens; you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} to generate)",
            "context_length_exceeded",
            param,
        )


async def _wait(engine: Engine, rows: list[_Row]) -> list[Any]:
    futures = [asyncio.wrap_future(f) for f in engine.submit(rows)]
    try:
        return list(await asyncio.gather(*futures))
    finally:
        for f in futures:
            f.cancel()


async def _generate(
    engine: Engine, adapter: str, prompts: list[list[int]], req: _Sampling, max_tokens: int | None, cap: int
) -> list[tuple[str, str, int]]:
    """(text, finish_reason, completion tokens) per choice: `n` choices per prompt, in OpenAI's order."""
    max_tokens = 16 if max_tokens is None else max_tokens
    if max_tokens > cap:
        raise ApiError(
            400,
            f"max_tokens is {max_tokens}; this server allows at most {cap}",
            "max_tokens_exceeded",
            "max_tokens",
        )
    if req.stream:
        raise ApiError(400, "streaming is not supported; send stream=false", "unsupported", "stream")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 16 or any(not s for s in stops):
        raise ApiError(400, "stop must be up to 16 non-empty strings", "invalid_value", "stop")
    n = req.n or 1
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    rows = []
    for ids in prompts:
        _check_length(engine, len(ids), max_tokens, "max_tokens")
        for j in range(n):
            seed = None if req.seed is None else (req.seed + j) % 2**63
            rows.append(_Row("generate", adapter, ids, max_tokens, temperature, top_p, seed))
    if len(rows) > _MAX_ROWS_PER_REQUEST:
        raise ApiError(400, f"prompts x n must be at most {_MAX_ROWS_PER_REQUEST}", "invalid_value", "n")
    outputs = await _wait(engine, rows)
    return [_finish(engine, tokens, stops) for tokens in outputs]


def _finish(engine: Engine, tokens: list[int], stops: list[str]) -> tuple[str, str, int]:
    reason, count = "length", len(tokens)
    for i, t in enumerate(tokens):
        if t in engine.eos_ids:
            tokens, reason, count = tokens[:i], "stop", i + 1
            break
    text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        text, reason = text[:cut], "stop"
    return text, reason, count


def _reply(prefix, obj, model, choices, prompts, results, n) -> dict[str, Any]:
    prompt_tokens = sum(len(p) for p in prompts) * (n or 1)
    completion_tokens = sum(r[2] for r in results)
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


# ---- the command --------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deltatune serve",
        description="Serve one base model and many adapters over an OpenAI-compatible HTTP API.",
    )
    p.add_argument("--base", required=True, help="base model folder (or hub name)")
    p.add_argument("--adapters", help="folder whose sub-folders are adapters, each served by its folder name")
    p.add_argument(
        "--base-name", help="the `model` name that selects the base (default: the base folder's name)"
    )
    p.add_argument("--task", choices=["auto", *TASKS], default="auto", help="default: from the adapters")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help=f"require this key on every endpoint (or set ${API_KEY_ENV})")
    p.add_argument("--max-tokens-cap", type=int, default=512, help="most tokens one completion may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="bigger request bodies get 413")
    p.add_argument("--max-batch", type=int, default=16, help="most rows in one model call")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long to wait for a batch to fill")
    p.add_argument("--max-queue", type=int, default=1024, help="waiting rows beyond this get 503")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=list(_DTYPES), default="float32")
    p.add_argument("--threads", type=int, help="CPU threads for the model (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def serve_main(argv: list[str] | None = None) -> int:
    """`deltatune serve`: load the base and the adapters, then answer HTTP until interrupted."""
    import uvicorn

    args = _parser().parse_args(argv)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.adapters is not None and not os.path.isdir(args.adapters):
        logger.error("--adapters %r is not a folder", args.adapters)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine(
        args.base,
        args.adapters,
        base_name=args.base_name,
        task=args.task,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue,
        device=args.device,
        dtype=args.dtype,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        logger.warning("listening on %s without an API key: anyone who can reach it can use it", args.host)
    app = create_app(
        engine, api_key=api_key, max_tokens_cap=args.max_tokens_cap, max_body_bytes=args.max_body_bytes
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


main = serve_main
