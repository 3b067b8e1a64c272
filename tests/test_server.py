"""`riverllm serve`: a real uvicorn server on 127.0.0.1 with SmolLM2-135M, driven by the official
`openai` client and by raw HTTP. Answers must equal the library's `lm.generate` token for token
(text, finish_reason, usage and per-token exit layers), streamed or not; bad requests get their
4xx with an OpenAI-style body; a client that leaves frees the worker; 200 requests from 16
clients are all answered correctly (scripts/load_test.py)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from riverllm.errors import RiverError
from riverllm.server import ServerSettings, create_app
from riverllm.server.app import Preparer
from riverllm.server.schemas import CompletionRequest
from serving import running_server, wait_idle
from single_thread import one_thread  # noqa: F401  (the worker runs one thread; references here too)

API_KEY = "sk-river-test"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(smollm2):
    smollm2.river()  # built here, once, not inside the first request
    with running_server(smollm2, ServerSettings(api_key=API_KEY, max_prompt_tokens=4096)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def library(server, prompt, **options):
    """The same request through lm.generate (only while the server's worker is idle: one model user)."""
    wait_idle(server)
    return server.lm.generate(prompt, **options)


def river_of(response) -> dict:
    return response.model_extra["river"]


# --- answers equal the library's ---------------------------------------------------------------


def test_models_and_health(server, client):
    assert [model.id for model in client.models.list().data] == [server.lm.name]
    assert client.models.retrieve(server.lm.name).id == server.lm.name
    health = httpx.get(server.url + "/health")  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_completion_equals_library_generate(server, client):
    prompt = "The three primary colors are"
    response = client.completions.create(model=server.lm.name, prompt=prompt, max_tokens=12, temperature=0)
    expected = library(server, prompt, raw=True, max_new_tokens=12)
    choice = response.choices[0]
    assert choice.text == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (expected.prompt_tokens,
                                                                                len(expected.token_ids))
    river = river_of(response)
    assert river["exit_layers"] == expected.exit_layers
    assert (river["method"], river["tau"], river["num_layers"]) == ("river", server.lm.default_tau(), 30)
    assert river["mean_exit_layer"] == pytest.approx(expected.mean_exit_layer)

    chunks = list(client.completions.create(model=server.lm.name, prompt=prompt, max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason
    assert river_of(chunks[-1])["exit_layers"] == expected.exit_layers


def test_chat_streamed_equals_non_streamed_equals_library(server, client):
    messages = [{"role": "user", "content": "Name two animals that live in the sea."}]
    full = client.chat.completions.create(model=server.lm.name, messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=server.lm.name, messages=messages, max_tokens=16,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    expected = library(server, messages, max_new_tokens=16)

    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == full.choices[0].message.content == expected.text
    assert expected.text  # a real answer, not two empty strings
    assert full.choices[0].message.role == "assistant"
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert river_of(finish[0])["exit_layers"] == river_of(full)["exit_layers"] == expected.exit_layers
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert full.usage.prompt_tokens == expected.prompt_tokens == chunks[-1].usage.prompt_tokens


@pytest.mark.parametrize("extra, library_options, method_name", [
    ({"method": "dense"}, {"method": "dense"}, "dense"),
    ({"tau": 0.5}, {"tau": 0.5}, "river:0.5"),
    ({"method": "w4"}, {"method": "w4"}, "w4"),
])
def test_per_request_river_options(server, client, extra, library_options, method_name):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    response = client.chat.completions.create(model=server.lm.name, messages=messages, max_tokens=8,
                                              temperature=0, extra_body=extra)
    expected = library(server, messages, max_new_tokens=8, **library_options)
    river = river_of(response)
    assert response.choices[0].message.content == expected.text
    assert river["method"] == method_name
    assert river["exit_layers"] == expected.exit_layers
    if method_name == "dense":
        assert river["exit_layers"] == [30] * len(expected.token_ids) and river["tau"] is None
    if method_name == "w4":
        assert set(river["exit_layers"]) == {0} and river["full_precision_share"] == 0
    if "tau" in extra:
        assert river["tau"] == 0.5


def test_stop_string_streamed_equals_non_streamed(server, client):
    prompt, stop = "1, 2, 3, 4,", [", 7"]
    unstopped = library(server, prompt, raw=True, max_new_tokens=12)
    assert ", 7" in unstopped.text  # the stop string really comes up, spread over tokens
    expected = library(server, prompt, raw=True, max_new_tokens=12, stop=stop)
    full = client.completions.create(model=server.lm.name, prompt=prompt, max_tokens=12, temperature=0, stop=stop)
    chunks = list(client.completions.create(model=server.lm.name, prompt=prompt, max_tokens=12, temperature=0,
                                            stop=stop, stream=True))
    assert full.choices[0].text == "".join(c.choices[0].text for c in chunks) == expected.text
    assert ", 7" not in expected.text and full.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_equals_library(server, client):
    options = dict(model=server.lm.name, prompt="Once upon a time", max_tokens=10, temperature=0.9, top_p=0.95,
                   seed=1234)
    first = client.completions.create(**options).choices[0].text
    second = client.completions.create(**options).choices[0].text
    other_seed = client.completions.create(**{**options, "seed": 99}).choices[0].text
    expected = library(server, "Once upon a time", raw=True, max_new_tokens=10, temperature=0.9, top_p=0.95,
                       seed=1234)
    assert first == second == expected.text
    assert other_seed != first


@pytest.mark.parametrize("server_tau, request_fields, method_name, tau", [
    (0.5, {}, "river:0.5", 0.5),  # the server's --tau goes with its default method
    (0.5, {"tau": 0.7}, "river:0.7", 0.7),  # the request's tau wins
    (0.5, {"method": "river"}, "river", "model default"),  # a request naming its method: that method's default
    (0.5, {"method": "dense"}, "dense", None),
    (None, {"method": "river:0.8"}, "river:0.8", 0.8),
])
def test_method_and_tau_resolution(smollm2, server_tau, request_fields, method_name, tau):
    prepare = Preparer(smollm2, ServerSettings(tau=server_tau))
    body = CompletionRequest(model=smollm2.name, prompt="hi", **request_fields)
    prepared = prepare(body, "hi", raw=True, prompt_param="prompt")
    assert prepared.options["method"].name == method_name
    assert prepared.tau == (smollm2.default_tau() if tau == "model default" else tau)
    assert prepared.prompt_tokens == len(smollm2.encode("hi", raw=True))


# --- bad requests --------------------------------------------------------------------------------

LONG_PROMPT = "word " * 9000


@pytest.mark.parametrize("path, body, status, param, code", [
    ("/v1/chat/completions", b'{"model": "smollm2-135m", "messages": [', 400, None, None),  # malformed JSON
    ("/v1/completions", b"[1, 2]", 400, None, None),  # JSON, but not an object
    ("/v1/completions", {"model": "smollm2-135m", "prompt": "hi", "max_tokens": "8"}, 400, "max_tokens", None),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": "hi", "temperature": -1}, 400, "temperature", None),
    ("/v1/completions", b'{"model": "smollm2-135m", "prompt": "hi", "temperature": NaN}', 400, "temperature", None),
    ("/v1/completions", b'{"model": "smollm2-135m", "prompt": "hi", "tau": NaN}', 400, "tau", None),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": "hi", "top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": 5}, 400, "prompt", None),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": "hi", "stop": [1]}, 400, "stop", None),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": "hi", "stream": "yes"}, 400, "stream", None),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": "hi", "seed": -1}, 400, "seed", None),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": ["a", "b"]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "hi"}, 400, "model", None),
    ("/v1/completions", {"model": "gpt-4o", "prompt": "hi"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True},
     404, "model", "model_not_found"),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": "hi", "n": 2}, 400, "n", None),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": "hi", "logprobs": 2}, 400, "logprobs", None),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": "hi", "max_tokens": 8192}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": LONG_PROMPT, "max_tokens": 8}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"model": "smollm2-135m", "messages": [{"role": "user", "content": LONG_PROMPT}]},
     400, "messages", "context_length_exceeded"),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": "hi", "tau": 50}, 400, "tau", None),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": "hi", "tau": 0.5, "method": "dense"}, 400, "tau", None),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": "hi", "method": "turbo"}, 400, "method", None),
    ("/v1/chat/completions", {"model": "smollm2-135m", "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"model": "smollm2-135m", "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages.0.role", None),
    ("/v1/chat/completions", {"model": "smollm2-135m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages.0.content", None),
    ("/v1/chat/completions", {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", None),
])
def test_bad_request_gets_4xx_with_openai_error_body(server, path, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = server.http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["code"] == code
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error


def test_openai_client_raises_the_right_errors(server, client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=server.lm.name, prompt=LONG_PROMPT, max_tokens=4)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize("method, path, headers, status", [
    ("GET", "/v1/models", {}, 401),  # no key
    ("POST", "/v1/completions", {"Authorization": "Bearer wrong"}, 401),  # refused before the body is read
    ("GET", "/v1/nothing-here", {"Authorization": f"Bearer {API_KEY}"}, 404),
    ("GET", "/v1/models/gpt-4o", {"Authorization": f"Bearer {API_KEY}"}, 404),
    ("GET", "/v1/completions", {"Authorization": f"Bearer {API_KEY}"}, 405),
    ("GET", "/metrics", {}, 200),  # monitoring needs no key
])
def test_auth_and_routes(server, method, path, headers, status):
    response = httpx.request(method, server.url + path, headers=headers, content=b"{not json")
    assert response.status_code == status
    if status >= 400:
        assert response.json()["error"]["message"]
    if status == 401:
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_server_is_healthy_after_bad_requests(server, client):
    assert server.http.get("/health").json()["status"] == "ok"
    assert client.completions.create(model=server.lm.name, prompt="Hello", max_tokens=2, temperature=0).choices


# --- clients that leave ----------------------------------------------------------------------------

LONG_REQUEST = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": 2000, "ignore_eos": True, "temperature": 0}


def test_client_leaving_mid_stream_frees_the_worker(server):
    before = wait_idle(server)
    with server.http.stream("POST", "/v1/chat/completions", json={**LONG_REQUEST, "stream": True}) as response:
        assert response.status_code == 200
        received = 0
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content": "' in line:
                received += 1
                if received == 3:
                    break  # leave with 1997 tokens still to come
    after = wait_idle(server)
    assert after["riverllm_cancelled_total"] == before["riverllm_cancelled_total"] + 1
    assert after["riverllm_generated_tokens_total"] - before["riverllm_generated_tokens_total"] < 500


def test_clients_leaving_while_waiting_or_before_a_full_answer_free_their_place(server):
    before = wait_idle(server)
    with server.http.stream("POST", "/v1/chat/completions", json={**LONG_REQUEST, "stream": True}) as running:
        lines = running.iter_lines()  # kept open: the stream holds the worker
        assert any('"content": "' in line for line in lines)
        with pytest.raises(httpx.ReadTimeout):  # a non-streamed request that waits in the queue, then leaves
            server.http.post("/v1/chat/completions", json=LONG_REQUEST, timeout=1.0)
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request that leaves while it is generated
        server.http.post("/v1/chat/completions", json=LONG_REQUEST, timeout=2.0)
    after = wait_idle(server)
    assert after["riverllm_cancelled_total"] == before["riverllm_cancelled_total"] + 3
    # 3 x 2000 tokens asked for; far fewer made (how many depends on the machine's speed)
    assert after["riverllm_generated_tokens_total"] - before["riverllm_generated_tokens_total"] < 1000
    assert server.http.get("/health").json() == {"status": "ok", "model": "smollm2-135m", "queue_length": 0}


# --- load ----------------------------------------------------------------------------------------------


def test_load_200_requests_from_16_clients_all_correct(server, script):
    load_test = script("load_test")
    before = wait_idle(server)
    report = asyncio.run(load_test.run_load(server.url, requests=200, concurrency=16, max_tokens=4,
                                            api_key=API_KEY))
    assert report["failures"] == []
    assert report["correct"] == 200
    assert report["streamed"] > 50 and report["cancelled"] > 10  # the mix really happened
    assert report["healthy_after"]
    assert report["mean_batch_size_load"] > 1.5  # rows per step while the 16 clients ran
    after = wait_idle(server)
    assert after["riverllm_queue_length"] == 0
    requests = 200 + 8  # the load plus one reference per prompt and endpoint
    answered = after["riverllm_generated_tokens_total"] - before["riverllm_generated_tokens_total"]
    assert answered <= 4 * requests


# --- limits against hostile clients -------------------------------------------------------------------


def raw_request(server, headers: bytes, body: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=30) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           + f"Authorization: Bearer {API_KEY}\r\n".encode() + headers + b"\r\n" + body)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
            if b"}" in answer:
                break
    return answer


def test_limits_each_answered_with_the_right_status(server):
    hi = {"model": server.lm.name, "prompt": "hi", "max_tokens": 2}
    # Raw sockets: the 413 comes before the rest of the body is read, so a client still sending
    # a large body may be reset; these send no more than the server reads.
    declared = raw_request(server, b"Content-Length: 2097152\r\n", b"")
    assert declared.startswith(b"HTTP/1.1 413"), declared[:200]
    chunk = b"x" * 65536
    chunked = raw_request(server, b"Transfer-Encoding: chunked\r\n", (b"10000\r\n" + chunk + b"\r\n") * 17)
    assert chunked.startswith(b"HTTP/1.1 413") and b"request_too_large" in chunked, chunked[:200]
    long_prompt = server.http.post("/v1/completions", json={**hi, "prompt": "word " * 5000})
    assert long_prompt.status_code == 400 and "limit of 4096" in long_prompt.json()["error"]["message"]
    for temperature in (1e-300, 1e-30, 5e-324):  # logits / temperature would overflow
        tiny = server.http.post("/v1/completions", json={**hi, "temperature": temperature})
        assert tiny.status_code == 400 and tiny.json()["error"]["param"] == "temperature", tiny.text
    stops = server.http.post("/v1/completions", json={**hi, "stop": ["a", "b", "c", "d", "e"]})
    assert stops.status_code == 400 and stops.json()["error"]["param"] == "stop"
    long_stop = server.http.post("/v1/completions", json={**hi, "stop": ["x" * 1000]})
    assert long_stop.status_code == 400 and long_stop.json()["error"]["param"] == "stop"
    assert server.http.post("/v1/completions", json={**hi, "stop": ["a", "b", "c", "d"]}).status_code == 200


@pytest.mark.parametrize("header", [b"Bearer \xff\xfe", b"\xc3\xa9", b"Bearer", b"", b"Basic abc",
                                    b"Bearer " + API_KEY.encode() + b"\xe9"])
def test_malformed_authorization_is_a_401(server, header):
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as connection:
        connection.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: " + header +
                           b"\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


def test_docs_are_off_when_a_key_is_set(server):
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert server.http.get(path).status_code == 404
        assert httpx.get(server.url + path).status_code in (401, 404)


def test_every_answer_is_counted_500s_included(smollm2):
    app = create_app(smollm2, ServerSettings())

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    from fastapi.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as test_client:
        assert test_client.get("/boom").status_code == 500
        assert test_client.post("/v1/completions", content=b"x" * (2 << 20)).status_code == 413
        text = test_client.get("/metrics").text
    assert 'riverllm_requests_total{endpoint="other",status="500"} 1' in text
    assert 'riverllm_requests_total{endpoint="/v1/completions",status="413"} 1' in text


def test_hostile_clients_do_not_starve_ordinary_ones(server):
    """While 200 idle sockets stay open, 8 slow senders dribble a request byte by byte and 4
    clients send 2 MiB bodies, ordinary requests are answered within ORDINARY_BOUND_S each and
    /health within HEALTH_BOUND_S. Loopback only; the hostile clients stop after at most 20 s."""
    ORDINARY_BOUND_S, HEALTH_BOUND_S = 15.0, 2.0
    port = int(server.url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
    stop = threading.Event()

    def slow_sender() -> None:
        request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 100000\r\n\r\n" + b"x" * 1000)
        try:
            with socket.create_connection(("127.0.0.1", port)) as connection:
                for byte in request:
                    if stop.is_set():
                        return
                    connection.sendall(bytes([byte]))
                    time.sleep(0.05)
        except OSError:
            pass  # the server may close on us: that is allowed

    def large_bodies() -> None:
        while not stop.is_set():
            try:
                httpx.post(server.url + "/v1/completions", content=b"{" + b" " * (2 << 20) + b"}",
                           headers={"Authorization": f"Bearer {API_KEY}"}, timeout=20)
            except httpx.HTTPError:
                pass

    hostile = [threading.Thread(target=slow_sender) for _ in range(8)] + \
              [threading.Thread(target=large_bodies) for _ in range(4)]
    for thread in hostile:
        thread.start()
    try:
        time.sleep(0.5)
        for _ in range(4):
            started = time.monotonic()
            assert server.http.get("/health").status_code == 200
            assert time.monotonic() - started < HEALTH_BOUND_S
            started = time.monotonic()
            answer = server.http.post("/v1/completions", json={"model": server.lm.name, "prompt": "Hello",
                                                               "max_tokens": 4, "temperature": 0})
            assert answer.status_code == 200 and answer.json()["choices"][0]["text"] is not None
            assert time.monotonic() - started < ORDINARY_BOUND_S
    finally:
        stop.set()
        for connection in idle:
            connection.close()
        for thread in hostile:
            thread.join(20)


# --- the command -------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, words", [
    (dict(method="dense", tau=0.5), ["tau", "dense"]),
    (dict(method="turbo"), ["unknown method"]),
    (dict(tau=float("nan")), ["tau"]),
    (dict(port=70000), ["--port"]),
    (dict(max_queue=0), ["--max-queue"]),
])
def test_bad_server_settings_are_refused(settings, words):
    with pytest.raises(RiverError) as error:
        ServerSettings(**settings).check()
    assert all(word in str(error.value) for word in words), error.value


def test_serve_command_refuses_a_busy_port_before_loading_the_model():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-c", "from riverllm.cli import main; main()", "serve",
                               "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Loading" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "cannot listen" in error[0] and "--port" in error[0], proc.stderr
