"""`deltatune serve` over real HTTP on 127.0.0.1: a tiny random GPT-2 with two LoRA adapters (and a tiny BERT
classifier with two SEQ_CLS adapters), concurrent requests batched into mixed-adapter calls and checked against
`generate` (or the forward pass) of each adapter alone, runtime load/unload, sampling, and every kind of bad
input. All traffic goes to 127.0.0.1, bounded in count and time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.serve import Engine, create_app

WORDS = ["[PAD]", "[UNK]", "</s>", "user", "assistant", "system", *(f"w{i}" for i in range(90))]
EOS = 2
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)
BASE = "tiny"
KEY = "s3cret-key"
CAP = 24
BODY_CAP = 4096
SPARE = ("gamma", "delta")


def _tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>"
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def _save_lora(base_dir: str, out: str, seed: int, r: int, cls: type, **kwargs) -> None:
    model = cls.from_pretrained(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, **kwargs)
    get_peft_model(model, config).save_pretrained(out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base = str(root / BASE)
    torch.manual_seed(0)
    gpt2 = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=len(WORDS),
        n_positions=64,
        initializer_range=0.2,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    GPT2LMHeadModel(gpt2).save_pretrained(base)
    _tokenizer(chat=True).save_pretrained(base)
    adapters = root / "adapters"
    for name, seed, r in (("alpha", 1, 4), ("beta", 2, 8)):
        _save_lora(base, str(adapters / name), seed, r, AutoModelForCausalLM, task_type="CAUSAL_LM")
    _save_lora(base, str(root / "spare" / "gamma"), 3, 2, AutoModelForCausalLM, task_type="CAUSAL_LM")
    _save_lora(
        base, str(root / "spare" / "delta"), 6, 4, AutoModelForCausalLM, task_type="CAUSAL_LM", use_dora=True
    )
    (adapters / "not_an_adapter").mkdir()
    (adapters / "broken").mkdir()
    (adapters / "broken" / "adapter_config.json").write_text("{not json")
    shutil.copytree(adapters / "alpha", adapters / "corrupt")
    (adapters / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00" * 20)

    cls_base = str(root / "cls")
    torch.manual_seed(0)
    bert = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=len(WORDS),
        max_position_embeddings=64,
        num_labels=3,
        id2label={0: "ham", 1: "spam", 2: "other"},
    )
    BertForSequenceClassification(bert).save_pretrained(cls_base)
    _tokenizer(chat=False).save_pretrained(cls_base)
    cls_adapters = root / "cls_adapters"
    for name, seed in (("sentiment", 4), ("topic", 5)):
        _save_lora(
            cls_base,
            str(cls_adapters / name),
            seed,
            4,
            AutoModelForSequenceClassification,
            task_type="SEQ_CLS",
            target_modules=["query", "value"],
        )
    with open(cls_adapters / "sentiment" / "config.json", "w") as f:
        json.dump({"id2label": {"0": "neg", "1": "neu", "2": "pos"}}, f)
    with open(cls_adapters / "topic" / "label_map.json", "w") as f:  # as `deltatune train` writes it
        json.dump({"sport": 1, "news": 0, "tech": 2}, f)
    return {
        "root": root,
        "base": base,
        "adapters": str(adapters),
        "cls_base": cls_base,
        "cls_adapters": str(cls_adapters),
    }


class _Server:
    """uvicorn in a thread, on a socket bound to 127.0.0.1 port 0 (no port race)."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def _client(url: str, key: str | None = KEY) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=60, trust_env=False)


@pytest.fixture(scope="module")
def causal(files):
    engine = Engine(
        files["base"], files["adapters"], base_name=BASE, max_batch=16, batch_wait_ms=5, device="cpu"
    )
    server = _Server(create_app(engine, api_key=KEY, max_tokens_cap=CAP, max_body_bytes=BODY_CAP))
    with _client(server.url) as client:
        yield engine, client
    server.stop()


