"""The adapter registry of `deltatune serve`: every folder registered at startup, weights loaded on first use,
least recently used evicted beyond `max_loaded_adapters`; names, config files and symlinks judged by one rule
at startup and at runtime; no server path shown to clients; the API key and `/metrics`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_serve import BASE, _client, _Server, files, reference  # noqa: F401  (fixtures)

from deltatune.serve import Engine, create_app, serve_main


def _complete(client, model: str, prompt: str, max_tokens: int) -> str:
    r = client.post(
        "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture()
def serve(files):  # noqa: F811
    started = []

    def start(adapters: str, **kwargs):
        engine = Engine(files["base"], adapters, base_name=BASE, device="cpu", **kwargs)
        server = _Server(create_app(engine))
        client = _client(server.url, key=None)
        started.append((server, client))
        return engine, client

    yield start
    for server, client in started:
        client.close()
        server.stop()


def test_a_hundred_folders_register_with_only_n_loaded_and_eviction_reload_is_identical(
    files,  # noqa: F811
    tmp_path,
    serve,
    reference,  # noqa: F811
):
    root = tmp_path / "many"
    for i in range(100):
        shutil.copytree(
            os.path.join(files["adapters"], "alpha" if i % 2 == 0 else "beta"), root / f"task{i:03d}"
        )
    engine, client = serve(str(root), max_loaded_adapters=3)
    models = client.get("/v1/models").json()["data"]
    assert len(models) == 101 and models[0]["id"] == BASE
    assert not any(m["loaded"] for m in models[1:])  # registered, not loaded
    assert engine.peft is None

    first = _complete(client, "task000", "w1 w2", 8)
    assert first == reference("alpha", "w1 w2", 8)
    for i in (1, 2, 3, 4, 5):  # five more adapters through a cache of three
        expect = reference("alpha" if i % 2 == 0 else "beta", "w1 w2", 8)
        assert _complete(client, f"task{i:03d}", "w1 w2", 8) == expect
        assert len(engine.loaded_adapters) <= 3
    loaded = [m["id"] for m in client.get("/v1/models").json()["data"] if m["loaded"]]
    assert loaded == [BASE, "task003", "task004", "task005"]
    assert len(engine.peft.adapter_names) == 3
    assert _complete(client, "task000", "w1 w2", 8) == first  # evicted, reloaded: the same answer
    health = client.get("/health").json()
    assert health["stats"]["adapter_evictions"] >= 4 and health["max_loaded_adapters"] == 3
    metrics = client.get("/metrics").text
    assert 'deltatune_adapter_events_total{event="evict"}' in metrics
    assert 'deltatune_requests_total{adapter="task000",endpoint="completions",status="200"} 2.0' in metrics
    assert "deltatune_time_to_first_token_seconds_bucket" in metrics
    assert "deltatune_inter_token_latency_seconds_count" in metrics


def test_max_loaded_adapters_below_one_is_refused_at_startup(files, capsys):  # noqa: F811
    with pytest.raises(ValueError, match="at least 1"):
        Engine(files["base"], files["adapters"], max_loaded_adapters=0, device="cpu")
    assert serve_main(["--base", files["base"], "--max-loaded-adapters", "0"]) == 2
    assert "--max-loaded-adapters must be at least 1" in capsys.readouterr().err
    assert serve_main(["--base", files["base"], "--prefill-chunk", "0"]) == 2
    assert "--prefill-chunk must be at least 1 (tokens per step), got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "70000"], "--port must be from 0 (any free port) to 65535, got 70000"),
        (["--max-prefill-tokens", "-1"], "--max-prefill-tokens must be at least 0 (0: no limit), got -1"),
        (["--max-tokens-cap", "0"], "--max-tokens-cap must be at least 1, got 0"),
        (["--max-body-bytes", "-1"], "--max-body-bytes must be at least 1, got -1"),
        (["--max-batch", "0"], "--max-batch must be at least 1, got 0"),
        (["--threads", "0"], "--threads must be at least 1, got 0"),
        (["--batch-wait-ms", "nan"], "--batch-wait-ms must be a finite number of milliseconds >= 0, got nan"),
        (
            ["--shutdown-timeout", "-1"],
            "--shutdown-timeout must be a finite number of seconds >= 0, got -1.0",
        ),
        (["--device", "tpu"], "--device 'tpu' is not a device: use auto, cpu, cuda or cuda:N"),
        (["--device", "meta"], "--device meta: the server runs on cpu or cuda"),
        (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid' can't be resolved"),
        (["--port", "{busy}"], "is already in use: stop what listens there or pick another --port"),
        # a base no client could name (' ' was served as the model ' ')
        (["--base-name", " "], "--base-name ' ': is empty; give the name clients send as `model`"),
        (["--base-name", "tiny\n"], "has spaces at an end or control characters"),
        (["--base-name", "x" * 300], "is 300 characters long; at most 256"),
    ],
)
def test_bad_serve_options_end_with_one_line_before_the_model_loads(
    files,  # noqa: F811
    capsys,
    monkeypatch,
    argv,
    message,
):
    """Each was a traceback, a server that started with a setting that can't work, or an error from uvicorn
    after the model had loaded."""
    import deltatune.serve.engine as engine_module

    monkeypatch.setattr(engine_module, "Engine", lambda *a, **k: pytest.fail("the model started loading"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        argv = [a.replace("{busy}", str(busy.getsockname()[1])) for a in argv]
        assert serve_main(["--base", files["base"], *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def _engine_args(monkeypatch) -> dict:
    """Run `serve_main` up to the engine: what it hands `Engine`, with uvicorn never started."""
    import uvicorn

    import deltatune.serve.app as app_module
    import deltatune.serve.engine as engine_module

    seen: dict = {}

    def fake_engine(base, adapters, **kwargs):
        seen.update(base=base, adapters=adapters, **kwargs)

    monkeypatch.setattr(engine_module, "Engine", fake_engine)
    monkeypatch.setattr(app_module, "create_app", lambda engine, **kw: object())
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    monkeypatch.setattr("deltatune.serve.command.freeze_startup_objects", lambda: None)
    return seen


def test_serve_finds_the_base_as_the_other_commands_do(monkeypatch, capsys):
    """`--base embedded:minilm` (what a run on the default records as its base) ended in 'Repo id must use
    alphanumeric chars', as did a folder that doesn't exist; `--dtype` was the only dtype option spelled
    float32 by default and refused `FP32`."""
    from deltatune.embedded import minilm_path

    seen = _engine_args(monkeypatch)
    assert serve_main(["--base", "embedded:minilm", "--dtype", "BF16"]) == 0
    assert seen["base"] == minilm_path()
    assert seen["base_name"] == "embedded:minilm" and seen["dtype"] == "bf16"
    seen.clear()
    assert serve_main(["--base", "embedded:minilm", "--base-name", "mini"]) == 0
    assert seen["base_name"] == "mini" and seen["dtype"] == "fp32"


@pytest.mark.parametrize(
    "base, message",
    [
        ("no-such-model", "--base: folder not found: "),
        ("empty", "--base: '{tmp}/empty' has no config.json; is it a Hugging Face model folder?"),
        ("a-file", "--base: '{tmp}/a-file' is a file; give the model's folder"),
    ],
)
def test_a_base_that_cant_load_is_one_line_before_anything_loads(
    monkeypatch, capsys, tmp_path, base, message
):
    seen = _engine_args(monkeypatch)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("{}")
    assert serve_main(["--base", str(tmp_path / base)]) == 2
    err = capsys.readouterr().err
    assert seen == {} and err.startswith("deltatune serve: error: ") and err.count("\n") == 1, err
    assert message.replace("{tmp}", str(tmp_path)) in err, err


def test_bad_engine_settings_are_each_named():
    with pytest.raises(ValueError) as e:
        Engine("unused", max_batch=0, batch_wait_ms=float("nan"), max_prefill_tokens=-2)
    assert str(e.value) == (
        "max_batch must be >= 1, got 0; max_prefill_tokens must be >= 0, got -2; batch_wait_ms must be >= 0, got nan"
    )


def test_empty_api_key_is_refused_at_startup(files, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("DELTATUNE_API_KEY", "")
    assert serve_main(["--base", files["base"]]) == 2
    assert "DELTATUNE_API_KEY is set but empty" in capsys.readouterr().err
    monkeypatch.delenv("DELTATUNE_API_KEY")
    assert serve_main(["--base", files["base"], "--api-key", "  "]) == 2
    assert "--api-key is set but empty" in capsys.readouterr().err


def test_adapters_pointing_at_one_adapter_folder_serves_it_by_its_name(files, serve, reference):  # noqa: F811
    engine, client = serve(os.path.join(files["adapters"], "beta"))
    assert engine.adapter_names == ["beta"]
    assert _complete(client, "beta", "w3 w4", 6) == reference("beta", "w3 w4", 6)


def test_a_folder_of_train_runs_serves_each_run_s_adapter_by_the_run_s_name(
    files,  # noqa: F811
    tmp_path,
    serve,
    reference,  # noqa: F811
):
    """`deltatune serve --adapters runs` (the folder `deltatune train` writes runs into) started with "0 adapters
    registered (0 failed)" and nothing in /health saying why: each run keeps its adapter in `<run>/adapter`, one
    level below where the server looked. A run folder is served by its name, from its adapter/ (also as
    `--adapters runs/NAME`); a run with no adapter yet stays unlisted, as any folder without one."""
    runs = tmp_path / "runs"
    for run, source in (("spam-run", "alpha"), ("poems", "beta")):
        shutil.copytree(os.path.join(files["adapters"], source), runs / run / "adapter")
        (runs / run / "train_config.yaml").write_text("method: lora\n")
        (runs / run / "checkpoints").mkdir()
    (runs / "interrupted" / "checkpoints").mkdir(parents=True)
    (runs / "interrupted" / "train_config.yaml").write_text("method: lora\n")
    engine, client = serve(str(runs))
    assert engine.adapter_names == ["poems", "spam-run"]
    assert engine.registry.failed == {}
    assert _complete(client, "spam-run", "w3 w4", 6) == reference("alpha", "w3 w4", 6)
    assert _complete(client, "poems", "w3 w4", 6) == reference("beta", "w3 w4", 6)
    shutil.copytree(runs / "poems", runs / "later")  # a run finished after startup: POST /v1/adapters
    r = client.post("/v1/adapters", json={"name": "later"})
    assert r.status_code == 200 and r.json()["loaded"] is True, r.text
    assert _complete(client, "later", "w3 w4", 6) == reference("beta", "w3 w4", 6)
    engine, client = serve(str(runs / "poems"))
    assert engine.adapter_names == ["poems"]
    assert _complete(client, "poems", "w3 w4", 6) == reference("beta", "w3 w4", 6)


def _bad_config(folder, source, text: bytes) -> None:
    shutil.copytree(source, folder)
    (folder / "adapter_config.json").write_bytes(text)


def test_bad_names_configs_and_links_are_skipped_at_startup_and_refused_at_runtime(files, tmp_path, serve):  # noqa: F811
    root = tmp_path / "mixed"
    alpha = os.path.join(files["adapters"], "alpha")
    with open(os.path.join(alpha, "adapter_config.json")) as f:
        config = json.load(f)
    shutil.copytree(alpha, root / "good")
    for name in ("train", "to", "forward", "_modules"):  # nn.Module's own names
        shutil.copytree(alpha, root / name)
    _bad_config(root / "rank_list", alpha, json.dumps({**config, "rank_pattern": []}).encode())
    _bad_config(root / "rank_null", alpha, json.dumps({**config, "rank_pattern": None}).encode())
    _bad_config(root / "binary", alpha, b"\xff\xfe\x00\x81 not utf-8")
    _bad_config(root / "rank_huge", alpha, json.dumps({**config, "r": 300000}).encode())
    os.symlink(str(files["root"] / "spare" / "gamma"), root / "link_out")  # a folder link leading outside
    (root / "files_out").mkdir()  # a real folder whose files lead outside
    for f in os.listdir(files["root"] / "spare" / "gamma"):
        os.symlink(str(files["root"] / "spare" / "gamma" / f), root / "files_out" / f)
    os.symlink(root / "good", root / "alias")  # a link that stays inside: fine

    engine, client = serve(str(root))
    health = client.get("/health").json()
    assert sorted(engine.adapter_names) == ["alias", "good"]
    failed = health["failed_adapters"]
    for name in ("train", "to", "forward"):
        assert "torch.nn.Module uses itself" in failed[name]
    assert "starts with a letter or digit" in failed["_modules"]
    assert (
        failed["rank_list"].startswith("adapter_config.json: rank_pattern must be an object")
        and "[]" in failed["rank_list"]
    )
    assert (
        failed["rank_null"].startswith("adapter_config.json: rank_pattern must be an object")
        and "null" in failed["rank_null"]
    )
    assert "not UTF-8" in failed["binary"] and "adapter_config.json" in failed["binary"]
    assert "r is 300000 but the saved LoRA matrices have rank 4" in failed["rank_huge"]
    assert "outside the adapters folder" in failed["link_out"]
    assert "outside the adapters folder" in failed["files_out"]
    assert str(tmp_path) not in json.dumps(health) and "/tmp" not in json.dumps(health)
    assert _complete(client, "alias", "w1", 4) == _complete(client, "good", "w1", 4)

    # The same rules at runtime: each a 4xx naming the problem, never a path, and the server keeps serving.
    runtime = [
        ({"name": "train", "path": "good"}, 400, "torch.nn.Module uses itself"),
        ({"name": "ok1", "path": "rank_list"}, 400, "rank_list"),
        ({"name": "ok2", "path": "rank_null"}, 400, "rank_null"),
        ({"name": "ok3", "path": "binary"}, 400, "not UTF-8"),
        ({"name": "ok4", "path": "link_out"}, 400, "outside the adapters folder"),
        ({"name": "ok5", "path": "files_out"}, 400, "outside the adapters folder"),
        ({"name": "ok6", "path": "good\x00"}, 400, "NUL"),
    ]
    for body, status, words in runtime:
        r = client.post("/v1/adapters", json=body)
        assert r.status_code == status and words in r.json()["error"]["message"], (body, r.text)
        assert str(tmp_path) not in r.text and "/tmp/" not in r.text
    for model in ("train", "forward", "_modules"):
        r = client.post("/v1/completions", json={"model": model, "prompt": "w1"})
        assert r.status_code == 400 and "torch.nn.Module" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"model": "binary", "prompt": "w1"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_invalid"
    assert client.post("/v1/adapters", json={"name": "alias2", "path": "alias"}).status_code == 200
    assert _complete(client, "alias2", "w1", 4) == _complete(client, "good", "w1", 4)


def test_a_bom_config_loads_and_absurd_numbers_and_pickled_weights_are_refused(
    files,  # noqa: F811
    tmp_path,
    serve,
    capsys,
):
    """A config saved with a byte-order mark (a Windows editor) was 'not valid JSON'; lora_alpha Infinity or
    1e300 merged into inf weights; an r written as 31 digits passed the type check; a .bin holding code was
    refused in a dozen lines of torch's advice to load it with weights_only=False."""
    import pickle

    from deltatune import cli

    root = tmp_path / "odd"
    alpha = os.path.join(files["adapters"], "alpha")
    with open(os.path.join(alpha, "adapter_config.json")) as f:
        config = json.load(f)
    _bad_config(root / "bom", alpha, b"\xef\xbb\xbf" + json.dumps(config).encode())
    _bad_config(root / "alpha_inf", alpha, json.dumps({**config, "lora_alpha": float("inf")}).encode())
    _bad_config(root / "alpha_huge", alpha, json.dumps({**config, "lora_alpha": 1e300}).encode())
    _bad_config(root / "r_digits", alpha, json.dumps({**config, "r": 10**30}).encode())

    class Code:
        def __reduce__(self):
            return (os.system, ("echo ran > " + str(tmp_path / "ran"),))

    shutil.copytree(alpha, root / "pickled")
    os.unlink(root / "pickled" / "adapter_model.safetensors")
    (root / "pickled" / "adapter_model.bin").write_bytes(pickle.dumps(Code()))
    engine, client = serve(str(root))
    failed = client.get("/health").json()["failed_adapters"]
    assert "bom" in engine.adapter_names and _complete(client, "bom", "w1", 4)
    r = client.post("/v1/completions", json={"model": "pickled", "prompt": "w1"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_invalid"
    assert (
        "adapter_model.bin is not a plain te" in r.json()["error"]["message"] and str(tmp_path) not in r.text
    )
    assert "field 'lora_alpha' must be a finite number, got inf" in failed["alpha_inf"]
    assert "field 'lora_alpha' is 1e+300, beyond any sensible value" in failed["alpha_huge"]
    assert "field 'r' is 1000000000000000000000000000000, larger than any integer" in failed["r_digits"]
    pickled = root / "pickled"
    for argv in (
        ["inspect", str(pickled)],
        ["merge", "--adapter", str(pickled), "--out", str(tmp_path / "m")],
    ):
        capsys.readouterr()
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "weights_only=False" not in err, err
        assert err.startswith(
            f"deltatune {argv[0]}: error: {pickled / 'adapter_model.bin'} is not a plain tensor file"
        )
        assert "never runs code in it: save the adapter as adapter_model.safetensors" in err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "m").exists()


def test_rows_whose_adapter_is_in_memory_do_not_wait_for_another_adapter_s_load(files, serve):  # noqa: F811
    engine, client = serve(files["adapters"])
    _complete(client, "alpha", "w1", 2)  # alpha is in memory, beta is not
    real = engine._load_weights
    engine._load_weights = lambda *args: (time.sleep(1.5), real(*args))
    release = threading.Event()
    engine.call(lambda: release.wait(10))  # hold the model thread so both requests queue up together
    with ThreadPoolExecutor(2) as pool:
        beta = pool.submit(_complete, client, "beta", "w1", 2)
        time.sleep(0.2)
        alpha = pool.submit(_timed_first_chunk, client, "alpha")
        time.sleep(0.2)
        release.set()
        assert alpha.result(timeout=60) < 1.5  # its first token came before beta's load ended
        assert beta.result(timeout=60)
    assert engine.loaded_adapters == ["alpha", "beta"]


def test_adapter_files_are_read_beside_the_running_batch(files, serve, reference, monkeypatch):  # noqa: F811
    """A slow read of an adapter's files (a cold disk) doesn't pause the rows that are running: the reader
    thread reads, the model thread keeps stepping and then only attaches the weights."""
    from deltatune import model as model_module

    engine, client = serve(files["adapters"])
    _complete(client, "alpha", "w1", 2)  # alpha is in memory, beta is not
    real = model_module._read_adapter
    monkeypatch.setattr(model_module, "_read_adapter", lambda *a: (time.sleep(1.5), real(*a))[1])
    decode = engine.scheduler._decode
    engine.scheduler._decode = lambda lane: (time.sleep(0.05), decode(lane))
    body = {"model": "alpha", "prompt": "w2 w3", "max_tokens": 48, "temperature": 0, "stream": True}
    stamps = []
    with ThreadPoolExecutor(1) as pool, client.stream("POST", "/v1/completions", json=body) as r:
        beta = None
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                stamps.append(time.monotonic())
                if beta is None:  # alpha runs: now beta's files are read (1.5 s)
                    beta = pool.submit(_complete, client, "beta", "w4 w5", 3)
        assert beta.result(timeout=60) == reference("beta", "w4 w5", 3)
    engine.scheduler._decode = decode
    assert stamps[-1] - stamps[0] > 1.5  # alpha was still running while beta's files were read
    assert max(b - a for a, b in zip(stamps, stamps[1:])) < 1.0  # and never paused for the read
    assert engine.loaded_adapters == ["alpha", "beta"]
    assert not [
        name for name, m in engine.peft.named_modules() if m.training
    ]  # attached in eval mode (dropout off)


def test_reads_ahead_are_bounded_and_forgotten_when_no_row_waits(files, serve):  # noqa: F811
    engine, client = serve(files["adapters"], max_loaded_adapters=1)

    def on_model_thread():
        first = engine.ensure_loaded("alpha", set(), background=True)  # starts reading alpha
        second = engine.ensure_loaded("beta", set(), background=True)  # one read ahead at most: waits
        reading = sorted(engine._reads)
        engine.prune_reads({"beta"})  # alpha's rows went away
        third = engine.ensure_loaded("beta", set(), background=True)  # now beta's read starts
        return first, second, reading, third, sorted(engine._reads)

    assert engine.call(on_model_thread).result() == (False, False, ["alpha"], False, ["beta"])
    assert _complete(client, "beta", "w1", 2)  # beta attaches from its read
    assert engine.loaded_adapters == ["beta"]


def _timed_first_chunk(client, model: str) -> float:
    body = {"model": model, "prompt": "w2 w3", "max_tokens": 4, "temperature": 0, "stream": True}
    t0 = time.monotonic()
    with client.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                return time.monotonic() - t0
    raise AssertionError("no chunk")


def test_bound_to_loopback_a_host_header_naming_another_machine_gets_403(files, monkeypatch):  # noqa: F811
    """DNS rebinding (Ollama's CVE-2024-28224): a page on evil.example whose name resolves to 127.0.0.1 reads the
    server as its own origin and can use every adapter. Bound to a loopback address, `serve` accepts only this
    machine's names in `Host`."""
    from openai import OpenAI

    from deltatune import webguard

    seen: dict = {}
    _engine_args(monkeypatch)
    import deltatune.serve.app as app_module

    monkeypatch.setattr(app_module, "create_app", lambda engine, **kw: seen.update(kw) or object())
    assert serve_main(["--base", files["base"], "--port", "0"]) == 0
    assert (
        seen["allowed_hosts"]
        == webguard.allowed_hosts_for("127.0.0.1")
        == (*webguard.LOCAL_HOSTS, "127.0.0.1")
    )
    assert serve_main(["--base", files["base"], "--host", "127.0.0.2", "--port", "0"]) == 0
    assert "127.0.0.2" in seen["allowed_hosts"]
    assert webguard.allowed_hosts_for("0.0.0.0") is None  # listening elsewhere: any name (the API key guards)
    assert serve_main(["--base", files["base"], "--port", "0", "--allowed-host", "llm.example.com"]) == 0
    assert "llm.example.com" in seen["allowed_hosts"]  # a reverse proxy's name
    assert serve_main(["--base", files["base"], "--allowed-host", "http://llm.example.com"]) == 2
    monkeypatch.undo()

    engine = Engine(files["base"], None, base_name=BASE, device="cpu")
    server = _Server(create_app(engine, allowed_hosts=webguard.allowed_hosts_for("127.0.0.1")))
    port = server.url.rsplit(":", 1)[1]
    try:
        with _client(server.url, key=None) as client:
            r = client.get("/v1/models", headers={"Host": f"evil.example:{port}"})
            assert r.status_code == 403
            error = r.json()["error"]
            assert error["code"] == "host_not_allowed" and "is not this server's address" in error["message"]
            for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"localhost.:{port}"):
                assert client.get("/v1/models", headers={"Host": host}).status_code == 200, host
            for host in (
                f"localhost..:{port}",
                f"evil.example.:{port}",
            ):  # only a single trailing dot is absolute
                assert client.get("/v1/models", headers={"Host": host}).status_code == 403, host
        for base_url in (
            f"{server.url}/v1",
            f"http://localhost:{port}/v1",
        ):  # the official client, as users run it
            answer = OpenAI(base_url=base_url, api_key="none").completions.create(
                model=BASE, prompt="w1 w2", max_tokens=2, temperature=0
            )
            assert answer.choices[0].finish_reason in ("length", "stop")
    finally:
        server.stop()


