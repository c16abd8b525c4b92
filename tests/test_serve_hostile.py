"""`deltatune serve` driven the way a careless or hostile client would, against the real server on 127.0.0.1:
adapters registered while other adapters' rows run, clients hanging up mid-stream, a shutdown that runs out of
time, and HTTP methods a route doesn't take. Each test here failed before the fix it comes with."""

from __future__ import annotations

import logging
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from test_serve import BASE, CAP, KEY, _client, _Server, classifier, files, reference  # noqa: F401  (fixtures)
from test_serve_stream import _slow_steps, _sse

from deltatune.serve import Engine, create_app


@pytest.fixture(scope="module")
def one_slot(files):  # noqa: F811
    """A server that keeps one adapter in memory (so any other adapter's load must evict it)."""
    engine = Engine(
        files["base"], files["adapters"], base_name=BASE, device="cpu", max_batch=8, max_loaded_adapters=1
    )
    server = _Server(create_app(engine, api_key=KEY, max_tokens_cap=CAP))
    with _client(server.url) as client:
        yield engine, client
    server.stop()


def _requests(metrics: str, endpoint: str, adapter: str, status: str) -> float:
    """`deltatune_requests_total` for one endpoint, adapter and status in a /metrics text."""
    labels = f'{{adapter="{adapter}",endpoint="{endpoint}",status="{status}"}}'
    for line in metrics.splitlines():
        if line.startswith("deltatune_requests_total" + labels):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_registering_an_adapter_never_evicts_one_whose_rows_are_running(one_slot, reference):  # noqa: F811
    """POST /v1/adapters loaded the new adapter with nothing pinned: with every slot taken it evicted the adapter of
    running rows, which then failed with 404 'the adapter ... was unloaded' although nobody unloaded it."""
    engine, client = one_slot
    restore = _slow_steps(engine, 0.03)
    try:
        body = {"model": "alpha", "prompt": "w1 w2 w3", "max_tokens": CAP, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))  # alpha's row is running
            assert engine.loaded_adapters == ["alpha"]
            reply = client.post("/v1/adapters", json={"name": "alpha_two", "path": "beta"})
            chunks = _sse([first, *lines])
    finally:
        restore()
    assert reply.status_code == 200, reply.text
    assert chunks[-1] == "[DONE]", chunks[-2:]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == reference("alpha", "w1 w2 w3", CAP)
    assert reply.json()["loaded"] is False  # registered; it loads when a request needs it and a slot is free
    r = client.post(
        "/v1/completions", json={"model": "alpha_two", "prompt": "w4 w5", "max_tokens": 6, "temperature": 0}
    )
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference("beta", "w4 w5", 6)
    assert client.delete("/v1/adapters/alpha_two").status_code == 200


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(
            record.getMessage() + ("\n" + str(record.exc_info[1]) if record.exc_info else "")
        )