@pytest.fixture(scope="module")
def static(files):
    """The same server with `--scheduler static` (one `generate` per batch)."""
    engine = Engine(
        files["base"], files["adapters"], base_name=BASE, batch_wait_ms=5, device="cpu", scheduler="static"
    )
    server = _Server(create_app(engine, api_key=KEY, max_tokens_cap=CAP, max_body_bytes=BODY_CAP))
    with _client(server.url) as client:
        yield engine, client
    server.stop()


@pytest.fixture(scope="module")
def classifier(files):
    engine = Engine(files["cls_base"], files["cls_adapters"], base_name="cls", batch_wait_ms=5, device="cpu")
    server = _Server(create_app(engine))
    with _client(server.url, key=None) as client:
        yield engine, client
    server.stop()


@pytest.fixture(scope="module")
def reference(files):
    """`generate` of one adapter alone (or the plain base), on its own freshly loaded model."""
    tokenizer = _tokenizer(chat=True)
    cache: dict[str, torch.nn.Module] = {}

    def run(model: str, prompt: str | list[int], max_tokens: int) -> str:
        if model not in cache:
            m = AutoModelForCausalLM.from_pretrained(files["base"]).eval()
            if model != BASE:
                where = str(files["root"] / "spare") if model in SPARE else files["adapters"]
                m = PeftModel.from_pretrained(m, os.path.join(where, model))
            cache[model] = m
        ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt
        with torch.inference_mode():
            out = cache[model].generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        tokens = out[0, len(ids) :].tolist()
        tokens = tokens[: tokens.index(EOS)] if EOS in tokens else tokens
        return tokenizer.decode(tokens, skip_special_tokens=True)

    return run


def _complete(client: httpx.Client, model: str, prompt, max_tokens: int, **kwargs) -> dict:
    r = client.post(
        "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens, **kwargs}
    )
    assert r.status_code == 200, r.text
    return r.json()


# ---- batching and correctness ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["continuous", "static"])
def test_concurrent_requests_for_two_adapters_and_base_are_batched_and_equal_generate_alone(
    request, scheduler, reference
):
    engine, client = request.getfixturevalue("causal" if scheduler == "continuous" else "static")
    jobs = [
        (model, prompt, max_tokens)
        for model in ("alpha", "beta", BASE)
        for prompt, max_tokens in (("w1 w2 w3", 12), ("w4 w5", 7), ("w10 w11 w12 w13 w14 w15 w16", 9))
    ]
    before = client.get("/health").json()["stats"]
    engine.batch_wait = 0.5  # long enough for all the concurrent requests to land in one window
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            replies = list(pool.map(lambda job: _complete(client, *job, temperature=0), jobs))
    finally:
        engine.batch_wait = 0.005
    after = client.get("/health").json()["stats"]

    for (model, prompt, max_tokens), reply in zip(jobs, replies):
        assert reply["object"] == "text_completion" and reply["model"] == model
        (choice,) = reply["choices"]
        assert choice["text"] == reference(model, prompt, max_tokens), (model, prompt)
        assert choice["finish_reason"] in ("length", "stop")
        assert reply["usage"]["prompt_tokens"] == len(prompt.split())
    texts = {
        model: [r["choices"][0]["text"] for (m, _, _), r in zip(jobs, replies) if m == model]
        for model in ("alpha", "beta", BASE)
    }
    assert texts["alpha"] != texts["beta"] != texts[BASE]  # the adapters really differ
    assert after["rows"] - before["rows"] == len(jobs)
    assert after["max_rows_per_call"] >= 2  # batched, not one request at a time
    assert after["max_adapters_per_call"] >= 2  # rows of different adapters shared a model call


