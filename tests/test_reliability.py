"""One bad request never hurts another (issue 12), against the real server over HTTP on 127.0.0.1.

Poisoned rows (a temperature of 1e-300, an adapter whose weights are NaN, one whose finite weights overflow to inf)
run concurrently with good greedy requests; each poisoned one fails alone with a 4xx naming its adapter, and
every good one gets exactly its answer alone. A bounded sweep of hostile values over every field of every
endpoint gets no 500, and the keep-alive connection survives every error. Bounded in count and time.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_serve import BASE, KEY, _client, _Server, files, reference  # noqa: F401  (fixtures)

from deltatune.serve import Engine, create_app


@pytest.fixture(scope="module")
def poisoned(files):  # noqa: F811
    """The tiny base with alpha/beta plus three poisoned adapters: NaN weights, finite weights of 1e30 (whose
    products overflow to inf: refused only when its logits come out non-finite), and inf weights in one layer
    only. (A lora_alpha of 1e999 is refused when the config is read: test_serve_adapters.)"""
    adapters = files["root"] / "poisoned"
    for name in ("alpha", "beta"):
        shutil.copytree(os.path.join(files["adapters"], name), adapters / name)
    for name in ("nanny", "huge", "infy"):
        shutil.copytree(os.path.join(files["adapters"], "alpha"), adapters / name)
    weights = adapters / "nanny" / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(weights).items()}, weights)
    weights = adapters / "huge" / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, 1e30) for k, v in load_file(weights).items()}, weights)
    weights = adapters / "infy" / "adapter_model.safetensors"
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("inf"))
    save_file(tensors, weights)
    return str(adapters)


def _start(files, poisoned, scheduler):  # noqa: F811
    engine = Engine(
        files["base"], poisoned, base_name=BASE, device="cpu", scheduler=scheduler, batch_wait_ms=50
    )
    srv = _Server(create_app(engine, api_key=KEY, max_tokens_cap=24))
    with _client(srv.url) as client:
        yield engine, client
    srv.stop()


@pytest.fixture(scope="module", params=["continuous", "static"])
def server(request, files, poisoned):  # noqa: F811
    yield from _start(files, poisoned, request.param)


@pytest.fixture(scope="module")
def continuous(files, poisoned):  # noqa: F811
    yield from _start(files, poisoned, "continuous")


GOOD = [("alpha", "w1 w2 w3", 10), ("beta", "w4 w5", 8), (BASE, "w6 w7 w8 w9", 9), ("alpha", "w11", 12)]
POISON = [
    {"model": "alpha", "prompt": "w1 w2", "max_tokens": 6, "temperature": 1e-300},  # handled: greedy
    {"model": "nanny", "prompt": "w1 w2", "max_tokens": 6, "temperature": 1.0},
    {"model": "nanny", "prompt": "w3", "max_tokens": 6, "temperature": 0},
    {"model": "huge", "prompt": "w1 w2", "max_tokens": 6, "temperature": 0.7},
    {"model": "infy", "prompt": "w5 w6", "max_tokens": 6, "temperature": 0},
]


def _post(client: httpx.Client, body: dict) -> httpx.Response:
    return client.post("/v1/completions", json=body)


def test_poisoned_rows_fail_alone_and_good_rows_get_their_answer_alone(server, reference):  # noqa: F811
    engine, client = server
    bodies = [{"model": m, "prompt": p, "max_tokens": t, "temperature": 0} for m, p, t in GOOD] + POISON
    bodies = bodies * 2  # interleaved, concurrent: they share batches
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda b: _post(client, b), bodies))
    for body, r in zip(bodies, replies):
        if body["model"] in ("nanny", "huge", "infy"):
            assert 400 <= r.status_code < 500, (body, r.text)
            error = r.json()["error"]
            assert body["model"] in error["message"], error  # names the adapter
        else:
            assert r.status_code == 200, (body, r.text)
            text = r.json()["choices"][0]["text"]
            assert text == reference(body["model"], body["prompt"], body["max_tokens"]), body
    assert client.get("/health").json()["status"] == "ok"
    assert engine.health()["stats"]["failed_rows"] >= 1


def test_a_tiny_temperature_is_greedy(server, reference):  # noqa: F811
    _, client = server
    for t in (1e-300, 1e-45, 1e-40, 5e-5):
        r = _post(client, {"model": "beta", "prompt": "w7 w8", "max_tokens": 8, "temperature": t})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == reference("beta", "w7 w8", 8)


def test_a_poisoned_stream_fails_before_its_first_chunk_with_a_json_error(server):
    _, client = server
    # `huge`'s weights are finite (1e30); their products overflow, so its logits are NaN.
    body = {"model": "huge", "prompt": "w1", "max_tokens": 4, "stream": True, "temperature": 0}
    r = _post(client, body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "non_finite_logits"
    assert "huge" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("name", ["nanny", "infy"])
def test_an_adapter_with_non_finite_weights_is_refused_when_read_alone_or_beside_others(server, name, stream):
    """NaN/inf weights are refused when the file is read, naming the adapter and a tensor: sent alone, a NaN
    query row can come out of torch's CPU attention as finite text (no mask), so the outputs can't be relied on."""
    engine, client = server
    for _ in range(2):  # and again once it failed: the recorded error, not a second load
        r = _post(
            client, {"model": name, "prompt": "w1", "max_tokens": 4, "stream": stream, "temperature": 0}
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "adapter_invalid" and error["param"] == "model", error
        assert f"'{name}'" in error["message"] and "holds NaN or inf values in " in error["message"], error
        assert "lora_" in error["message"], error  # names a tensor
    assert name not in engine.loaded_adapters
    assert client.get("/health").json()["status"] == "ok"
    r = _post(client, {"model": "alpha", "prompt": "w1", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text


# ---- no input gets a 500 -----------------------------------------------------------------------------------
HOSTILE = [
    None,
    True,
    -1,
    0,
    2**70,
    1e308,
    1e-300,
    "",
    "\ud800",
    "x\x00y",
    "a" * 3000,
    [],
    [[]],
    {},
    ["\ud800"],
    [[2**40]],
    [1, "a"],
    "../../etc/passwd",
    "/etc/passwd",
]
ENDPOINTS = {
    "/v1/completions": {"model": "alpha", "prompt": "w1 w2", "max_tokens": 1, "temperature": 0},
    "/v1/chat/completions": {
        "model": "alpha",
        "messages": [{"role": "user", "content": "w1"}],
        "max_tokens": 1,
        "temperature": 0,
    },
    "/v1/adapters": {"name": "alpha2", "path": "alpha"},
}
EXTRA_FIELDS = [
    "stop",
    "seed",
    "n",
    "top_p",
    "stream",
    "stream_options",
    "logprobs",
    "echo",
    "max_completion_tokens",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "best_of",
    "suffix",
    "tools",
    "tool_choice",
    "response_format",
    "functions",
]


def _cases():
    for path, good in ENDPOINTS.items():
        fields = list(good) + (EXTRA_FIELDS if path != "/v1/adapters" else [])
        for field in fields:
            for value in HOSTILE:
                yield path, {**good, field: value}
        if path == "/v1/chat/completions":
            for value in HOSTILE:
                yield path, {**good, "messages": [{"role": "user", "content": value}]}
                yield path, {**good, "messages": [{"role": value, "content": "w1"}]}
                yield path, {**good, "messages": value}


@pytest.mark.parametrize(
    "every", [pytest.param(7, id="sample"), pytest.param(1, id="all", marks=pytest.mark.slow)]
)
def test_no_input_gets_a_500_and_the_connection_is_kept(continuous, every):
    engine, client = continuous
    cases = list(_cases())
    assert len(cases) > 300
    cases = cases[::every]
    seen = {}
    for path, body in cases:
        data = json.dumps(
            body, ensure_ascii=True
        )  # lone surrogates travel as \\ud800 escapes, as a client sends them
        r = client.post(path, content=data, headers={"content-type": "application/json"})
        assert r.status_code < 500, (path, body, r.text)
        assert r.headers.get("connection", "").lower() != "close", (path, body)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert "/tmp" not in r.text and str(engine.registry.root) not in r.text
        elif path == "/v1/adapters":
            assert client.delete(f"/v1/adapters/{body['name']}").status_code == 200
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
    assert seen.get(200, 0) > 10 // every and seen.get(400, 0) > 100 // every, seen
    # raw bytes that are not JSON, or not UTF-8
    for raw in (
        b"\xff\xfe{",
        b'{"model": "alpha", "prompt": "\xed\xa0\x80"}',
        b"[" * 5000,
        b'{"model": NaN}',
    ):
        r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (raw[:20], r.text)
    assert _post(client, ENDPOINTS["/v1/completions"]).status_code == 200


def test_lone_surrogates_and_nul_are_400_on_a_kept_connection(continuous):
    _, client = continuous
    cases = [
        ("/v1/completions", '{"model": "alpha", "prompt": "w1 \\ud800"}', "prompt"),
        ("/v1/completions", '{"model": "alpha", "prompt": ["w1", "\\udfff"]}', "prompt"),
        (
            "/v1/chat/completions",
            '{"model": "alpha", "messages": [{"role": "user", "content": "\\ud800"}]}',
            "messages",
        ),
        ("/v1/adapters", '{"name": "x", "path": "alpha\\u0000"}', "path"),
        ("/v1/completions", '{"model": "alpha", "prompt": "w1", "stop": "\\ud800"}', "stop"),
    ]
    for path, raw, param in cases:
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, (raw, r.text)
        assert param in (r.json()["error"]["param"] or ""), r.json()
        assert r.headers.get("connection", "").lower() != "close"
    assert _post(client, ENDPOINTS["/v1/completions"]).status_code == 200


def test_a_bug_is_a_logged_json_500_without_details_and_the_connection_is_kept(
    continuous, monkeypatch, caplog
):
    engine, client = continuous

    def broken():
        raise RuntimeError(f"secret detail at {engine.registry.root}")

    monkeypatch.setattr(engine, "health", broken)
    with caplog.at_level("ERROR", logger="deltatune.serve"):
        r = client.get("/health")
    assert r.status_code == 500
    assert r.json()["error"] == {
        "message": "internal error (RuntimeError); it is logged on the server",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    assert "Traceback" in caplog.text and "secret detail" in caplog.text  # the server's log has it all
    assert r.headers.get("connection", "").lower() != "close"
    assert _post(client, ENDPOINTS["/v1/completions"]).status_code == 200
