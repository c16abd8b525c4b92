"""The HTTP app: request models, the guard (API key, body cap, no 500 leaks), and the OpenAI-compatible
endpoints, streaming included.

The event loop only checks, tokenizes, decodes and waits; every tokenizer call happens on it (a fast tokenizer
is not safe to share between threads), every model call on the scheduler's model thread. Rows report tokens
through a queue per request; the loop turns them into text (holding back what could still become a stop
string or half a character), so streamed text concatenates to exactly the non-streamed text.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from deltatune import webguard
from deltatune.methods.mixed import BASE
from deltatune.serve.engine import Engine
from deltatune.serve.errors import ApiError, redact, shutting_down
from deltatune.serve.scheduler import Row

logger = logging.getLogger("deltatune.serve")

MAX_ROWS_PER_REQUEST = 256


# ---- requests -----------------------------------------------------------------------------------------------
def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"the text holds a lone surrogate ({value[e.start]!r} at {e.start}); send valid Unicode"
        ) from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool | None = None


class _Sampling(_Body):
    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=16)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[Text, float] | None = None

    def unsupported(self) -> list[tuple[str, bool]]:
        """(field, whether this request sets it to something this server doesn't do): OpenAI's fields are read
        so that such a value is refused, not silently ignored; their defaults (which clients such as LangChain
        send on every request) are accepted."""
        return []


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[StrictInt] | list[list[StrictInt]]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = Field(None, ge=1, le=16)
    suffix: Text | None = None

    def unsupported(self) -> list[tuple[str, bool]]:
        return [
            *super().unsupported(),
            ("echo", bool(self.echo)),
            ("logprobs", self.logprobs is not None),  # 0 asks for the sampled token's logprob; null is off
            ("best_of", self.best_of not in (None, 1, self.n or 1)),  # best_of == n picks nothing
            ("suffix", bool(self.suffix)),
        ]


class ContentPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Text
    content: Text | list[ContentPart]

    def as_dict(self) -> dict[str, str]:
        """The message for the chat template: text parts joined by newlines (OpenAI's list-of-parts form)."""
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    functions: list[Any] | None = None

    def unsupported(self) -> list[tuple[str, bool]]:
        return [
            *super().unsupported(),
            ("logprobs", bool(self.logprobs)),
            ("tools", bool(self.tools)),
            ("tool_choice", self.tool_choice not in (None, "none", "auto")),
            ("response_format", self.response_format not in (None, {"type": "text"})),
            ("functions", bool(self.functions)),
        ]


def _refuse_unsupported(req: _Sampling) -> None:
    """A 400 naming the first field set to something this server doesn't do, instead of ignoring it."""
    for field, used in req.unsupported():
        if used:
            raise ApiError(
                400,
                f"{field} is not supported by this server: leave it out (or at its default) and send the request "
                "again",
                "unsupported",
                field,
            )


class ClassifyRequest(_Body):
    model: Text
    input: Text | list[Text]


class AdapterRequest(_Body):
    name: Text
    path: Text | None = None


# ---- the guard ----------------------------------------------------------------------------------------------
class _Guard:
    """ASGI middleware: the API key (constant-time compare) and the body size cap, both before any parsing; and
    the last line: an exception nothing else handled is logged with its traceback here and answered with a
    JSON error, the connection kept."""

    def __init__(
        self, app, api_key: str | None, max_body_bytes: int, allowed_hosts: tuple[str, ...] | None = None
    ):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes
        self.allowed = webguard.allowed_set(allowed_hosts)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if problem := webguard.host_problem(headers, self.allowed):  # DNS rebinding (see webguard)
            await ApiError(403, problem, "host_not_allowed", type_="permission_error").response()(
                scope, receive, send
            )
            return
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

        started = False

        async def watch(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, replay, watch)
        except asyncio.CancelledError:
            # The server cancelled this request: a graceful shutdown that ran out of time (`--shutdown-timeout`).
            # Its rows were freed on the way out. Not a bug, so no traceback: a 503 when nothing was sent yet, else
            # the answer stays cut short (no `[DONE]`), which the client sees as a broken stream.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            logger.warning("%s %s cancelled by the server's shutdown", scope.get("method"), scope.get("path"))
            if not started:
                with contextlib.suppress(Exception):
                    await shutting_down().response()(scope, receive, send)
        except Exception as e:
            logger.error(
                "unhandled error on %s %s\n%s", scope.get("method"), scope.get("path"), traceback.format_exc()
            )
            if not started:
                error = ApiError(
                    500,
                    f"internal error ({type(e).__name__}); it is logged on the server",
                    "internal_error",
                    type_="server_error",
                )
                await error.response()(scope, receive, send)

    def _key_ok(self, headers: dict[bytes, bytes]) -> bool:
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        return hmac.compare_digest(given, self.api_key)


# ---- the app ------------------------------------------------------------------------------------------------
def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    max_tokens_cap: int = 512,
    max_body_bytes: int = 1 << 20,
    allowed_hosts: tuple[str, ...] | None = None,
) -> FastAPI:
    """The FastAPI app over `engine` (closed when the app shuts down).

    Args:
        engine: the model and its adapters.
        api_key: when set, every endpoint needs `Authorization: Bearer <key>` (or `x-api-key: <key>`).
        max_tokens_cap: the most tokens one completion may ask for.
        max_body_bytes: bigger request bodies are refused with 413 before they are parsed.
        allowed_hosts: when set, a request's `Host` header must name one of them, else 403 (`deltatune serve`
            passes this machine's names when it binds a loopback address: see `deltatune.webguard`).
    """

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await run_in_threadpool(engine.close)

    app = FastAPI(title="deltatune serve", lifespan=lifespan)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, allowed_hosts=allowed_hosts)
    metrics = engine.metrics

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
        param = (
            ".".join(
                p
                for p in loc
                if p not in ("str", "int", "float", "bool") and "[" not in p and "function-after" not in p
            )
            or None
        )
        return ApiError(400, f"{param or 'body'}: {first.get('msg')}", "invalid_value", param).response()

    @app.exception_handler(HTTPException)
    async def _http(_request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        detail = str(e.detail)
        if e.status_code == 400 and detail == "There was an error parsing the body":  # (FastAPI's words)
            code, detail = "invalid_json", "the request body could not be parsed: send JSON encoded as UTF-8"
        return ApiError(e.status_code, detail, code, headers=e.headers).response()  # 405: its Allow

    @app.get("/health")
    async def health():
        return engine.health()

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    registered: dict[str, int] = {}  # a model's `created`: when this server first listed it, then the same

    def card(name: str, now: int, loaded: set[str]) -> dict[str, Any]:
        """One model as OpenAI lists it: the base, or an adapter (with its `parent`). `created` is stable: a
        listing and a retrieval of the same model agree (it was the time of each request)."""
        created = registered.setdefault(name, now)
        if name == engine.base_name:
            return {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "deltatune",
                "loaded": True,
            }
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "deltatune",
            "parent": engine.base_name,
            "loaded": name in loaded,
        }

    @app.get("/v1/models")
    async def models():
        created, loaded = int(time.time()), set(engine.loaded_adapters)
        names = [engine.base_name, *engine.adapter_names]
        return {"object": "list", "data": [card(n, created, loaded) for n in names]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):  # OpenAI's "retrieve model" (`client.models.retrieve`)
        if model != engine.base_name:
            engine.resolve(model)  # 400 for a bad name or a failed adapter, 404 for an unknown one
        return card(model, int(time.time()), set(engine.loaded_adapters))

    @app.post("/v1/adapters")
    async def load_adapter(req: AdapterRequest):
        loaded = await run_in_threadpool(engine.load, req.name, req.path)
        registered[req.name] = int(time.time())  # registered (again) now
        return {"id": req.name, "object": "model", "parent": engine.base_name, "loaded": loaded}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        await run_in_threadpool(engine.unload, name)
        registered.pop(name, None)
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        _require_task(engine, "CAUSAL_LM", "/v1/completions")
        _refuse_unsupported(req)
        adapter = engine.resolve(req.model)
        prompts = _prompt_ids(engine, req.prompt)
        job = _Job(engine, adapter, prompts, req, req.max_tokens, max_tokens_cap, "completions", request)
        return await job.respond(chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        _require_task(engine, "CAUSAL_LM", "/v1/chat/completions")
        _refuse_unsupported(req)
        adapter = engine.resolve(req.model)
        prompts = [_chat_ids(engine, req.messages)]
        limit = req.max_completion_tokens or req.max_tokens
        job = _Job(engine, adapter, prompts, req, limit, max_tokens_cap, "chat", request)
        return await job.respond(chat=True)

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest):
        _require_task(engine, "SEQ_CLS", "/v1/classify")
        adapter = engine.resolve(req.model)
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts or len(texts) > MAX_ROWS_PER_REQUEST:
            raise ApiError(
                400, f"input must hold 1 to {MAX_ROWS_PER_REQUEST} texts", "invalid_value", "input"
            )
        enc = engine.tokenizer(texts)
        rows = []
        for i, ids in enumerate(enc["input_ids"]):
            if not ids:  # (a tokenizer that adds no special tokens, and a text of blanks)
                raise ApiError(
                    400, f"input[{i}] has no tokens: send text to classify", "invalid_value", "input"
                )
            _check_length(engine, len(ids), 0, "input")
            types = enc["token_type_ids"][i] if "token_type_ids" in enc else None
            rows.append(Row("classify", adapter, ids, token_type_ids=types))
        probs = await _results(engine, rows)
        labels = engine.labels(adapter)
        data = []
        for i, p in enumerate(probs):
            names = labels if len(labels) == len(p) else [f"LABEL_{j}" for j in range(len(p))]
            best = max(range(len(p)), key=p.__getitem__)
            data.append(
                {"index": i, "label": names[best], "score": p[best], "probabilities": dict(zip(names, p))}
            )
        tokens = sum(len(ids) for ids in enc["input_ids"])
        metrics.requests.labels("classify", _label(adapter, engine), "200").inc()
        return {
            "id": f"clf-{uuid.uuid4().hex}",
            "object": "classification",
            "created": int(time.time()),
            "model": req.model,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    return app


def _label(adapter: str, engine: Engine) -> str:
    return engine.base_name if adapter == BASE else adapter


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
    if not prompt or len(prompt) > MAX_ROWS_PER_REQUEST:
        raise ApiError(
            400, f"prompt must hold 1 to {MAX_ROWS_PER_REQUEST} prompts", "invalid_value", "prompt"
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
            [m.as_dict() for m in messages], tokenize=False, add_generation_prompt=True
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


def _sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int):
    def put(event: tuple) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (index, event))

    return put


