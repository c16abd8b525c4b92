"""`deltatune ui` in a real headless Chromium (Debian's `chromium` + `chromedriver`, driven by Selenium).

Skipped, with the reason, where no browser is installed (`.ci/run` installs it with apt when it can). Set
DELTATUNE_UI_SCREENSHOTS=docs to save screenshots of the main pages (the README's are made this way).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time

import pytest
import train_helpers

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

BROWSER = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (BROWSER and DRIVER),
    reason="no headless browser: install Debian's chromium and chromium-driver (apt-get install -y chromium "
    "chromium-driver) for the browser tests",
)
SHOTS = os.environ.get("DELTATUNE_UI_SCREENSHOTS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """Tiny models and data, two runs made here (a classifier and a causal LM), the UI on a free port."""
    import uvicorn

    from deltatune.train import config_from_dict, run
    from deltatune.ui.app import create_app
    from deltatune.webguard import LOCAL_HOSTS

    root = tmp_path_factory.mktemp("board")
    paths = {
        "bert": train_helpers.tiny_bert_folder(root / "bert"),
        "opt": train_helpers.tiny_opt_folder(root / "opt"),
        "cls": train_helpers.classification_data(root / "cls.jsonl", n=32),
        "lm": str(root / "lm.jsonl"),
        "runs": str(root / "runs"),
    }
    (root / "lm.jsonl").write_text(
        "".join(
            json.dumps({"text": " ".join(f"w{(i * 7 + j) % 80 + 3}" for j in range(10))}) + "\n"
            for i in range(16)
        )
    )
    common = {"progress": False, "batch_size": 4, "log_every": 1}
    run(
        config_from_dict(
            {
                **common,
                "model": paths["bert"],
                "data": paths["cls"],
                "eval_fraction": 0.25,
                "max_steps": 4,
                "eval_every": 2,
                "output_dir": f"{paths['runs']}/made-by-test",
            }
        )
    )
    run(
        config_from_dict(
            {
                **common,
                "model": paths["opt"],
                "task": "causal-lm",
                "data": paths["lm"],
                "lr": 0.05,
                "max_steps": 4,
                "output_dir": f"{paths['runs']}/opt-lora",
            }
        )
    )
    app = create_app(paths["runs"], allowed_hosts=LOCAL_HOSTS)  # the guard `deltatune ui` runs with
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "app": app, **paths}
    server.should_exit = True
    thread.join(timeout=10)
    app.state.jobs.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1300,900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait(driver, predicate, timeout: float = 60, what: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: predicate(d), message=what)


def attr(driver, selector: str, name: str) -> str | None:
    """An attribute read in one step in the page (the page redraws its charts and job header as data comes)."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;",
        selector,
        name,
    )


def text(driver, selector: str) -> str | None:
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", selector
    )


def click(driver, selector: str) -> bool:
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); if (e) e.click(); return !!e;", selector
    )


def shot(driver, name: str, height: int = 900) -> None:
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        driver.set_window_size(1300, height)
        time.sleep(0.3)
        driver.save_screenshot(os.path.join(SHOTS, f"ui-{name}.png"))
        driver.set_window_size(1300, 900)


def test_run_list_shows_a_run_made_by_the_test(board, browser):
    browser.get(board["url"] + "/#/")
    row = wait(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-path="made-by-test"]'), what="run row"
    )[0]
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert (
        cells[0] == "made-by-test" and cells[1] == "train" and cells[2] == "completed" and cells[3] == "lora"
    )
    assert cells[6].startswith("accuracy ")  # the best eval accuracy of the run
    shot(browser, "runs", 500)
    row.find_element(By.TAG_NAME, "a").click()
    chart = wait(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-chart="loss"]'), what="loss chart"
    )[0]
    assert int(chart.get_attribute("data-points")) >= 4
    eval_chart = browser.find_element(By.CSS_SELECTOR, '[data-chart="eval"]')
    assert int(eval_chart.get_attribute("data-points")) >= 3  # eval at 0, 2 and the end


