"""The OpenAI-compatible server through the real `openai` client: one `qwen2ms serve` process on a free local port."""
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from qwen2ms import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

# One server process for the module; its start (MindSpore import, model load) and the first compile of each
# prefill/decode bucket take most of the module's time.
pytestmark = pytest.mark.slow

KEY = "sk-qwen2ms-test"
NAME = "tiny-qwen2"
MAX_MODEL_LEN = 256
# The real Qwen2 vocabulary (the tokenizer's ids must fit) over a tiny random body.
TINY = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=151643,
            eos_token_id=151645, pad_token_id=151643)
HELLO = [{"role": "user", "content": "Hello there, who are you?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, qwen2_tokenizer_dir):
    folder = tmp_path_factory.mktemp("serve") / "tiny"
    Qwen2ForCausalLM(Qwen2Config(**TINY), seed=0).save_pretrained(folder)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (folder / name).write_bytes((qwen2_tokenizer_dir / name).read_bytes())
    return folder


class Server:
    """A `qwen2ms serve` subprocess, started through the real command line."""

    def __init__(self, folder, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        env = {k: v for k, v in os.environ.items() if k != "QWEN2MS_API_KEY"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qwen2ms.cli", "serve", str(folder), "--port", str(self.port), "--api-key", KEY,
             "--served-model-name", NAME, "--max-num-seqs", "2", "--max-model-len", str(MAX_MODEL_LEN),
             "--log-level", "warning"], stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout=240.0):
        start = time.time()
        while time.time() - start < timeout:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        pytest.fail(f"the server did not answer /health in {timeout} s:\n{self.output()}")

    def output(self):
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def metrics(self):
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def metric(self, name, **labels):
        want = dict(labels, model_name=NAME)
        for key, value in self.metrics().items():
            m = re.fullmatch(r"(\w+)\{(.*)\}", key)
            if m and m.group(1) == name and dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))) == want:
                return value
        return 0.0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def booting(checkpoint, tmp_path_factory):
    """The server process, started at once so that it loads and compiles while in-process tests run."""
    server = Server(checkpoint, tmp_path_factory.mktemp("serve_log") / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(booting):
    return booting.wait_ready()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=180, max_retries=0)


@pytest.fixture(scope="module")
def model(checkpoint):
    return Qwen2ForCausalLM.from_hf(checkpoint)


AUTH = {"Authorization": f"Bearer {KEY}"}


# ---------------------------------------------------------------------------------------------- chat on the engine
def test_cli_chat_reuses_earlier_turns_from_the_prefix_cache(booting, model):
    from qwen2ms.cli import EngineChat, chat_loop

    session = EngineChat(model, max_context=MAX_MODEL_LEN)
    lines = iter(["Hello there, who are you?", "And what can you do for me today?"])
    turns = []

    def read(prompt):
        if session.last is not None:
            turns.append(session.last)
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    history = chat_loop(session, None, {"max_new_tokens": 6, "do_sample": False}, MAX_MODEL_LEN, read=read,
                        write=lambda text: None)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    first, second = turns
    # turn 1: nothing cached; turn 2 reads turn 1's prompt (whole blocks of it) from the cache
    assert first.num_cached_tokens == 0
    block = session.engine.block_size
    assert second.num_cached_tokens >= len(first.prompt_token_ids) // block * block > 0
    assert session.engine.stats().num_blocks_used == 0