async def _results(engine: Engine, rows: list[Row]) -> list[Any]:
    """Submit classify rows and wait for their results."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    for i, row in enumerate(rows):
        row.sink = _sink(loop, events, i)
    engine.scheduler.submit(rows)
    out: list[Any] = [None] * len(rows)
    left = len(rows)
    try:
        while left:
            i, (kind, value) = await events.get()
            if kind == "error":
                raise value
            if kind == "result":
                out[i] = value
            elif kind == "done":
                left -= 1
    finally:
        for row in rows:
            row.cancelled = True
    return out


class _Text:
    """One choice's text as its tokens arrive: what may be sent now, what is held back, and why it ended."""

    def __init__(self, engine: Engine, stops: list[str]):
        self.engine, self.stops = engine, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.tokens: list[int] = []
        self.count = 0
        self.sent = 0
        self.text = ""
        self.finish: str | None = None

    def add(self, token: int) -> str:
        self.count += 1
        if token in self.engine.eos_ids:
            return ""
        self.tokens.append(token)
        self.text = self.engine.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish = self.text[:cut], "stop"
            return self._flush()
        safe = len(self.text) - self.hold
        stripped = self.text.rstrip("\ufffd")  # half a character: wait for the rest
        safe = min(safe, len(stripped))
        if safe <= self.sent:
            return ""
        out = self.text[self.sent : safe]
        self.sent = safe
        return out

    def end(self, reason: str) -> str:
        if self.finish is None:
            self.finish = reason
        return self._flush()

    def _flush(self) -> str:
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out