def test_greedy_multiple_prompts_token_ids_and_n(causal, reference):
    _, client = causal
    reply = _complete(client, "beta", ["w7 w8", "w9 w10 w11"], 10, temperature=0, n=2)
    texts = [c["text"] for c in reply["choices"]]
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    assert texts == [reference("beta", "w7 w8", 10)] * 2 + [reference("beta", "w9 w10 w11", 10)] * 2
    # each prompt counts once however many choices it has (OpenAI's and vLLM's usage; it is prefilled once)
    assert reply["usage"] == {"prompt_tokens": 2 + 3, "completion_tokens": 4 * 10, "total_tokens": 45}
    reply = _complete(client, "beta", [[8, 9, 10, 11], [12]], 10, temperature=0)
    assert [c["text"] for c in reply["choices"]] == [
        reference("beta", [8, 9, 10, 11], 10),
        reference("beta", [12], 10),
    ]


def test_sampling_top_p_tiny_is_greedy_and_seed_is_reproducible_whatever_the_batch(causal, reference):
    engine, client = causal
    prompt = "w20 w21 w22"
    nucleus = _complete(client, "alpha", prompt, 12, temperature=1.5, top_p=1e-6)
    assert nucleus["choices"][0]["text"] == reference("alpha", prompt, 12)

    alone = _complete(client, "alpha", prompt, 12, temperature=1.5, seed=7)["choices"][0]["text"]
    engine.batch_wait = 0.3
    try:
        with ThreadPoolExecutor(4) as pool:
            kwargs = [{"seed": 7}, {"seed": 8}, {"temperature": 0}, {"seed": 7, "top_p": 0.9}]
            replies = list(
                pool.map(
                    lambda kw: _complete(client, "alpha", prompt, 12, **{"temperature": 1.5, **kw}), kwargs
                )
            )
    finally:
        engine.batch_wait = 0.005
    assert replies[0]["choices"][0]["text"] == alone
    assert replies[2]["choices"][0]["text"] == reference("alpha", prompt, 12)
    unseeded = {_complete(client, "alpha", prompt, 12, temperature=2)["choices"][0]["text"] for _ in range(3)}
    assert len(unseeded | {alone}) > 1  # sampling samples


def test_stop_strings_cut_the_text(causal, reference):
    _, client = causal
    full = reference("alpha", "w1 w2 w3", 12).split()
    stop = full[3]
    reply = _complete(client, "alpha", "w1 w2 w3", 12, temperature=0, stop=[stop, "never-there"])
    choice = reply["choices"][0]
    first = full.index(stop)
    assert choice["text"] == " ".join(full[:first]) + (" " if first else "")
    assert choice["finish_reason"] == "stop"