def test_requests_cancelled_by_a_shutdown_that_ran_out_of_time_get_a_json_503_and_log_no_traceback(
    files,  # noqa: F811
):
    """When the graceful shutdown timed out, uvicorn cancelled the requests still running: each logged 'Exception in
    ASGI application' with a CancelledError traceback, and a client whose answer hadn't started got uvicorn's
    plain-text 'Internal Server Error' 500 instead of an OpenAI-style error."""
    engine = Engine(files["base"], files["adapters"], base_name=BASE, device="cpu", max_batch=1)
    restore = _slow_steps(engine, 0.2)  # the rows can't finish within the shutdown's 0.5 s
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(
        create_app(engine, max_tokens_cap=CAP), log_level="info", timeout_graceful_shutdown=0.5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    records = _Records()
    logging.getLogger("uvicorn.error").addHandler(records)
    replies: dict[str, object] = {}

    def ask(key: str, stream: bool) -> None:
        body = {"model": "alpha", "prompt": "w1 w2", "max_tokens": CAP, "temperature": 0, "stream": stream}
        try:
            with (
                httpx.Client(timeout=30, trust_env=False) as client,
                client.stream("POST", f"{url}/v1/completions", json=body) as r,
            ):
                lines, cut = [], None
                try:
                    lines = list(r.iter_lines())
                except httpx.HTTPError as e:  # a stream cut short
                    cut = type(e).__name__
                replies[key] = (r.status_code, r.headers.get("content-type", ""), lines, cut)
        except httpx.HTTPError as e:
            replies[key] = e

    try:
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        askers = [
            threading.Thread(target=ask, args=("running", True)),  # takes the one row of the batch
            threading.Thread(target=ask, args=("queued", False)),
            threading.Thread(target=ask, args=("queued stream", True)),
        ]
        askers[0].start()
        while engine.scheduler.running() == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for asker in askers[1:]:
            asker.start()
        while engine.scheduler.queued() < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        server.should_exit = True
        for asker in askers:
            asker.join(timeout=30)
        thread.join(timeout=30)
    finally:
        restore()
        logging.getLogger("uvicorn.error").removeHandler(records)
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert not [m for m in records.messages if "Exception in ASGI application" in m], records.messages
    for key in ("queued", "queued stream"):
        status, content_type, lines, _ = replies[key]
        assert status == 503 and content_type == "application/json", replies[key]
        assert '"code":"shutting_down"' in "".join(lines), replies[key]
    status, content_type, lines, cut = replies["running"]
    assert status == 200 and content_type.startswith("text/event-stream")
    assert cut is not None and "data: [DONE]" not in lines  # cut short, never passed off as a whole answer
    assert _requests(engine.metrics.render().decode(), "completions", "alpha", "503") == 2


@pytest.mark.parametrize("chat", [False, True])
def test_a_client_that_hangs_up_mid_stream_is_counted_as_499(one_slot, chat):
    """A stream whose client went away after its first chunks freed its row but was counted nowhere in
    `deltatune_requests_total` (neither 200 nor 499), although the README says it counts as 499."""
    engine, client = one_slot
    endpoint = "chat" if chat else "completions"
    before = client.get("/metrics").text
    cancelled = engine.health()["stats"]["cancelled_rows"]
    restore = _slow_steps(engine, 0.1)
    try:
        body = {"model": "beta", "max_tokens": CAP, "temperature": 0, "stream": True}
        if chat:
            path, body = "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "w1"}]}
        else:
            path, body = "/v1/completions", {**body, "prompt": "w1"}
        with client.stream("POST", path, json=body) as r:
            seen = [line for _, line in zip(range(3), (x for x in r.iter_lines() if x.startswith("data: ")))]
        assert len(seen) == 3
        deadline = time.monotonic() + 15
        while engine.health()["stats"]["cancelled_rows"] == cancelled and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        restore()
    after = client.get("/metrics").text
    counted = [
        _requests(after, endpoint, "beta", s) - _requests(before, endpoint, "beta", s) for s in ("200", "499")
    ]
    assert engine.scheduler.running() == 0
    assert counted == [0, 1], (endpoint, counted)


def test_a_method_a_route_does_not_take_is_a_405_naming_the_allowed_ones(one_slot):
    """The 405 dropped Starlette's `Allow` header (HTTP requires it on a 405) and had no error code."""
    _, client = one_slot
    for method, path, allowed in (
        ("GET", "/v1/completions", "POST"),
        ("PUT", "/v1/chat/completions", "POST"),
        ("POST", "/health", "GET"),
        ("DELETE", "/v1/models", "GET"),
    ):
        r = client.request(method, path)
        assert r.status_code == 405, (method, path, r.text)
        assert r.headers.get("allow") == allowed, (method, path, dict(r.headers))
        assert r.json()["error"]["code"] == "method_not_allowed"


def test_a_text_to_classify_that_tokenizes_to_nothing_is_a_400_naming_it(classifier, caplog):  # noqa: F811
    """An input with no tokens ('' or blanks, with a tokenizer that adds no special tokens) ran the model on an
    empty row: alone it failed with a 422 quoting torch's reshape error and logged a traceback; beside other texts it
    got a made-up label from an all-padding row."""
    _, client = classifier
    for texts, index in (("", 0), ([" "], 0), (["w1", ""], 1)):
        with caplog.at_level("ERROR", logger="deltatune.serve"):
            r = client.post("/v1/classify", json={"model": "sentiment", "input": texts})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "input" and error["code"] == "invalid_value"
        assert f"input[{index}]" in error["message"] and "no tokens" in error["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    r = client.post("/v1/classify", json={"model": "sentiment", "input": ["w1", "w2 w3"]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2


def test_one_model_can_be_retrieved_as_openais_client_does(one_slot):
    """`client.models.retrieve(name)` (GET /v1/models/{model}) was a 404 for every model, the base included."""
    engine, client = one_slot
    oai = openai.OpenAI(
        base_url=f"{str(client.base_url).rstrip('/')}/v1",
        api_key=KEY,
        max_retries=0,
        http_client=httpx.Client(trust_env=False),
    )
    listed = {m.id: m for m in oai.models.list()}
    time.sleep(1.05)  # `created` was the time of each request: a second later the two differed
    for name in (BASE, "alpha", "beta"):
        model = oai.models.retrieve(name)
        assert model == listed[name] and model.id == name
    assert oai.models.retrieve("beta").model_extra["parent"] == BASE
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")
    r = client.get("/v1/models/..")
    assert r.status_code in (400, 404) and r.json()["error"]["code"] in ("invalid_model_name", "not_found")


def test_a_row_queued_before_its_adapter_is_deleted_never_runs_on_one_registered_again_under_its_name(
    one_slot,
    reference,  # noqa: F811
):
    """DELETE then POST of the same name: a row that was queued for the old adapter before the delete must fail
    (404), not run on the new weights, even when the new adapter is registered and loaded before the next step."""
    engine, client = one_slot
    assert client.post("/v1/adapters", json={"name": "swap", "path": "alpha"}).status_code == 200
    first, second = threading.Event(), threading.Event()
    replies: dict[str, httpx.Response] = {}

    def send(key, method, url, **kw):
        replies[key] = client.request(method, url, **kw)

    body = {"model": "swap", "prompt": "w1 w2", "max_tokens": 5, "temperature": 0}
    threads = []
    try:
        engine.call(lambda: first.wait(30))  # the model thread is busy: what follows queues behind it
        for key, method, url, kw in (
            ("row", "POST", "/v1/completions", {"json": body}),
            ("delete", "DELETE", "/v1/adapters/swap", {}),
        ):
            threads.append(threading.Thread(target=send, args=(key, method, url), kwargs=kw))
            threads[-1].start()
            time.sleep(0.3)  # (in this order)
        engine.call(lambda: second.wait(30))  # after the delete: holds the step that would admit the row
        first.set()
        threads[1].join(10)
        assert replies["delete"].status_code == 200
        threads.append(
            threading.Thread(
                target=send,
                args=("add", "POST", "/v1/adapters"),
                kwargs={"json": {"name": "swap", "path": "beta"}},
            )
        )
        threads[-1].start()
        time.sleep(0.3)  # registered; its load queues behind the held step
    finally:
        first.set()
        second.set()
        for t in threads:
            t.join(30)
    assert replies["add"].status_code == 200, replies["add"].text
    assert replies["row"].status_code == 404, replies["row"].text
    assert "the adapter 'swap' was unloaded" in replies["row"].json()["error"]["message"]
    r = client.post("/v1/completions", json=body)  # a request sent after the add gets the new weights
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference("beta", "w1 w2", 5)
    assert client.delete("/v1/adapters/swap").status_code == 200


def test_a_body_that_is_not_utf8_is_a_400_invalid_json(one_slot):
    _, client = one_slot
    r = client.post(
        "/v1/completions",
        content=b'{"model": "alpha", "prompt": "\xff\xfe"}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid_json" and "UTF-8" in error["message"]


def test_a_request_refused_because_the_queue_is_full_is_counted(one_slot):
    engine, client = one_slot
    before = _requests(client.get("/metrics").text, "completions", "alpha", "503")
    engine.scheduler.max_queue, saved = 0, engine.scheduler.max_queue
    try:
        r = client.post("/v1/completions", json={"model": "alpha", "prompt": "w1", "max_tokens": 2})
    finally:
        engine.scheduler.max_queue = saved
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
    assert _requests(client.get("/metrics").text, "completions", "alpha", "503") == before + 1
