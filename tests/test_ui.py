"""`deltatune ui` without a browser: the run scanner, bad input, the API key, form validation, the playground."""

from __future__ import annotations

import json
import os
import time

import pytest
import train_helpers
from fastapi.testclient import TestClient

from deltatune.ui import runs
from deltatune.ui.app import create_app


def _write(path, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    # a finished train run
    _write(
        root / "good" / "train_config.yaml",
        "model: m\nmethod: lora\ndata: d.jsonl\ntask: seq-cls\nmax_steps: 3\n",
    )
    _write(
        root / "good" / "metrics.jsonl",
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"step": 0, "eval_loss": 0.9, "eval_accuracy": 0.5},
                {"step": 1, "train_loss": 0.8},
                {"step": 2, "train_loss": 0.6, "eval_accuracy": 0.75},
                {"step": 3, "train_loss": 0.5, "eval_accuracy": 0.7},
            ]
        ),
    )
    _write(root / "good" / "summary.json", json.dumps({"status": "completed", "steps": 3, "total_steps": 3}))
    # a run being written: its last line has no newline yet, one line is garbage
    _write(root / "half" / "train_config.yaml", "model: m\nmethod: houlsby\ndata: d.jsonl\n")
    _write(root / "half" / "metrics.jsonl", '{"step": 1, "train_loss": 1.0}\nnot json\n{"step": 2, "train_lo')
    # foreign and broken files
    _write(root / "notes" / "readme.txt", "not a run")
    _write(root / "broken" / "train_config.yaml", "[1, 2")
    _write(root / "broken" / "summary.json", "{")
    _write(root / "cmp" / "results.json", '{"model": "m", "methods": 3}')
    _write(root / "group" / "inner" / "metrics.jsonl", '{"step": 1, "train_loss": 2.0}\n')
    return root


def test_scan_lists_what_it_can_and_marks_the_rest(runs_dir):
    found = {r["path"]: r for r in runs.scan(str(runs_dir))}
    assert set(found) == {"good", "half", "notes", "broken", "cmp", "group/inner"}
    good = found["good"]
    assert (good["kind"], good["status"], good["method"], good["model"], good["data"]) == (
        "train",
        "completed",
        "lora",
        "m",
        "d.jsonl",
    )
    assert good["best"] == {"name": "eval_accuracy", "value": 0.75, "step": 2} and good["problems"] == []
    half = found["half"]
    assert half["method"] == "houlsby" and half["steps"] == 1
    assert half["problems"] == ["metrics.jsonl: 1 line(s) that aren't metrics rows were skipped"]
    assert found["notes"]["kind"] == "foreign" and found["notes"]["status"] == "not a run"
    broken = found["broken"]["problems"]
    assert any(p.startswith("train_config.yaml is unreadable") for p in broken)
    assert any(p.startswith("summary.json is unreadable") for p in broken)
    assert found["cmp"]["kind"] == "compare"
    assert found["cmp"]["problems"] == ["results.json is not a deltatune compare result (no 'methods' list)"]


def test_metrics_are_read_incrementally(runs_dir):
    path = runs_dir / "half" / "metrics.jsonl"
    rows, nxt, bad = runs.read_metrics(str(path))
    assert [r["step"] for r in rows] == [1] and nxt == 2 and bad == 1
    with open(path, "a") as f:  # the writer finishes its line and adds one
        f.write('ss": 0.5}\n{"step": 3, "train_loss": 0.25}\n')
    rows, nxt, bad = runs.read_metrics(str(path), nxt)
    assert rows == [{"step": 2, "train_loss": 0.5}, {"step": 3, "train_loss": 0.25}] and nxt == 4 and bad == 0


def test_api_runs_metrics_and_paths(runs_dir):
    client = TestClient(create_app(str(runs_dir)))
    listed = client.get("/api/runs").json()["runs"]
    assert {r["path"] for r in listed} >= {"good", "half"}
    metrics = client.get("/api/metrics", params={"path": "good", "since": 2}).json()
    assert [r["step"] for r in metrics["rows"]] == [2, 3] and metrics["next"] == 4
    assert client.get("/api/run", params={"path": "good"}).json()["config"]["method"] == "lora"
    for bad in ("../", "/etc", "good/../../x"):
        r = client.get("/api/metrics", params={"path": bad})
        assert r.status_code == 404 and "not inside the runs folder" in r.json()["error"]
    assert client.get("/api/run", params={"path": "notes"}).status_code == 404
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "https://" not in client.get("/static/app.js").text  # nothing is fetched from the internet