def _adjustments(engine, req: _Sampling) -> tuple[float, float, dict[int, float]] | None:
    """The request's penalties and logit bias for its rows' samplers (None when it sets none); a logit bias
    must name token ids of this model's vocabulary with values from -100 to 100, as OpenAI's."""
    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        token = int(key) if key.isascii() and key.isdigit() and len(key) < 10 else -1
        if not 0 <= token < engine.vocab_size or not -100 <= value <= 100:
            raise ApiError(
                400,
                f"logit_bias maps token ids (0 to {engine.vocab_size - 1}, as strings) to values from -100 to 100; "
                f"got {key[:20]!r}: {value}",
                "invalid_value",
                "logit_bias",
            )
        bias[token] = float(value)
    frequency, presence = req.frequency_penalty or 0.0, req.presence_penalty or 0.0
    return (frequency, presence, bias) if frequency or presence or bias else None


class _Job:
    """One completion request: its rows, their text, and the JSON or SSE answer."""

    def __init__(self, engine, adapter, prompts, req: _Sampling, max_tokens, cap, endpoint, request: Request):
        # unset: 16 for completions (OpenAI's legacy default); for chat, as OpenAI and vLLM do, the rest of the
        # context, here within --max-tokens-cap (a chat reply cut at 16 tokens surprised every new user)
        if max_tokens is None and endpoint != "chat":
            max_tokens = 16
        if max_tokens is not None and max_tokens > cap:
            raise ApiError(
                400,
                f"max_tokens is {max_tokens}; this server allows at most {cap}",
                "max_tokens_exceeded",
                "max_tokens",
            )
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise ApiError(400, "stop must be up to 16 non-empty strings", "invalid_value", "stop")
        n = req.n or 1
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        adjust = _adjustments(engine, req)
        rows = []
        for ids in prompts:
            limit = max_tokens
            if limit is None:
                room = cap if engine.context_length is None else min(cap, engine.context_length - len(ids))
                limit = max(room, 1)  # (a prompt that fills the context gets the length error)
            _check_length(engine, len(ids), limit, "max_tokens" if max_tokens is not None else "messages")
            for j in range(n):
                seed = None if req.seed is None else (req.seed + j) % 2**63
                rows.append(Row("generate", adapter, ids, limit, temperature, top_p, seed, adjust=adjust))
        if len(rows) > MAX_ROWS_PER_REQUEST:
            raise ApiError(400, f"prompts x n must be at most {MAX_ROWS_PER_REQUEST}", "invalid_value", "n")
        self.engine, self.adapter, self.req, self.endpoint, self.request = (
            engine,
            adapter,
            req,
            endpoint,
            request,
        )
        self.rows, self.prompts, self.n = rows, prompts, n
        self.texts = [_Text(engine, stops) for _ in rows]
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        for i, row in enumerate(rows):
            row.sink = _sink(self.loop, self.events, i)
        self.left = len(rows)
        self.id = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    async def next(self) -> tuple[int, str, str | None] | None:
        """The next piece of text: (choice, text, finish_reason or None); None when every choice ended.
        Raises the ApiError of a row that failed, `_ClientGone` when the client hung up."""
        while self.left:
            try:
                i, (kind, value) = await asyncio.wait_for(self.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await self.request.is_disconnected():
                    raise _ClientGone from None
                continue
            text = self.texts[i]
            if text.finish is not None:
                continue  # ended by a stop string; the row was told to stop
            if kind == "error":
                raise value
            if kind == "token":
                piece = text.add(value)
                if text.finish is not None:
                    self.rows[i].cancelled = True
                    self.left -= 1
                    return i, piece, text.finish
                if piece:
                    return i, piece, None
            elif kind == "done":
                self.left -= 1
                return i, text.end(value), text.finish
        return None

    def cancel(self) -> None:
        for row in self.rows:
            row.cancelled = True

    def hung_up(self) -> Response:
        """The client went away before its answer was complete: its rows are freed, the request counts as 499,
        and nothing is logged as an error."""
        self.cancel()
        self._count("499")
        return Response(status_code=499)

    def usage(self) -> dict[str, int]:
        prompt_tokens = sum(len(p) for p in self.prompts)  # once per prompt, whatever n (as OpenAI, vLLM)
        completion_tokens = sum(t.count for t in self.texts)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def _count(self, status: str) -> None:
        label = _label(self.adapter, self.engine)
        metrics = self.engine.metrics
        metrics.requests.labels(self.endpoint, label, status).inc()
        if status == "200":
            usage = self.usage()
            metrics.tokens.labels(label, "prompt").inc(usage["prompt_tokens"])
            metrics.tokens.labels(label, "completion").inc(usage["completion_tokens"])

    async def respond(self, chat: bool):
        try:
            self.engine.scheduler.submit(self.rows)
        except ApiError as e:  # the queue is full (503) or the server is stopping: counted like any answer
            self._count(str(e.status))
            raise
        if self.req.stream:
            return await self._stream(chat)
        try:
            while await self.next() is not None:
                pass
        except ApiError as e:
            self._count(str(e.status))
            raise
        except _ClientGone:
            return self.hung_up()
        except asyncio.CancelledError:  # the server's shutdown ran out of time (the guard answers 503)
            self._count("503")
            raise
        finally:
            self.cancel()
        self._count("200")
        choices = []
        for i, t in enumerate(self.texts):
            if chat:
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": t.text},
                        "logprobs": None,
                        "finish_reason": t.finish,
                    }
                )
            else:
                choices.append({"text": t.text, "index": i, "logprobs": None, "finish_reason": t.finish})
        return {
            "id": self.id,
            "object": "chat.completion" if chat else "text_completion",
            "created": self.created,
            "model": self.req.model,
            "choices": choices,
            "usage": self.usage(),
        }

    def _chunk(self, chat: bool, index: int, text: str | None, finish: str | None, first: bool) -> dict:
        if chat:
            delta: dict[str, Any] = (
                {"role": "assistant", "content": text or ""} if first else {"content": text} if text else {}
            )
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.created,
            "model": self.req.model,
            "choices": [choice],
        }

    async def _stream(self, chat: bool):
        # Errors before the first piece of text are ordinary JSON errors.
        try:
            first = await self.next()
        except _ClientGone:
            return self.hung_up()
        except BaseException as e:
            self.cancel()
            if isinstance(e, ApiError):
                self._count(str(e.status))
            elif isinstance(e, asyncio.CancelledError):  # the server's shutdown ran out of time
                self._count("503")
            raise
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            started = [False] * len(self.rows)
            counted = False

            def sse(obj: dict) -> str:
                return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

            try:
                piece = first
                while piece is not None:
                    i, text, finish = piece
                    yield sse(self._chunk(chat, i, text, finish, not started[i]))
                    started[i] = True
                    piece = await self.next()
                if include_usage:
                    yield sse(
                        {
                            "id": self.id,
                            "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": self.created,
                            "model": self.req.model,
                            "choices": [],
                            "usage": self.usage(),
                        }
                    )
                counted = True
                self._count("200")
                yield "data: [DONE]\n\n"
            except _ClientGone:
                counted = True
                self._count("499")
            except ApiError as e:  # after the first chunk: an error event ends the stream
                counted = True
                self._count(str(e.status))
                yield sse(e.body())
            except Exception as e:  # a bug: logged here, the client gets an error event, not a cut stream
                counted = True
                self._count("500")
                logger.exception("a stream failed")
                yield sse(
                    ApiError(
                        500, f"internal error ({type(e).__name__})", "internal_error", type_="server_error"
                    ).body()
                )
            finally:
                # A client that hangs up mid-stream ends this generator from outside (a cancellation, or its
                # closing): it counts as 499 too.
                if not counted:
                    self._count("499")
                self.cancel()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )


class _ClientGone(Exception):
    """The client hung up before its answer was complete (the status counted for it is 499, nginx's)."""


_ = redact  # re-exported for tests