# ---------------------------------------------------------------------------------------------- the OpenAI API
def test_greedy_completion_equals_model_generate_with_usage(client, model):
    prompt = "The capital of France is"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, extra_body={
        "ignore_eos": True})
    want = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=[])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    n_prompt = len(model.tokenizer.encode(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 8, n_prompt + 8)
    assert r.model == NAME and r.object == "text_completion"


def test_chat_streams_the_same_text_as_without_streaming(client, model):
    r = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=6, temperature=0)
    text = r.choices[0].message.content
    prompt_ids = model.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=True)
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.total_tokens == len(prompt_ids) + \
        r.usage.completion_tokens and 1 <= r.usage.completion_tokens <= 6
    chunks = list(client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == r.usage.model_dump()


def test_max_tokens_and_stop_strings(client):
    base = dict(model=NAME, prompt="Once upon a time", temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(max_tokens=12, **base).choices[0]
    assert full.finish_reason == "length"
    text = full.text
    # a stop string from inside the text: the reply ends just before its first occurrence
    stop = next(text[k:k + 3] for k in range(1, len(text) - 3) if text.find(text[k:k + 3]) > 0)
    cut = client.completions.create(max_tokens=12, stop=[stop, "never appears"], **base).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.find(stop)]
    streamed = list(client.completions.create(max_tokens=12, stop=stop, stream=True, **base))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.text
    short = client.completions.create(max_tokens=3, **base)
    assert short.usage.completion_tokens == 3 and text.startswith(short.choices[0].text)


def test_n_samples_with_a_seed_and_several_prompts(client):
    kw = dict(model=NAME, max_tokens=5, temperature=1.0, seed=7, n=2, extra_body={"ignore_eos": True})
    r = client.completions.create(prompt="Tell me a story", **kw)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 10
    again = client.completions.create(prompt="Tell me a story", stream=True, **kw)
    texts = {0: "", 1: ""}
    for chunk in again:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == {c.index: c.text for c in r.choices}  # seeded sampling is reproducible per request
    two = client.completions.create(prompt=["Tell me a story", "Hi"], **kw)
    assert sorted(c.index for c in two.choices) == [0, 1, 2, 3]
    assert {c.index: c.text for c in two.choices if c.index < 2} == texts
    chat = client.chat.completions.create(messages=HELLO, **kw)
    assert len(chat.choices) == 2 and chat.usage.completion_tokens == 10


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list()] == [NAME]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("qwen2ms_num_requests_waiting", "qwen2ms_num_requests_running", "qwen2ms_kv_blocks_used",
                 "qwen2ms_generation_tokens_per_second", "qwen2ms_time_to_first_token_seconds_bucket",
                 "qwen2ms_generation_tokens_total", "qwen2ms_prompt_tokens_total"):
        assert name in metrics, name
    assert server.metric("qwen2ms_time_to_first_token_seconds_count") > 0
    assert server.metric("qwen2ms_kv_blocks_total") == 2 * MAX_MODEL_LEN // 16


# ---------------------------------------------------------------------------------------------- refusals
def error_of(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_bad_requests_get_openai_errors_and_the_server_lives_on(server):
    url = server.url + "/v1/completions"
    post = lambda body, **kw: httpx.post(url, content=body if isinstance(body, (bytes, str)) else json.dumps(body),
                                         headers=kw.get("headers", AUTH), timeout=60)
    assert "not valid JSON" in error_of(post(b'{"prompt": "x",'), 400)["message"]
    assert "JSON object" in error_of(post("[1, 2]"), 400)["message"]
    assert "empty" in error_of(post(b""), 400)["message"]
    e = error_of(post({"prompt": "x", "model": "gpt-4"}), 404)
    assert e["code"] == "model_not_found" and NAME in e["message"]
    e = error_of(post({"prompt": "hi " * 300}), 400)
    assert e["code"] == "context_length_exceeded" and "256" in e["message"]
    e = error_of(post({"prompt": "hi", "max_tokens": MAX_MODEL_LEN}), 400)
    assert e["param"] == "max_tokens" and "at most" in e["message"]
    for field, value in (("temperature", -1), ("top_p", 2), ("top_k", -5), ("repetition_penalty", 0),
                         ("max_tokens", 0), ("seed", -1), ("presence_penalty", 3), ("frequency_penalty", -2.5)):
        e = error_of(post({"prompt": "hi", field: value}), 400)
        assert e["param"] == field and field in e["message"], e
    assert "needs sampling" in error_of(post({"prompt": "hi", "n": 2, "temperature": 0}), 400)["message"]
    assert error_of(post({"prompt": ["a", "b"], "n": 200, "temperature": 1}), 400)["param"] == "n"  # 400 > 256
    assert error_of(post({"prompt": "hi", "max_token": 3}), 400)["param"] == "max_token"  # misspelt: refused
    assert error_of(post({"prompt": [10 ** 9]}), 400)["param"] == "prompt"
    assert error_of(post({"prompt": "hi", "logprobs": 2}), 400)["param"] == "logprobs"
    assert error_of(post({"prompt": "hi", "temperature": "hot"}), 400)["param"] == "temperature"
    chat = server.url + "/v1/chat/completions"
    e = error_of(httpx.post(chat, json={"messages": []}, headers=AUTH), 400)
    assert e["param"] == "messages"
    e = error_of(httpx.post(chat, json={"messages": [{"role": "wizard", "content": "x"}]}, headers=AUTH), 400)
    assert "role" in e["param"]
    error_of(httpx.get(server.url + "/v1/nothing", headers=AUTH), 404)
    assert httpx.get(server.url + "/health").status_code == 200


def test_api_key_is_required(server):
    r = httpx.get(server.url + "/v1/models")
    assert error_of(r, 401)["type"] == "authentication_error"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer nope"})
    assert error_of(r, 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 4) | st.floats(-2, 3) | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                 max_size=3), max_leaves=6)