def test_api_key_like_serve(runs_dir, monkeypatch, capsys):
    client = TestClient(create_app(str(runs_dir), api_key="s3cret"))
    assert client.get("/api/runs").status_code == 401
    assert client.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/api/runs", headers={"x-api-key": "s3cret"}).status_code == 200
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.post("/login", data={"key": "nope"}).status_code == 401
    r = client.post("/login", data={"key": "s3cret"}, follow_redirects=False)
    assert r.status_code == 303 and "httponly" in r.headers["set-cookie"].lower()
    assert client.get("/api/runs").status_code == 200  # the browser's cookie now
    # the command line reads DELTATUNE_API_KEY and binds 127.0.0.1 by default
    from deltatune import ui

    args = ui.build_parser().parse_args([])
    assert (args.host, args.port, args.runs) == ("127.0.0.1", 7860, "runs")
    seen = {}
    monkeypatch.setenv("DELTATUNE_API_KEY", "from-env")
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setattr(ui, "listen_problem", lambda host, port: None)  # 7860 may be taken by a real board
    assert ui.main(["--runs", str(runs_dir)]) == 0
    assert (
        seen["host"] == "127.0.0.1"
        and TestClient(seen["app"], base_url="http://127.0.0.1:7860").get("/api/runs").status_code == 401
    )
    assert capsys.readouterr().out == f"deltatune ui: http://127.0.0.1:7860/  (runs: {runs_dir})\n"
    # a mistyped --runs showed an empty board without a word
    assert ui.main(["--runs", str(runs_dir / "typo")]) == 0
    assert f"(runs: {runs_dir / 'typo'}: a new folder, so no runs to show yet;" in capsys.readouterr().out


def test_form_errors_are_the_cli_messages(runs_dir, tmp_path, capsys):
    from deltatune import compare
    from deltatune.train import train_main

    client = TestClient(create_app(str(runs_dir)))
    missing_model, missing_data = str(tmp_path / "no-model"), str(tmp_path / "no-data.jsonl")

    r = client.post(
        "/api/jobs",
        json={"kind": "compare", "model": missing_model, "data": missing_data, "methods": ["lora"]},
    )
    assert r.status_code == 400
    assert compare.main(["--model", missing_model, "--data", missing_data, "--methods", "lora"]) == 2
    assert r.json()["error"] == capsys.readouterr().err.strip()
    assert "does not exist" in r.json()["error"] and "data file not found" in r.json()["error"]

    r = client.post("/api/jobs", json={"kind": "train", "model": missing_model, "data": missing_data})
    assert r.status_code == 400
    assert train_main([f"model={missing_model}", f"data={missing_data}"]) == 2
    assert r.json()["error"] == capsys.readouterr().err.strip()
    assert "folder not found" in r.json()["error"]

    r = client.post("/api/jobs", json={"kind": "train", "data": missing_data, "name": "../escape"})
    assert r.status_code == 400 and "inside the runs folder" in r.json()["error"]
    assert client.get("/api/jobs").json()["jobs"] == []  # nothing started


def test_playground_answers_equal_generate(tmp_path, capsys):
    """Greedy answers of a LoRA and a bottleneck adapter and the base, side by side, equal `deltatune generate`'s."""
    from deltatune.tools import generate_main
    from deltatune.train import config_from_dict, run

    base = train_helpers.tiny_opt_folder(tmp_path / "opt")
    data = tmp_path / "lm.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": " ".join(f"w{(i * 7 + j) % 80 + 3}" for j in range(10))}) + "\n"
            for i in range(16)
        )
    )
    adapters = []
    for name, method in (("a", "lora"), ("b", "pfeiffer")):  # two kinds: the second gets its own base copy
        cfg = config_from_dict(
            {
                "model": base,
                "task": "causal-lm",
                "data": str(data),
                "max_steps": 3,
                "batch_size": 4,
                "lr": 0.05,
                "method": method,
                "output_dir": str(tmp_path / "runs" / name),
                "progress": False,
                "eval_at_start": False,
            }
        )
        adapters.append(run(cfg)["adapter_dir"])
    client = TestClient(create_app(str(tmp_path / "runs")))
    listed = client.get("/api/adapters").json()["adapters"]
    assert sorted(a["run"] for a in listed) == ["a", "b"]
    r = client.post(
        "/api/playground",
        json={"base": base, "adapters": adapters, "prompt": "w5 w6 w7", "max_new_tokens": 8},
    ).json()
    assert [a["name"] for a in r["answers"]] == ["base", "a", "b"]
    for adapter, answer in zip(adapters, r["answers"][1:]):
        generate_main(["--base", base, "--adapter", adapter, "--prompt", "w5 w6 w7", "--max-new-tokens", "8"])
        assert answer["text"] == capsys.readouterr().out.strip()
    assert (
        r["answers"][1]["text"] != r["answers"][2]["text"]
        or r["answers"][1]["text"] != r["answers"][0]["text"]
    )
    bad = client.post("/api/playground", json={"adapters": [str(tmp_path)], "prompt": "x"})
    assert bad.status_code == 400 and "is not an adapter folder" in bad.json()["error"]