def test_live_curve_then_stop_leaves_a_resumable_checkpoint(board, browser):
    from deltatune.checkpoint import latest_checkpoint
    from deltatune.train import load_train_config, run

    browser.get(board["url"] + "/#/launch?kind=train")
    form = wait(browser, lambda d: d.find_elements(By.ID, "launch-form"), what="form")[0]
    for field, value in (
        ("model", board["bert"]),
        ("data", board["cls"]),
        ("steps", "100000"),
        ("name", "live"),
        ("batch_size", "4"),
    ):
        box = form.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "launch-submit").click()
    wait(browser, lambda d: "#/job?id=" in d.current_url, what="job page")
    job_url = browser.current_url
    out = os.path.join(os.path.realpath(board["runs"]), "live")
    wait(
        browser,
        lambda d: os.path.isfile(os.path.join(out, "metrics.jsonl")),
        timeout=120,
        what="training started",
    )
    browser.get(board["url"] + "/#/run?path=live")

    def points(d) -> int:
        return int(attr(d, '[data-chart="loss"]', "data-points") or 0)

    first = wait(browser, points, timeout=120, what="first points")
    wait(
        browser, lambda d: points(d) > first + 2, timeout=120, what="the curve gains points"
    )  # live, without reloading
    shot(browser, "run")
    browser.get(job_url)
    wait(browser, lambda d: click(d, "#job-stop"), what="stop button")
    wait(browser, lambda d: text(d, "#job-status") == "stopped", timeout=180, what="stopped")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    step = summary["steps"]
    assert latest_checkpoint(out).endswith(f"step-{step}")
    wait(
        browser, lambda d: "--resume" in (text(d, "#job-log") or ""), what="the log's last lines"
    )  # train's own message, streamed
    # resumable: continue it for two more steps
    resumed = run(
        load_train_config(
            os.path.join(out, "train_config.yaml"), [f"max_steps={step + 2}", "progress=false"]
        ),
        resume=True,
    )
    assert (
        resumed["status"] == "completed"
        and resumed["resumed_from_step"] == step
        and resumed["steps"] == step + 2
    )


def test_playground_answer_equals_generate(board, browser, capsys):
    from deltatune.tools import generate_main

    adapter = os.path.realpath(os.path.join(board["runs"], "opt-lora", "adapter"))
    browser.get(board["url"] + "/#/playground")
    select = wait(browser, lambda d: d.find_elements(By.ID, "adapter1"), what="playground")[0]
    Select(select).select_by_value(adapter)
    browser.find_element(By.ID, "prompt").send_keys("w5 w6 w7")
    box = browser.find_element(By.ID, "max_new_tokens")
    box.clear()
    box.send_keys("8")
    browser.find_element(By.ID, "play-run").click()
    answer = wait(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, '.answer[data-name="opt-lora"] .text'),
        what="answer",
    )[0].text
    base_answer = browser.find_element(By.CSS_SELECTOR, '.answer[data-name="base"] .text').text
    shot(browser, "playground", 700)
    generate_main(
        ["--base", board["opt"], "--adapter", adapter, "--prompt", "w5 w6 w7", "--max-new-tokens", "8"]
    )
    assert answer == capsys.readouterr().out.strip()
    assert base_answer.startswith("w5 w6 w7")