def test_one_kind_of_adapter_per_server_the_others_listed_with_the_reason(files, tmp_path, serve, reference):  # noqa: F811
    """`--adapters compare-results` registered LoRA and bottleneck adapters side by side, and whichever loaded
    second failed at request time with 'this model holds a LORA adapter; another BOTTLENECK adapter can't be
    added'. A server serves one kind (LoRA when there is any): the others are listed in /health with the reason
    at startup, and a request or a runtime registration naming one gets a 400 saying so."""
    from transformers import AutoModelForCausalLM

    from deltatune import BottleneckConfig, get_peft_model

    root = tmp_path / "mixed"
    shutil.copytree(os.path.join(files["adapters"], "alpha"), root / "alpha")
    for name in ("houlsby", "late"):
        model = AutoModelForCausalLM.from_pretrained(files["base"])
        get_peft_model(model, BottleneckConfig(task_type="CAUSAL_LM")).save_pretrained(str(tmp_path / name))
    shutil.copytree(tmp_path / "houlsby", root / "houlsby")
    engine, client = serve(str(root))
    assert engine.adapter_names == ["alpha"]
    reason = "it is a BOTTLENECK adapter and this server serves LORA adapters"
    assert engine.registry.failed["houlsby"].startswith(reason)
    assert reason in client.get("/health").json()["failed_adapters"]["houlsby"]
    r = client.post("/v1/completions", json={"model": "houlsby", "prompt": "w3", "max_tokens": 2})
    assert r.status_code == 400 and reason in r.json()["error"]["message"]
    shutil.copytree(tmp_path / "late", root / "late")
    r = client.post("/v1/adapters", json={"name": "late"})
    assert r.status_code == 400 and reason in r.json()["error"]["message"]
    assert _complete(client, "alpha", "w3 w4", 6) == reference(
        "alpha", "w3 w4", 6
    )  # the LoRA one still serves
    # a folder of bottleneck adapters alone is served as such
    alone = tmp_path / "alone"
    shutil.copytree(tmp_path / "houlsby", alone / "houlsby")
    engine, client = serve(str(alone))
    assert engine.adapter_names == ["houlsby"]
    r = client.post(
        "/v1/completions", json={"model": "houlsby", "prompt": "w3 w4", "max_tokens": 3, "temperature": 0}
    )
    assert r.status_code == 200, r.text