@pytest.mark.parametrize(
    "route, body, message",
    [
        # each was a 500: an OverflowError, a TypeError iterating a number, a tokenizers TypeError, a ValueError
        (
            "/api/playground",
            '{"prompt": "w1", "max_new_tokens": Infinity}',
            "max_new_tokens and temperature must",
        ),
        (
            "/api/playground",
            '{"prompt": "w1", "max_new_tokens": 1e999}',
            "max_new_tokens and temperature must",
        ),
        ("/api/playground", '{"prompt": "w1", "adapters": 5}', "adapters must be a list of adapter folders"),
        (
            "/api/playground",
            '{"prompt": "w1", "adapters": [7]}',
            "adapters must be a list of adapter folders",
        ),
        ("/api/playground", '{"prompt": "\\ud800"}', "the request body holds a lone surrogate"),
        (
            "/api/playground",
            '{"prompt": "w1", "temperature": NaN}',
            "temperature must be a finite number >= 0",
        ),
        ("/api/jobs", '{"kind": "train", "report_to": 5}', "report_to must be a list of names, got 5"),
        ("/api/jobs", '{"kind": "train", "report_to": [5]}', "report_to must be a list of names, got [5]"),
        ("/api/jobs", '{"kind": "compare", "methods": ["lora", 5]}', "methods must be a list of names"),
        ("/api/jobs", '{"kind": "train", "resume": "x\\u0000"}', "the request body holds a NUL character"),
        ("/api/jobs", '{"kind": "compare", "model": "\\u0000"}', "the request body holds a NUL character"),
        (
            "/api/jobs",
            '{"kind": "train", "name": {"a\\ud800": 1}}',
            "the request body holds a lone surrogate",
        ),
        ("/api/jobs", "[" * 100_000 + "]" * 100_000, "the request body is not valid JSON"),
    ],
)
def test_bodies_of_the_wrong_shape_are_a_400_and_start_nothing(runs_dir, route, body, message):
    client = TestClient(create_app(str(runs_dir)), raise_server_exceptions=False)
    r = client.post(route, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"], r.text
    assert client.get("/api/jobs").json()["jobs"] == []


def test_a_nul_in_a_run_path_is_a_404_and_a_classifier_base_alone_answers_with_its_head(runs_dir, tmp_path):
    """`/api/run?path=%00` was a 500 (realpath's ValueError); the playground with a classifier base and no adapter
    loaded it without its head and failed on `.logits` (a 500)."""
    client = TestClient(create_app(str(runs_dir)), raise_server_exceptions=False)
    for route in ("/api/run", "/api/metrics"):
        r = client.get(route, params={"path": "good\x00"})
        assert r.status_code == 404 and r.json()["error"] == "no run folder 'good\\x00'"
    base = train_helpers.tiny_bert_folder(tmp_path / "bert")
    r = client.post("/api/playground", json={"base": base, "prompt": "w1 w2"})
    assert r.status_code == 200, r.text
    (answer,) = r.json()["answers"]
    assert r.json()["task"] == "classify" and len(answer["scores"]) == 2
    assert abs(sum(answer["scores"]) - 1) < 1e-5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "70000"], "--port must be from 0 (any free port) to 65535, got 70000"),
        (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid' can't be resolved"),
        (["--port", "{busy}"], "is already in use: stop what listens there or pick another --port"),
        (["--api-key", " "], "--api-key is set but empty: give a real key, or unset it to run without one"),
    ],
)
def test_bad_ui_options_end_with_one_line_and_never_start_a_server(argv, message, capsys, monkeypatch):
    """A port out of range was an OverflowError traceback, a bad host or a busy port an error from uvicorn after
    start-up, and an empty key silently meant no key."""
    import socket

    import uvicorn

    from deltatune import ui

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        argv = [a.replace("{busy}", str(busy.getsockname()[1])) for a in argv]
        assert ui.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("deltatune ui: error: ") and err.count("\n") == 1, err