FIELDS = st.sampled_from(["prompt", "messages", "model", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
                          "stream", "top_k", "logprobs", "echo", "min_tokens", "stop_token_ids"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(FIELDS, JSON, max_size=5) | JSON | st.binary(max_size=24),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzzed_bodies_are_refused_or_served_never_a_500(server, body, path):
    content = body if isinstance(body, bytes) else json.dumps(body)
    r = httpx.post(server.url + path, content=content, headers=AUTH, timeout=60)
    assert r.status_code in (200, 400, 404), r.text
    if r.status_code != 200:
        error_of(r, r.status_code)


# ---------------------------------------------------------------------------------------------- disconnect, SIGTERM
def wait_for(condition, timeout, what):
    start = time.time()
    while time.time() - start < timeout:
        if condition():
            return time.time() - start
        time.sleep(0.05)
    pytest.fail(f"{what} did not happen within {timeout} s")


def test_a_client_that_hangs_up_mid_stream_frees_its_blocks(server):
    aborted = server.metric("qwen2ms_request_success_total", finished_reason="abort")
    generated = server.metric("qwen2ms_generation_tokens_total")
    body = {"prompt": [9707], "max_tokens": MAX_MODEL_LEN - 1, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # (a loop that breaks would close it, and so the connection, at once)
            events = [line for line in itertools.islice(lines, 6) if line.startswith("data: {")]
            assert len(events) == 3
            assert server.metric("qwen2ms_kv_blocks_used") > 0  # the request holds its blocks while it runs
            assert server.metric("qwen2ms_num_requests_running") == 1
    wait_for(lambda: server.metric("qwen2ms_request_success_total", finished_reason="abort") == aborted + 1, 10,
             "the abort")
    assert server.metric("qwen2ms_kv_blocks_used") == 0 and server.metric("qwen2ms_num_requests_running") == 0
    time.sleep(0.5)
    assert server.metric("qwen2ms_generation_tokens_total") - generated < MAX_MODEL_LEN // 2  # it stopped early


def test_sigterm_drains_running_requests_then_exits(server, client):
    """Last in the module: it stops the shared server."""
    started, done = threading.Event(), {}

    def run():
        stream = client.completions.create(model=NAME, prompt="Count with me:", max_tokens=40, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        text, finish = "", None
        for chunk in stream:
            started.set()
            for c in chunk.choices:
                text += c.text
                finish = c.finish_reason or finish
            done["usage"] = chunk.usage
        done.update(text=text, finish=finish)

    worker = threading.Thread(target=run)
    worker.start()
    assert started.wait(120)
    server.proc.send_signal(signal.SIGTERM)
    worker.join(120)
    assert done.get("finish") == "length" and done["usage"].completion_tokens == 40  # finished in full
    assert server.proc.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=5)