def test_a_label_map_edited_to_another_count_or_nested_too_deeply_breaks_no_other_adapter(files, tmp_path):  # noqa: F811
    """The base's head was sized from the first classification adapter's label_map.json: one edited to two labels
    (its head has three) made every adapter of the server fail to load; one nested too deeply was a
    RecursionError that skipped its adapter (the other bad label maps are only ignored)."""
    root = tmp_path / "cls"
    shutil.copytree(files["cls_adapters"], root)
    shutil.copytree(root / "topic", root / "a_edited")
    (root / "a_edited" / "label_map.json").write_text('{"news": 0, "sport": 1}')
    shutil.copytree(root / "topic", root / "deep")
    (root / "deep" / "label_map.json").write_text("[" * 100000 + "]" * 100000)
    engine = Engine(files["cls_base"], str(root), base_name="cls", device="cpu")
    server = _Server(create_app(engine))
    try:
        with _client(server.url, key=None) as client:
            assert client.get("/health").json()["failed_adapters"] == {}
            for model in ("a_edited", "deep", "sentiment", "topic"):
                r = client.post("/v1/classify", json={"model": model, "input": "w1 w2"})
                assert r.status_code == 200, (model, r.text)
                assert len(r.json()["data"][0]["probabilities"]) == 3
            r = client.post("/v1/classify", json={"model": "topic", "input": "w1"})
            assert sorted(r.json()["data"][0]["probabilities"]) == ["news", "sport", "tech"]
    finally:
        server.stop()