def test_checkpoint_folders_with_non_ascii_digits_are_not_checkpoints(runs_dir):
    """'step-²' passes str.isdigit but int() refuses it: the run list failed for the whole folder."""
    for name in ("step-2", "step-²", "step-١٠", "step-10"):
        os.makedirs(runs_dir / "good" / "checkpoints" / name)
    found = {r["path"]: r for r in runs.scan(str(runs_dir))}
    assert found["good"]["checkpoints"] == ["step-2", "step-10"]


def test_a_run_without_a_summary_is_running_stopped_or_incomplete_by_its_files(runs_dir):
    """The README's run statuses: a run folder without summary.json is running while its files change, then
    stopped (resumable) when it left a checkpoint, else incomplete."""
    for name in ("fresh", "killed", "early"):
        _write(runs_dir / name / "train_config.yaml", "model: m\nmethod: lora\ndata: d.jsonl\n")
        _write(runs_dir / name / "metrics.jsonl", '{"step": 1, "train_loss": 1.0}\n')
    os.makedirs(runs_dir / "killed" / "checkpoints" / "step-1")
    old = time.time() - runs.RUNNING_WINDOW_S - 60
    for name in ("killed", "early"):
        for path in (runs_dir / name, *(runs_dir / name).iterdir()):
            os.utime(path, (old, old))
    found = {r["path"]: r for r in runs.scan(str(runs_dir))}
    assert {n: (found[n]["status"], found[n]["resumable"]) for n in ("fresh", "killed", "early")} == {
        "fresh": ("running", False),
        "killed": ("stopped", True),
        "early": ("incomplete", False),
    }