@pytest.mark.slow
def test_compare_from_the_form_matches_results_json(board, browser):
    browser.get(board["url"] + "/#/launch?kind=compare")
    form = wait(browser, lambda d: d.find_elements(By.ID, "launch-form"), what="form")[0]
    for field, value in (("model", board["bert"]), ("data", board["cls"]), ("steps", "3"), ("name", "cmp")):
        box = form.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    for box in form.find_elements(By.CSS_SELECTOR, 'input[name="methods"]'):
        if box.is_selected() != (box.get_attribute("value") in ("lora", "pfeiffer")):
            box.click()
    shot(browser, "launch", 760)
    browser.find_element(By.ID, "launch-submit").click()
    wait(browser, lambda d: "#/job?id=" in d.current_url, what="job page")
    wait(
        browser,
        lambda d: text(d, "#job-status") in ("completed", "failed"),
        timeout=600,
        what="compare finished",
    )
    assert text(browser, "#job-status") == "completed", text(browser, "#job-log")
    shot(browser, "job", 700)
    wait(browser, lambda d: click(d, "#job-out"), what="output link")
    table = wait(browser, lambda d: d.find_elements(By.ID, "compare-table"), what="compare table")[0]
    with open(os.path.join(board["runs"], "cmp", "results.json")) as f:
        results = json.load(f)
    shown = {}
    for row in table.find_elements(By.CSS_SELECTOR, "tbody tr"):
        for cell in row.find_elements(By.CSS_SELECTOR, "td[data-key]"):
            if cell.get_attribute("data-value") != "":
                shown[(row.get_attribute("data-method"), cell.get_attribute("data-key"))] = float(
                    cell.get_attribute("data-value")
                )
    expected = {}
    for record in results["methods"]:
        for key, value in record.items():
            if isinstance(value, dict):
                expected |= {
                    (record["method"], f"{key}.{k}"): v
                    for k, v in value.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)  # flags are not table numbers
                }
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                expected[(record["method"], key)] = value
    assert shown == pytest.approx(expected, rel=1e-12)
    assert {m for m, _ in shown} == {"lora", "pfeiffer"}
    chart = browser.find_element(By.CSS_SELECTOR, '[data-chart="train_loss"]')
    assert chart.get_attribute("data-points") == "2"
    shot(browser, "compare", 1300)
    browser.find_element(
        By.CSS_SELECTOR, '#method-toggles input[value="pfeiffer"]'
    ).click()  # toggle a method off
    chart = browser.find_element(By.CSS_SELECTOR, '[data-chart="train_loss"]')
    assert chart.get_attribute("data-points") == "1"


@pytest.mark.slow
@pytest.mark.skipif(
    not SHOTS or not os.environ.get("DELTATUNE_UI_RUNS"),
    reason="set DELTATUNE_UI_SCREENSHOTS "
    "(where to save) and DELTATUNE_UI_RUNS (a runs folder with a train run and a compare folder)",
)
def test_screenshots_of_real_runs(browser):
    """The README's screenshots: the board over real runs (MiniLM on builtin:spam), taken in the browser."""
    import uvicorn

    from deltatune.ui import runs as ui_runs
    from deltatune.ui.app import create_app

    root = os.environ["DELTATUNE_UI_RUNS"]
    app = create_app(root)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    try:
        found = {
            r["kind"]: r["path"]
            for r in reversed(ui_runs.scan(root))
            if r["kind"] != "train" or r.get("adapter")
        }
        browser.get(url + "/#/")
        wait(browser, lambda d: d.find_elements(By.ID, "runs-table"), what="runs")
        shot(browser, "runs", 470)
        browser.get(url + f"/#/run?path={found['train']}")
        wait(browser, lambda d: int(attr(d, '[data-chart="loss"]', "data-points") or 0) > 0, what="curves")
        shot(browser, "run", 900)
        browser.get(url + f"/#/compare?path={found['compare']}")
        wait(browser, lambda d: d.find_elements(By.ID, "compare-table"), what="compare")
        time.sleep(1)
        shot(browser, "compare", 1500)
        browser.get(url + "/#/launch?kind=compare")
        wait(browser, lambda d: d.find_elements(By.ID, "launch-form"), what="form")
        box = browser.find_element(By.ID, "data")
        box.clear()
        box.send_keys("emails.jsonl")
        browser.find_element(By.ID, "launch-submit").click()
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#launch-error .error"), what="form error")
        shot(browser, "launch", 820)
        adapters = [a["path"] for a in ui_runs.adapters(root) if "/" not in a["run"]][:2]
        browser.get(url + "/#/playground")
        wait(browser, lambda d: d.find_elements(By.ID, "adapter1"), what="playground")
        for i, adapter in enumerate(adapters, start=1):
            Select(browser.find_element(By.ID, f"adapter{i}")).select_by_value(adapter)
        browser.find_element(By.ID, "prompt").send_keys(
            "CONGRATULATIONS! You have WON $500! Click here to claim your prize"
        )
        browser.find_element(By.ID, "play-run").click()
        wait(
            browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".answer .score, #play-error"), 600, "answer"
        )
        assert not browser.find_elements(By.ID, "play-error"), text(browser, "#play-error")
        shot(browser, "playground", 960)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