def test_chat_completions_use_the_chat_template(causal, reference):
    _, client = causal
    messages = [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2 w3"}]
    r = client.post(
        "/v1/chat/completions",
        json={"model": "beta", "messages": messages, "max_tokens": 8, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["content"] == reference("beta", "system w1 user w2 w3 assistant", 8)
    parts = [
        {"role": "system", "content": [{"type": "text", "text": "w1"}]},
        messages[1],
    ]  # OpenAI's parts form
    r = client.post(
        "/v1/chat/completions", json={"model": "beta", "messages": parts, "max_tokens": 8, "temperature": 0}
    )
    assert r.json()["choices"][0]["message"]["content"] == message["content"]


def test_chat_without_max_tokens_answers_up_to_the_context_within_the_cap(causal, reference):
    """OpenAI's chat (and vLLM) answer up to the end of the context when `max_tokens` is unset; completions keep
    the legacy default of 16. A chat reply cut at 16 tokens was what a new user got."""
    _, client = causal
    body = {"model": "beta", "messages": [{"role": "user", "content": "w2 w3"}], "temperature": 0}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == reference("beta", "user w2 w3 assistant", CAP)
    long = " ".join(["w4"] * 50)  # 64 positions: fewer than CAP are left after this prompt
    r = client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": long}]})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + CAP > 64
    want = reference("beta", f"user {long} assistant", 64 - usage["prompt_tokens"])
    assert r.json()["choices"][0]["message"]["content"] == want
    r = client.post("/v1/completions", json={"model": "beta", "prompt": "w2 w3", "temperature": 0})
    assert r.json()["choices"][0]["text"] == reference("beta", "w2 w3", 16)


UNSUPPORTED = [  # (endpoint, field, a value that would change the answer)
    ("completions", "best_of", 3),
    ("completions", "suffix", "w9"),
    ("completions", "echo", True),
    ("completions", "logprobs", 2),
    ("completions", "logprobs", 0),  # the sampled token's logprob (OpenAI's legacy API, vLLM); null: off
    ("chat/completions", "logprobs", True),
    ("chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("chat/completions", "tool_choice", "required"),
    ("chat/completions", "response_format", {"type": "json_object"}),
]


def test_openai_fields_this_server_does_not_do_are_refused_by_name_and_their_defaults_accepted(
    causal, reference
):
    """They were ignored: a request with best_of=3 or tools got an answer made without them."""
    _, client = causal
    chat = {"messages": [{"role": "user", "content": "w2 w3"}]}
    for endpoint, field, value in UNSUPPORTED:
        body = {
            "model": "beta",
            "max_tokens": 4,
            field: value,
            **(chat if "chat" in endpoint else {"prompt": "w1"}),
        }
        r = client.post(f"/v1/{endpoint}", json=body)
        assert r.status_code == 400, (field, r.text)
        error = r.json()["error"]
        assert error["code"] == "unsupported" and error["param"] == field, error
        assert error["message"].startswith(f"{field} is not supported by this server: leave it out"), error
    defaults = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "best_of": 1, "suffix": ""}
    answer = _complete(client, "beta", "w4 w5", 6, temperature=0, **defaults)["choices"][0]["text"]
    assert answer == reference("beta", "w4 w5", 6)
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "beta",
            "max_tokens": 4,
            **chat,
            "tool_choice": "none",
            "response_format": {"type": "text"},
        },
    )
    assert r.status_code == 200, r.text


def _penalized_greedy(files, adapter: str, prompt: list[int], max_tokens: int, freq, pres, bias) -> list[int]:
    """An independent greedy loop over the adapter's own model: full forward each step, then OpenAI's formula
    (logit + bias - count * frequency_penalty - (count > 0) * presence_penalty) over the tokens generated."""
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(files["base"]).eval(), os.path.join(files["adapters"], adapter)
    )
    ids, out = list(prompt), []
    with torch.inference_mode():
        for _ in range(max_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].clone()
            for token, value in bias.items():
                logits[token] += value
            for token in set(out):
                logits[token] -= out.count(token) * freq + pres
            token = int(logits.argmax())
            if token == EOS:
                break
            out.append(token)
            ids.append(token)
    return out


