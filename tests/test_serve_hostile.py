"""`deltatune serve` driven the way a careless or hostile client would, against the real server on 127.0.0.1:
adapters registered while other adapters' rows run, clients hanging up mid-stream, a shutdown that runs out of
time, and HTTP methods a route doesn't take. Each test here failed before the fix it comes with."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from test_serve import BASE, CAP, KEY, _client, _Server, files, reference  # noqa: F401  (fixtures)
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


def _requests(metrics: str, adapter: str, status: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("deltatune_requests_total{") and f'adapter="{adapter}"' in line:
            if f'status="{status}"' in line:
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
