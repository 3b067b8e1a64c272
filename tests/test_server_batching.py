"""Continuous batching in `riverllm serve`: requests that run together answer exactly what they
answer alone (greedy and seeded sampling, every method, stop strings, chat and completion),
the queue and the KV pool have limits that answer 429 / 400 at once, finished and cancelled rows
free their KV blocks, and the paged KV pool gives the engine the very tensors the dense cache does.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import openai
import pytest
import torch

from conftest import tiny_model
from riverllm import RiverLM
from riverllm.policy import ExitPolicy
from riverllm.server import ServerSettings
from riverllm.server.kvpool import PagedKVCache
from serving import metrics, running_server, wait_idle
from single_thread import one_thread  # noqa: F401  (batch-invariance is exact single-threaded)

# (endpoint, prompt, request options): different methods, taus, sampling, stops, lengths.
REQUESTS = [
    ("chat", "Name two animals that live in the sea.", dict(max_tokens=20, temperature=0)),
    ("completion", "The three primary colors are", dict(max_tokens=12, temperature=0)),
    ("chat", "Tell me a joke.", dict(max_tokens=16, temperature=0.9, top_p=0.95, seed=7)),
    ("completion", "Once upon a time", dict(max_tokens=18, temperature=0.8, seed=1234)),
    ("completion", "1, 2, 3, 4,", dict(max_tokens=12, temperature=0, stop=[", 7"])),
    ("chat", "What is 2 + 2?", dict(max_tokens=8, temperature=0, extra_body={"method": "dense"})),
    ("chat", "What is 2 + 2?", dict(max_tokens=8, temperature=0, extra_body={"method": "w4"})),
    ("completion", "Rivers flow to the", dict(max_tokens=14, temperature=0, extra_body={"tau": 0.5})),
    ("chat", "Write a haiku about rain.", dict(max_tokens=24, temperature=0.7, seed=3,
                                             extra_body={"method": "river:0.8", "top_k": 40})),
    ("completion", "The capital of France is", dict(max_tokens=10, temperature=0, extra_body={"method": "mask:0.9"})),
    ("completion", "Rivers flow to the", dict(max_tokens=16, temperature=0, extra_body={"method": "lossless:0.9"})),
    ("chat", "Tell me a joke.", dict(max_tokens=14, temperature=0.8, seed=5, extra_body={"method": "lossless"})),
]


def library_options(endpoint: str, options: dict) -> dict:
    extra = dict(options.get("extra_body", {}))
    out = dict(raw=endpoint == "completion", max_new_tokens=options["max_tokens"],
               temperature=options["temperature"], top_p=options.get("top_p", 1.0), seed=options.get("seed"),
               stop=options.get("stop"), top_k=extra.pop("top_k", 0))
    return {**out, **extra}


def ask(client: openai.OpenAI, model: str, endpoint: str, prompt: str, options: dict, stream: bool):
    """(text, finish_reason, exit_layers) through the official client."""
    if endpoint == "chat":
        messages = [{"role": "user", "content": prompt}]
        if not stream:
            reply = client.chat.completions.create(model=model, messages=messages, **options)
            return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.model_extra["river"]["exit_layers"]
        chunks = list(client.chat.completions.create(model=model, messages=messages, stream=True, **options))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        if not stream:
            reply = client.completions.create(model=model, prompt=prompt, **options)
            return reply.choices[0].text, reply.choices[0].finish_reason, reply.model_extra["river"]["exit_layers"]
        chunks = list(client.completions.create(model=model, prompt=prompt, stream=True, **options))
        text = "".join(c.choices[0].text or "" for c in chunks if c.choices)
    last = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    return text, last.choices[0].finish_reason, last.model_extra["river"]["exit_layers"]


@pytest.fixture(scope="module")
def references(smollm2):
    smollm2.river()
    return [smollm2.generate(prompt if endpoint == "completion" else [{"role": "user", "content": prompt}],
                             **library_options(endpoint, options))
            for endpoint, prompt, options in REQUESTS]


@pytest.mark.parametrize("max_batch_size", [4, 16])
def test_concurrent_requests_answer_what_they_answer_alone(smollm2, references, max_batch_size):
    # 4 rows for 20 requests: requests wait, join at token boundaries and leave as they finish.
    with running_server(smollm2, ServerSettings(max_batch_size=max_batch_size)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        jobs = [(index, stream) for index in range(len(REQUESTS)) for stream in (False, True)]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: ask(client, smollm2.name, *REQUESTS[job[0]], job[1]), jobs))
        after = wait_idle(server)
    for (index, stream), (text, finish_reason, exit_layers) in zip(jobs, answers):
        expected = references[index]
        assert (text, finish_reason, exit_layers) == (expected.text, expected.finish_reason, expected.exit_layers), \
            (REQUESTS[index], stream)
    assert after["riverllm_mean_batch_size"] > 1.5  # the requests really ran together
    assert after["riverllm_decode_rows_total"] / after["riverllm_decode_steps_total"] == \
        pytest.approx(after["riverllm_mean_batch_size"], rel=1e-5)
    assert after["riverllm_max_batch_size"] == max_batch_size
    assert after["riverllm_kv_cache_used_tokens"] == 0  # every row gave its blocks back
    assert after["riverllm_generated_tokens_total"] == 2 * sum(len(r.token_ids) for r in references)


LONG = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 2000,
        "ignore_eos": True, "temperature": 0}


def post_and_leave(url: str, body: dict, timeout: float) -> None:
    """A client that gives up waiting after `timeout` seconds."""
    try:
        httpx.post(url, json=body, timeout=timeout)
    except httpx.ReadTimeout:
        pass


def test_full_queue_answers_429_with_retry_after_and_cancelled_rows_free_their_blocks(smollm2):
    with running_server(smollm2, ServerSettings(max_batch_size=1, max_queue=1)) as server:
        body = {"model": smollm2.name, **LONG}
        with server.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as running:
            lines = running.iter_lines()  # kept: a collected iterator would close the stream
            assert any('"content": "' in line for line in lines)  # it holds the only row
            deadline = time.time() + 30  # the first chunk (the role) may come before admission
            while metrics(server)["riverllm_kv_cache_used_tokens"] == 0 and time.time() < deadline:
                time.sleep(0.05)
            used = metrics(server)["riverllm_kv_cache_used_tokens"]
            assert used >= 2000  # prompt + max_tokens reserved, in whole blocks
            waiting = threading.Thread(target=post_and_leave, args=(server.url + "/v1/chat/completions", body, 2.0),
                                       daemon=True)
            waiting.start()  # takes the one waiting place, then leaves (its timeout)
            deadline = time.time() + 10
            while metrics(server)["riverllm_queue_length"] < 1 and time.time() < deadline:
                time.sleep(0.05)
            refused = server.http.post("/v1/chat/completions", json=body)
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "queue_full"
            assert 1 <= int(refused.headers["Retry-After"]) <= 60
            waiting.join(10)
        after = wait_idle(server)
        assert after["riverllm_kv_cache_used_tokens"] == 0 and after["riverllm_cancelled_total"] == 2
        assert server.http.get("/health").json()["status"] == "ok"


def test_request_larger_than_the_kv_pool_is_refused_before_it_waits(smollm2):
    with running_server(smollm2, ServerSettings(kv_cache_tokens=256)) as server:
        start = time.perf_counter()
        response = server.http.post("/v1/completions", json={"model": smollm2.name, "prompt": "hi",
                                                               "max_tokens": 300})
        assert response.status_code == 400 and time.perf_counter() - start < 5
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and "--kv-cache-tokens" in error["message"]
        fits = server.http.post("/v1/completions", json={"model": smollm2.name, "prompt": "hi", "max_tokens": 4,
                                                         "temperature": 0})
        assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] >= 1


def test_fifo_server_runs_one_request_at_a_time(smollm2, references):
    with running_server(smollm2, ServerSettings(max_batch_size=1)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: ask(client, smollm2.name, *REQUESTS[i], False), range(4)))
        after = wait_idle(server)
    assert [a[0] for a in answers] == [references[i].text for i in range(4)]
    assert after["riverllm_mean_batch_size"] == 1.0


# --- the paged KV pool ------------------------------------------------------------------------------


def test_paged_pool_gives_the_engine_what_the_dense_cache_does():
    lm = RiverLM(tiny_model("llama"), tokenizer=None)
    engine = lm.engine
    river = lm.river()
    policy = ExitPolicy(tau=0.5)
    prompts = [[5, 9, 13, 2], [7, 3], [11, 12, 13, 14, 15, 16, 17], [1, 2, 3]]
    pool = PagedKVCache(engine, rows=4, max_len=64, capacity_tokens=64, block_size=4)
    dense = engine.new_cache(4, 64)
    rows = [3, 0, 2, 1]  # pool rows in another order than the dense rows
    for i, prompt in enumerate(prompts):
        pool.reserve(rows[i], len(prompt) + 6)
        a = engine.prefill([prompt], pool, policy, river, rows=[rows[i]])
        b = engine.prefill([prompt], dense, policy, river, rows=[i])
        assert torch.equal(a.logits, b.logits) and a.exit_layers == b.exit_layers
    assert pool.free_blocks == 16 - sum(pool.blocks_for(len(p) + 6) for p in prompts)
    tokens = torch.tensor([[4], [8], [15], [16]])
    for _ in range(5):
        a = engine.forward(tokens, pool, policy, river, rows=rows)
        b = engine.forward(tokens, dense, policy, river, rows=[0, 1, 2, 3])
        assert torch.equal(a.logits, b.logits) and a.exit_layers == b.exit_layers
        tokens = a.logits.argmax(-1)[:, None]
    # a freed row's blocks go to the next request, which then decodes as it does alone
    pool.release(rows[2])
    dense.reset_row(2)
    assert pool.free_blocks == 8 and pool.can_reserve(32) and not pool.can_reserve(33)
    pool.reserve(rows[2], 32)
    a = engine.prefill([[9, 9, 9]], pool, policy, river, rows=[rows[2]])
    b = engine.prefill([[9, 9, 9]], dense, policy, river, rows=[2])
    assert torch.equal(a.logits, b.logits)
    for row in rows:
        pool.release(row)
    assert pool.free_blocks == pool.num_blocks and pool.used_tokens == 0