@pytest.mark.parametrize("server", ["causal", "static"])
def test_penalties_and_logit_bias_follow_openais_formula_in_both_schedulers(server, files, request):
    engine, client = request.getfixturevalue(server)
    prompt = [5, 9, 14]
    cases = [
        (1.5, 0.0, {}),
        (0.0, 2.0, {}),
        (0.7, 0.4, {"30": 4.0, "31": -100}),
        (-1.0, 0.0, {}),  # negative penalties favour repeats
    ]
    for freq, pres, bias in cases:
        body = {"model": "beta", "prompt": prompt, "max_tokens": 10, "temperature": 0}
        body |= {"frequency_penalty": freq, "presence_penalty": pres, "logit_bias": bias}
        got = client.post("/v1/completions", json=body)
        assert got.status_code == 200, got.text
        expected = _penalized_greedy(
            files, "beta", prompt, 10, freq, pres, {int(k): v for k, v in bias.items()}
        )
        assert got.json()["choices"][0]["text"] == engine.tokenizer.decode(expected, skip_special_tokens=True)
    plain = _complete(client, "beta", prompt, 10, temperature=0)["choices"][0]["text"]
    assert (
        plain
        != client.post(
            "/v1/completions",
            json={**body, "frequency_penalty": 2.0, "logit_bias": {}, "presence_penalty": 0},
        ).json()["choices"][0]["text"]
    )  # the penalty changes this answer: the cases above are not all the plain one
    forced = _complete(client, "beta", "w1", 5, temperature=0.9, seed=3, logit_bias={"40": 100})
    assert forced["choices"][0]["text"] == " ".join([engine.tokenizer.decode([40])] * 5)  # even when sampling
    for bias in ({"-1": 1}, {"999999": 1}, {"x": 1}, {"7": 101}):
        r = client.post(
            "/v1/completions", json={"model": "beta", "prompt": "w1", "max_tokens": 2, "logit_bias": bias}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text


def test_models_and_health(causal):
    engine, client = causal
    models = client.get("/v1/models").json()
    ids = [m["id"] for m in models["data"]]
    assert models["object"] == "list" and ids[0] == BASE and set(ids[1:]) >= {"alpha", "beta"}
    assert "not_an_adapter" not in ids and "broken" not in ids and "corrupt" not in ids
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["task"] == "CAUSAL_LM" and health["base"] == BASE
    assert "not valid JSON" in health["failed_adapters"]["broken"]
    assert "corrupt" in health["failed_adapters"]["corrupt"]


def test_load_and_unload_adapters_at_runtime(causal, files, reference):
    engine, client = causal
    shutil.copytree(files["root"] / "spare" / "gamma", os.path.join(files["adapters"], "extra", "gamma"))
    assert (
        client.post("/v1/completions", json={"model": "gamma", "prompt": "w1", "max_tokens": 3}).status_code
        == 404
    )

    r = client.post("/v1/adapters", json={"name": "gamma", "path": "extra/gamma"})
    assert r.status_code == 200, r.text
    assert "gamma" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert _complete(client, "gamma", "w5 w6", 8, temperature=0)["choices"][0]["text"] == reference(
        "gamma", "w5 w6", 8
    )
    assert client.post("/v1/adapters", json={"name": "gamma", "path": "extra/gamma"}).status_code == 409

    assert client.delete("/v1/adapters/gamma").status_code == 200
    assert client.delete("/v1/adapters/gamma").status_code == 404
    r = client.post("/v1/completions", json={"model": "gamma", "prompt": "w1", "max_tokens": 3})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

    # Down to the bare base and back: the base keeps serving, and reloads work.
    for name in ("alpha", "beta"):
        assert client.delete(f"/v1/adapters/{name}").status_code == 200
    assert _complete(client, BASE, "w1 w2", 6, temperature=0)["choices"][0]["text"] == reference(
        BASE, "w1 w2", 6
    )
    for name in ("alpha", "beta"):
        assert client.post("/v1/adapters", json={"name": name}).status_code == 200
    assert _complete(client, "alpha", "w1 w2", 6, temperature=0)["choices"][0]["text"] == reference(
        "alpha", "w1 w2", 6
    )


def test_dora_adapters_run_in_their_own_call_beside_a_mixed_batch(causal, files, reference):
    engine, client = causal
    shutil.copytree(files["root"] / "spare" / "delta", os.path.join(files["adapters"], "delta"))
    assert client.post("/v1/adapters", json={"name": "delta"}).status_code == 200
    jobs = [("delta", "w1 w2 w3", 8), ("alpha", "w1 w2 w3", 8), ("delta", "w30", 5), (BASE, "w30", 5)]
    engine.batch_wait = 0.3
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            replies = list(pool.map(lambda job: _complete(client, *job, temperature=0), jobs))
    finally:
        engine.batch_wait = 0.005
    for (model, prompt, max_tokens), reply in zip(jobs, replies):
        assert reply["choices"][0]["text"] == reference(model, prompt, max_tokens), model
    # the DoRA lane's layers keep `m / ||W + sBA||` between decoding steps (the weights were attached outside
    # `torch.inference_mode()`, so they have version counters), rather than recomputing it at every step
    from deltatune.methods import lora as lora_method

    layers = [layer for _, layer in lora_method.layers(engine.peft) if "delta" in layer.r]
    assert layers and all("delta" in layer.__dict__.get("_dora_factors", {}) for layer in layers)
    assert client.delete("/v1/adapters/delta").status_code == 200
    assert not any("delta" in layer.__dict__.get("_dora_factors", {}) for layer in layers)  # freed with it


def test_rows_that_together_would_overrun_the_context_run_in_separate_calls(static, reference):
    engine, client = static
    jobs = [("alpha", " ".join(["w4"] * 45), 4), ("beta", "w5 w6", CAP)]  # 45 + 24 > 64 in one padded batch
    before = engine.health()["stats"]["model_calls"]
    engine.batch_wait = 0.3
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            replies = list(pool.map(lambda job: _complete(client, *job, temperature=0), jobs))
    finally:
        engine.batch_wait = 0.005
    for (model, prompt, max_tokens), reply in zip(jobs, replies):
        assert reply["choices"][0]["text"] == reference(model, prompt, max_tokens)
    assert engine.health()["stats"]["model_calls"] - before == 2


def test_the_event_loop_answers_while_the_model_thread_is_busy(causal):
    engine, client = causal
    release = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        engine.call(lambda: release.wait(30))  # the model thread blocks as in a long step
        try:
            pending = pool.submit(_complete, client, "alpha", "w1", 3, temperature=0)
            time.sleep(0.2)
            t0 = time.monotonic()
            assert client.get("/health").status_code == 200
            assert client.get("/v1/models").status_code == 200
            assert time.monotonic() - t0 < 5
            assert not pending.done()
        finally:
            release.set()
        assert pending.result(timeout=60)["choices"][0]["text"]


# ---- classification --------------------------------------------------------------------------------------------
def test_classify_batches_adapters_and_returns_their_labels(classifier, files):
    engine, client = classifier
    texts = {"sentiment": ["w1 w2 w3", "w4"], "topic": ["w5 w6"], "cls": ["w7 w8 w9 w10"]}
    engine.batch_wait = 0.3
    try:
        with ThreadPoolExecutor(3) as pool:
            replies = dict(
                zip(
                    texts,
                    pool.map(
                        lambda m: client.post("/v1/classify", json={"model": m, "input": texts[m]}), texts
                    ),
                )
            )
    finally:
        engine.batch_wait = 0.005
    tokenizer = _tokenizer(chat=False)
    labels = {
        "sentiment": ["neg", "neu", "pos"],
        "topic": ["news", "sport", "tech"],
        "cls": ["ham", "spam", "other"],
    }
    for model, r in replies.items():
        assert r.status_code == 200, r.text
        body = r.json()
        ref = AutoModelForSequenceClassification.from_pretrained(files["cls_base"]).eval()
        if model != "cls":
            ref = PeftModel.from_pretrained(ref, os.path.join(files["cls_adapters"], model))
        for item, text in zip(body["data"], texts[model]):
            with torch.inference_mode():
                probs = ref(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0]
            assert list(item["probabilities"]) == labels[model]
            torch.testing.assert_close(
                torch.tensor(list(item["probabilities"].values())), probs, atol=1e-5, rtol=0
            )
            assert item["label"] == labels[model][int(probs.argmax())]
    assert engine.health()["stats"]["max_adapters_per_call"] >= 2


def test_each_endpoint_refuses_the_other_task(causal, classifier):
    _, client = causal
    r = client.post("/v1/classify", json={"model": "alpha", "input": "w1"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_task"
    _, cls_client = classifier
    r = cls_client.post("/v1/completions", json={"model": "sentiment", "prompt": "w1"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_task"
    r = cls_client.post("/v1/classify", json={"model": "topic", "input": " ".join(["w1"] * 65)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = cls_client.post("/v1/classify", json={"model": "topic", "input": []})
    assert r.status_code == 400
    r = cls_client.post(
        "/v1/chat/completions", json={"model": "cls", "messages": [{"role": "user", "content": "w1"}]}
    )
    assert r.status_code == 400


# ---- bad input ---------------------------------------------------------------------------------------------------
LONG = " ".join(["w3"] * 60)
BAD = [
    (
        "unknown adapter",
        "post",
        "/v1/completions",
        {"json": {"model": "nope", "prompt": "w1"}},
        404,
        "model_not_found",
    ),
    (
        "slash in name",
        "post",
        "/v1/completions",
        {"json": {"model": "a/b", "prompt": "w1"}},
        400,
        "invalid_model_name",
    ),
    (
        "dots in name",
        "post",
        "/v1/completions",
        {"json": {"model": "..", "prompt": "w1"}},
        400,
        "invalid_model_name",
    ),
    (
        "malformed json",
        "post",
        "/v1/completions",
        {"content": b'{"model": "alpha", "prompt": ', "headers": {"content-type": "application/json"}},
        400,
        "invalid_json",
    ),
    ("not an object", "post", "/v1/completions", {"json": ["alpha"]}, 400, "invalid_value"),
    ("missing prompt", "post", "/v1/completions", {"json": {"model": "alpha"}}, 400, "invalid_value"),
    ("missing model", "post", "/v1/completions", {"json": {"prompt": "w1"}}, 400, "invalid_value"),
    (
        "wrong type",
        "post",
        "/v1/completions",
        {"json": {"model": "alpha", "prompt": "w1", "max_tokens": "many"}},
        400,
        "invalid_value",
    ),
    (
        "temperature out of range",
        "post",
        "/v1/completions",
        {"json": {"model": "alpha", "prompt": "w1", "temperature": 9}},
        400,
        "invalid_value",
    ),
    (
        "max_tokens over the cap",
        "post",
        "/v1/completions",
        {"json": {"model": "alpha", "prompt": "w1", "max_tokens": CAP + 1}},
        400,
        "max_tokens_exceeded",
    ),
    (
        "prompt over the context",
        "post",
        "/v1/completions",
        {"json": {"model": "alpha", "prompt": LONG, "max_tokens": 8}},
        400,
        "context_length_exceeded",
    ),
    (
        "booleans as token ids",
        "post",
        "/v1/completions",
        {"json": {"model": "alpha", "prompt": [True, False]}},
        400,
        "invalid_value",
    ),
    (
        "token id outside the vocab",
        "post",
        "/v1/completions",
        {"json": {"model": "alpha", "prompt": [1, 5000]}},
        400,
        "invalid_value",
    ),
    (
        "empty prompt",
        "post",
        "/v1/completions",
        {"json": {"model": "alpha", "prompt": ""}},
        400,
        "invalid_value",
    ),
    (
        "empty messages",
        "post",
        "/v1/chat/completions",
        {"json": {"model": "alpha", "messages": []}},
        400,
        "invalid_value",
    ),
    ("load: slash in name", "post", "/v1/adapters", {"json": {"name": "x/y"}}, 400, "invalid_model_name"),
    ("load: dots in name", "post", "/v1/adapters", {"json": {"name": ".."}}, 400, "invalid_model_name"),
    (
        "load: path escapes",
        "post",
        "/v1/adapters",
        {"json": {"name": "x", "path": "../cls_adapters/topic"}},
        400,
        "invalid_path",
    ),
    (
        "load: absolute path",
        "post",
        "/v1/adapters",
        {"json": {"name": "x", "path": "/etc"}},
        400,
        "invalid_path",
    ),
    (
        "load: no such adapter",
        "post",
        "/v1/adapters",
        {"json": {"name": "missing"}},
        404,
        "adapter_not_found",
    ),
    (
        "load: not an adapter",
        "post",
        "/v1/adapters",
        {"json": {"name": "not_an_adapter"}},
        404,
        "adapter_not_found",
    ),
    ("load: corrupt weights", "post", "/v1/adapters", {"json": {"name": "corrupt"}}, 400, "adapter_invalid"),
    ("load: base name", "post", "/v1/adapters", {"json": {"name": BASE}}, 409, "name_taken"),
    ("unload: dots", "delete", "/v1/adapters/..x", {}, 400, "invalid_model_name"),
    ("unload: encoded slash", "delete", "/v1/adapters/..%2Fx", {}, 404, "not_found"),
    ("unload: unknown", "delete", "/v1/adapters/nope", {}, 404, "model_not_found"),
    ("unknown route", "get", "/v2/nothing", {}, 404, "not_found"),
]


@pytest.mark.parametrize(("case", "method", "path", "kwargs", "status", "code"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_with_a_json_error_and_the_server_keeps_serving(
    causal, case, method, path, kwargs, status, code
):
    _, client = causal
    r = client.request(method.upper(), path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert _complete(client, "alpha", "w1", 2, temperature=0)["choices"][0]["text"] is not None


def test_a_wrong_task_adapter_fails_to_load_with_a_clear_message(causal, files):
    _, client = causal
    shutil.copytree(os.path.join(files["cls_adapters"], "topic"), os.path.join(files["adapters"], "clsx"))
    r = client.post("/v1/adapters", json={"name": "clsx"})
    assert r.status_code == 400 and "SEQ_CLS" in r.json()["error"]["message"]
    assert "clsx" not in [m["id"] for m in client.get("/v1/models").json()["data"]]


def test_body_over_the_cap_is_refused_before_parsing(causal):
    _, client = causal
    big = {"model": "alpha", "prompt": "w1 " * BODY_CAP}
    r = client.post("/v1/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    chunks = (b"x" * 1024 for _ in range(8))  # no content-length: counted as it streams in
    r = client.post("/v1/completions", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_api_key_guards_every_endpoint(causal):
    engine, client = causal
    url = str(client.base_url)
    for key in (None, "wrong", KEY[:-1]):
        with _client(url, key) as anon:
            for method, path in (
                ("GET", "/health"),
                ("GET", "/v1/models"),
                ("POST", "/v1/completions"),
                ("POST", "/v1/adapters"),
                ("DELETE", "/v1/adapters/alpha"),
                ("GET", "/docs"),
            ):
                r = anon.request(method, path, json={"model": "alpha", "prompt": "w1"})
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with httpx.Client(base_url=url, headers={"x-api-key": KEY}, trust_env=False, timeout=60) as other:
        assert other.get("/health").status_code == 200
    assert "alpha" in engine.adapter_names


# ---- the command ------------------------------------------------------------------------------------------------
def test_the_serve_command_binds_localhost_reads_the_key_from_env_and_shuts_down_gracefully(files, reference):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DELTATUNE_API_KEY": "from-env"}
    cmd = [
        sys.executable,
        "-m",
        "deltatune",
        "serve",
        "--base",
        files["base"],
        "--adapters",
        files["adapters"],
        "--base-name",
        BASE,
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        with _client(url, "from-env") as client:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline, "deltatune serve did not come up"
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            with _client(url, None) as anon:
                assert anon.get("/health").status_code == 401
            text = _complete(client, "alpha", "w9 w8", 5, temperature=0)["choices"][0]["text"]
            assert text == reference("alpha", "w9 w8", 5)

            # SIGTERM with requests in flight: they finish, then the server exits.
            with ThreadPoolExecutor(3) as pool:
                futures = [
                    pool.submit(_complete, client, "beta", f"w{i} w2", CAP, temperature=0, n=4)
                    for i in range(3)
                ]
                time.sleep(0.3)
                proc.send_signal(signal.SIGTERM)
                replies = [f.result(timeout=60) for f in futures]
            for i, reply in enumerate(replies):
                assert [c["text"] for c in reply["choices"]] == [reference("beta", f"w{i} w2", CAP)] * 4
            assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
            assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=30)