def test_other_sites_pages_cant_launch_jobs_or_rebind_the_board(runs_dir, monkeypatch):
    """The board launches jobs from POST /api/jobs and had no check of where a request came from: any web page
    the user opened could POST a `text/plain` body there (no CORS preflight, and `request.json()` doesn't look
    at the content type), and a page whose name was made to resolve to 127.0.0.1 could read every run."""
    from deltatune import ui

    seen = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(app=app, **kw))
    assert ui.main(["--runs", str(runs_dir), "--port", "0"]) == 0
    started = []
    monkeypatch.setattr(seen["app"].state.jobs, "start", lambda *a: started.append(a))
    client = TestClient(seen["app"], base_url="http://127.0.0.1:7860")
    body = '{"kind": "train", "model": "m", "data": "d.jsonl"}'
    for headers in (
        {"Origin": "https://evil.example", "Content-Type": "text/plain"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:3000"},  # another local port is another origin
        {"Sec-Fetch-Site": "cross-site"},
    ):
        r = client.post("/api/jobs", content=body, headers=headers)
        assert r.status_code == 403 and "another site's page was refused" in r.json()["error"], headers
    assert client.post("/api/jobs/nope/stop", headers={"Origin": "https://evil.example"}).status_code == 403
    # the playground too (the README: "launch or stop a job, the playground")
    r = client.post("/api/playground", content="{}", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "another site's page was refused" in r.json()["error"]
    assert started == []
    # the board's own page (same origin, as a browser sends it) and clients that send no Origin still work
    ok = client.post("/api/jobs", content="[]", headers={"Origin": "http://127.0.0.1:7860"})
    assert ok.status_code == 400 and ok.json()["error"] == "the request body must be a JSON object"
    assert client.post("/api/jobs/nope/stop").status_code == 404
    # DNS rebinding: the Host header names the attacker's domain; the local names pass, with or without port
    rebound = client.get("/api/runs", headers={"Host": "evil.example:7860"})
    assert rebound.status_code == 403 and "is not this server's address" in rebound.json()["error"]
    for bad in ("127.0.0.1.evil.example", "localhost.evil.example:7860", "evil.example#127.0.0.1"):
        assert client.get("/api/runs", headers={"Host": bad}).status_code == 403, bad
    for host in ("127.0.0.1:7860", "localhost:7860", "LOCALHOST", "[::1]:7860", ""):
        assert client.get("/api/runs", headers={"Host": host}).status_code == 200, host
    # Chromium opens http://localhost.:7860/ (the absolute name) on this machine and sends it as the Host: the
    # board's own page, on its own origin (it was refused 403, the page a JSON error)
    dotted = {"Host": "localhost.:7860", "Origin": "http://localhost.:7860"}
    assert client.get("/api/runs", headers=dotted).status_code == 200
    assert client.post("/api/jobs/nope/stop", headers=dotted).status_code == 404
    for bad in ("localhost..:7860", "evil.example.:7860", "localhost.evil.:7860"):
        assert client.get("/api/runs", headers={"Host": bad}).status_code == 403, bad
    # listening on another address (behind a name the user chose) checks no Host; cross-site POSTs still fail
    assert ui.main(["--runs", str(runs_dir), "--host", "0.0.0.0", "--port", "0"]) == 0
    client = TestClient(seen["app"], base_url="http://board.lan:7860")
    assert client.get("/api/runs").status_code == 200
    r = client.post("/api/jobs", content=body, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403


def test_loopback_hosts_in_any_spelling_keep_the_host_check_and_no_warning(
    runs_dir, monkeypatch, capsys, caplog
):
    """`--host 127.0.0.2` or `LOCALHOST` binds this machine only: it warned 'anyone who can reach it can use it',
    and `LOCALHOST` turned the DNS-rebinding check off; `--host ::1` printed http://::1:7860/, not a URL."""
    from deltatune import ui

    seen = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(app=app, **kw))
    for host in ("127.0.0.2", "LOCALHOST", "::1"):
        caplog.clear()
        assert ui.main(["--runs", str(runs_dir), "--host", host, "--port", "7861"]) == 0
        assert "without an API key" not in caplog.text, host
        client = TestClient(seen["app"], base_url="http://127.0.0.1:7861")
        assert client.get("/api/runs", headers={"Host": "evil.example:7861"}).status_code == 403, host
        assert client.get("/api/runs", headers={"Host": "localhost:7861"}).status_code == 200, host
    assert "deltatune ui: http://[::1]:7861/" in capsys.readouterr().out
    caplog.clear()
    assert ui.main(["--runs", str(runs_dir), "--host", "0.0.0.0", "--port", "7861"]) == 0
    assert "listening on 0.0.0.0 without an API key" in caplog.text


def test_a_run_training_in_another_process_shows_as_running_without_resume(runs_dir, tmp_path):
    """A run resumed from a terminal keeps its old summary.json ('interrupted') until it ends: the board listed
    it as interrupted with a Resume button, whose job then failed with 'output_dir is in use'. The lock that
    train and compare hold on their folder says it is running."""
    import subprocess
    import sys

    stopped = runs_dir / "stopped"
    _write(stopped / "train_config.yaml", "model: m\nmethod: lora\ndata: d.jsonl\n")
    _write(stopped / "summary.json", json.dumps({"status": "interrupted", "steps": 2}))
    os.makedirs(stopped / "checkpoints" / "step-2")
    old = 1_000_000_000  # not 'recently written' either
    for p in (stopped, stopped / "train_config.yaml", stopped / "summary.json"):
        os.utime(p, (old, old))
    client = TestClient(create_app(str(runs_dir)))
    info = client.get("/api/run", params={"path": "stopped"}).json()
    assert (info["status"], info["resumable"]) == ("interrupted", True)
    holder = subprocess.Popen(  # another process training there: it holds deltatune's own folder lock
        [
            sys.executable,
            "-c",
            "import sys, time; from deltatune.checkpoint import FolderLock; lock = FolderLock(); "
            "assert lock.acquire(sys.argv[1]); print('locked', flush=True); time.sleep(60)",
            str(stopped),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert runs.in_use(str(stopped)) and not runs.in_use(str(runs_dir / "good"))
        assert client.get("/api/run", params={"path": "stopped"}).json()["status"] == "running"
        listed = {r["name"]: r["status"] for r in client.get("/api/runs").json()["runs"]}
        assert listed["stopped"] == "running" and listed["good"] == "completed"
    finally:
        holder.kill()
        holder.wait()
    assert client.get("/api/run", params={"path": "stopped"}).json()["status"] == "interrupted"  # lock gone


def test_an_unknown_route_answers_the_boards_error_shape(runs_dir):
    """Every other error of the board is `{"error": ...}`; an unknown route was FastAPI's `{"detail": ...}`."""
    r = TestClient(create_app(str(runs_dir))).get("/api/nothing-here")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}


def test_allowed_host_lets_a_reverse_proxys_names_through(runs_dir, monkeypatch, capsys):
    """Behind a proxy, the browser's Host (or the page's Origin, where the proxy rewrites Host to 127.0.0.1) is the
    proxy's name: without a way to name it, the board answered 403 to everything (or to every POST)."""
    from deltatune import ui

    seen = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(app=app, **kw))
    argv = ["--runs", str(runs_dir), "--port", "0", "--allowed-host", "Board.Example.com"]
    assert ui.main(argv) == 0
    # the proxy passes the browser's Host
    proxied = TestClient(seen["app"], base_url="http://board.example.com")
    assert proxied.get("/api/runs").status_code == 200
    r = proxied.post("/api/jobs", content="[]", headers={"Origin": "https://board.example.com"})
    assert r.status_code == 400 and r.json()["error"] == "the request body must be a JSON object"
    # nginx's default: the upstream's Host, the page's Origin
    rewritten = TestClient(seen["app"], base_url="http://127.0.0.1:7860")
    r = rewritten.post("/api/jobs", content="[]", headers={"Origin": "https://board.example.com"})
    assert r.status_code == 400
    for origin in ("https://evil.example", "https://board.example.com.evil.example"):
        assert rewritten.post("/api/jobs", content="[]", headers={"Origin": origin}).status_code == 403
    assert rewritten.get("/api/runs", headers={"Host": "evil.example"}).status_code == 403
    capsys.readouterr()
    for bad in ("https://board.example.com", "board.example.com:443", "a/b", ""):
        assert ui.main(["--runs", str(runs_dir), "--allowed-host", bad]) == 2
        err = capsys.readouterr().err
        assert f"deltatune ui: error: --allowed-host {bad!r} is not a host name" in err
        assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("name", "files"),
    [
        (
            "nan-summary",
            {"summary.json": '{"status": "completed", "eval_accuracy": NaN, "total_steps": Infinity}'},
        ),
        (
            "nan-step",
            {"metrics.jsonl": '{"step": NaN, "eval_accuracy": 0.5}\n{"step": 1e999, "eval_loss": 1}\n'},
        ),
        ("nested-nan", {"metrics.jsonl": '{"step": 1, "lr_trials": [NaN, Infinity]}\n'}),
        ("deep", {"metrics.jsonl": '{"step": 1, "x": ' + "[" * 5000 + "]" * 5000 + "}\n"}),
        ("deep-summary", {"summary.json": '{"status": ' + "[" * 5000 + "]" * 5000 + "}"}),
        (
            "yaml-binary",
            {"train_config.yaml": "model: !!binary /w==\nmethod: lora\ndata: d\nmax_steps: .nan\n"},
        ),
        ("metrics-folder", {"metrics.jsonl/x": ""}),
        ("adapter-list", {"adapter/adapter_config.json": "[1]"}),
        ("adapter-nan", {"adapter/adapter_config.json": '{"peft_type": NaN}'}),
        (
            "cmp-inf",
            {"results.json": '{"methods": [{"method": "lora", "eval_accuracy": NaN, "lr": Infinity}]}'},
        ),
        ("cmp-spec-list", {"lora/compare_spec.json": "[1]", "lora/metrics.jsonl": ""}),
    ],
)
def test_a_damaged_run_file_is_a_problem_of_its_run_never_a_500(runs_dir, name, files):
    """NaN and Infinity (which Python's json writes: a diverged lr trial), nesting deeper than the encoder
    recurses, YAML's bytes, a folder for a file, and JSON of another shape each made a 500 of the whole run
    list, or of the run's page, metrics or the adapters list, hiding the good runs."""
    _write(runs_dir / name / "train_config.yaml", "model: m\nmethod: lora\ndata: d.jsonl\n")
    for rel, text in files.items():
        _write(runs_dir / name / rel, text)
    client = TestClient(create_app(str(runs_dir)), raise_server_exceptions=False)
    listed = client.get("/api/runs")
    assert listed.status_code == 200, listed.text
    assert {"good", name} <= {r["path"] for r in listed.json()["runs"]}
    for url in ("/api/run", "/api/metrics"):
        r = client.get(url, params={"path": name})
        assert r.status_code == 200, (url, r.text)
    assert client.get("/api/adapters").status_code == 200
    good = client.get("/api/metrics", params={"path": "good"}).json()
    assert [r["step"] for r in good["rows"]] == [0, 1, 2, 3]
