"""Reliability through a real server with tight limits: body size, admission (429), reward
faults and fallback, disconnects of multi-sample strategies, request ids, metrics, and an
engine process killed on purpose (detected, failed fast, restarted)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import psutil
import pytest

from tests.conftest import MODEL, engine_unfinished, start_server, stop_server

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Give me one tip for staying focused."}]


def build_faulty_reward_model(target):
    """A BERT reward model whose position table holds 16 positions: any real conversation is
    longer, so every forward raises (RuntimeError) - a reward model that fails at inference."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from decoding.model_prep import prepare_default_model

    tokenizer = AutoTokenizer.from_pretrained(prepare_default_model())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=1,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory, tiny_reward_dir):
    work = tmp_path_factory.mktemp("tight")
    faulty = build_faulty_reward_model(work / "faulty")
    running = start_server(
        work,
        "--max-model-len", "1024",
        "--max-running-requests", "1",
        "--max-running-sequences", "8",
        "--max-queued-requests", "1",
        "--max-body-bytes", "20000",
        "--reward-model", f"tiny={tiny_reward_dir}",
        "--reward-model", f"faulty={faulty}",
        "--stream-keepalive-s", "0.2",
        "--host", "0.0.0.0",  # beyond loopback without a key: the start-up warning is checked
        # vLLM's own engine arguments, passed through unchanged (checked in vLLM's config below)
        "--seed", "7", "--tensor-parallel-size", "1", "--max-num-batched-tokens", "3072",
    )
    yield running
    stop_server(running)


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_idle(server, timeout=30.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and engine_unfinished(server) != 0:
        time.sleep(0.2)
    return engine_unfinished(server)


def test_oversized_bodies_get_413(tight_server):
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 30000}]}
    r = httpx.post(f"{tight_server.v1}/chat/completions", json=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit must hold on the streamed body too
        yield b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 1000
        yield b'"}]}'

    r = httpx.post(f"{tight_server.v1}/chat/completions", content=chunks(),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["message"]


def test_overload_is_refused_at_once_with_retry_after(tight_server):
    wait_idle(tight_server)
    long_body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 400, "ignore_eos": True}
    before = metric(tight_server, "aligner_admission_rejections_total")

    async def scenario():
        async with httpx.AsyncClient(timeout=300) as http:
            url = f"{tight_server.v1}/chat/completions"
            running = asyncio.create_task(http.post(url, json=long_body))
            await asyncio.sleep(1.0)
            queued = asyncio.create_task(http.post(url, json={**long_body, "max_tokens": 2}))
            await asyncio.sleep(0.5)
            started = time.monotonic()
            refused = await http.post(url, json={**long_body, "max_tokens": 2})
            refused_after = time.monotonic() - started
            gauges = (metric(tight_server, "aligner_running_requests"), metric(tight_server, "aligner_queued_requests"))
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            queued_response = await queued
            return refused, refused_after, gauges, queued_response

    refused, refused_after, gauges, queued_response = asyncio.run(scenario())
    assert refused.status_code == 429 and refused_after < 2.0
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert gauges == (1.0, 1.0)
    # The queued request ran once the first one went away.
    assert queued_response.status_code == 200
    assert metric(tight_server, "aligner_admission_rejections_total") == before + 1
    assert wait_idle(tight_server) == 0


def test_a_failing_reward_model_falls_back_to_the_plain_answer(tight_server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 12, "seed": 3,
            "alignment": {"strategy": "best_of_n", "n": 3, "reward": "faulty", "return_candidates": True}}
    before = metric(tight_server, "aligner_fallbacks_total")
    r = httpx.post(f"{tight_server.v1}/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    report = r.json()["alignment"]
    assert report["fallback"]["reward"] == "faulty"
    # The kind of failure, not the exception's text (tensor shapes, paths): that is in the log.
    assert report["fallback"]["reason"] == "reward 'faulty' failed: RuntimeError while scoring"
    assert report["scores"] is None
    assert r.json()["choices"][0]["message"]["content"] == report["candidates"][0]["text"]
    assert metric(tight_server, "aligner_fallbacks_total") == before + 1
    assert metric(tight_server, 'aligner_reward_calls_total{outcome="error",reward="faulty"}') >= 1

    strict = {**body, "alignment": {**body["alignment"], "fallback": False}}
    r = httpx.post(f"{tight_server.v1}/chat/completions", json=strict, timeout=300)
    assert r.status_code == 503 and r.json()["error"]["code"] == "strategy_unavailable"
    # The server is fine afterwards, with a working reward.
    ok = {**body, "alignment": {"strategy": "best_of_n", "n": 2, "reward": "tiny"}}
    assert httpx.post(f"{tight_server.v1}/chat/completions", json=ok, timeout=300).status_code == 200


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_every_candidate_of_best_of_n(tight_server, stream):
    wait_idle(tight_server)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 600, "ignore_eos": True, "stream": stream,
            "alignment": {"strategy": "best_of_n", "n": 4, "reward": "tiny"}}

    async def go():
        async with httpx.AsyncClient(timeout=300) as http:
            task = asyncio.create_task(http.post(f"{tight_server.v1}/chat/completions", json=body))
            seen = 0.0
            for _ in range(100):
                await asyncio.sleep(0.1)
                seen = engine_unfinished(tight_server)
                if seen == 4:
                    break
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return seen

    assert asyncio.run(go()) == 4  # four candidate sequences were decoding
    assert wait_idle(tight_server) == 0
    assert metric(tight_server, "aligner_running_requests") == 0


def test_request_ids_are_returned_and_echoed(tight_server):
    r = httpx.get(f"{tight_server.v1}/models", timeout=10)
    assert len(r.headers["x-request-id"]) == 32
    r = httpx.get(f"{tight_server.v1}/models", headers={"x-request-id": "trace-42"}, timeout=10)
    assert r.headers["x-request-id"] == "trace-42"
    r = httpx.get(f"{tight_server.v1}/models", headers={"x-request-id": "bad id\twith spaces"}, timeout=10)
    assert r.headers["x-request-id"] != "bad id\twith spaces"
    log = tight_server.log_path.read_text()
    assert '"request_id": "trace-42"' in log and '"path": "/v1/models"' in log


def test_metrics_cover_latency_tokens_and_candidates(tight_server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{tight_server.v1}/chat/completions", json=body, timeout=120) as r:
        list(r.iter_lines())
    text = httpx.get(f"{tight_server.base_url}/metrics", timeout=10).text
    for name in (
        'aligner_time_to_first_token_seconds_count{strategy="none"}',
        'aligner_request_seconds_count{strategy="none"}',
        'aligner_generated_tokens_total{strategy="none"}',
        'aligner_candidates_per_request_count{strategy="best_of_n"}',
        'aligner_reward_seconds_count{reward="tiny"}',
        "aligner_engine_restarts_total",
        "aligner_queued_requests",
        'aligner_errors_total{type="invalid_request_error"}',
    ):
        assert name in text, name


def test_an_error_mid_stream_is_an_event_and_is_counted(tight_server):
    """The stream has answered 200 when best-of-N finds its reward broken (fallback off): the
    error arrives as an event, and /metrics counts it (a soak's "0 5xx" could not see it)."""
    wait_idle(tight_server)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 64, "ignore_eos": True, "stream": True,
            "alignment": {"strategy": "best_of_n", "n": 3, "reward": "faulty", "fallback": False}}
    before = metric(tight_server, "aligner_stream_errors_total")
    with httpx.stream("POST", f"{tight_server.v1}/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert '"role":"assistant"' in lines[0]  # the stream had begun before the reward was called
    errors = [json.loads(line[6:])["error"] for line in lines if line.startswith('data: {"error"')]
    assert [e["code"] for e in errors] == ["strategy_unavailable"] and lines[-1] == "data: [DONE]"
    assert metric(tight_server, "aligner_stream_errors_total") == before + 1
    assert metric(tight_server, 'aligner_stream_errors_total{endpoint="chat_completions"') == \
        metric(tight_server, "aligner_stream_errors_total")


def test_score_requests_are_admitted_and_keyword_rewards_stay_one_metric_series(tight_server):
    wait_idle(tight_server)
    url = f"{tight_server.v1}/alignment/score"
    body = {"messages": MESSAGES, "responses": ["Take a short walk.", "Close the other tabs."] * 8, "reward": "tiny"}

    async def flood():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(http.post(url, json=body) for _ in range(12)))

    statuses = [r.status_code for r in asyncio.run(flood())]
    # One running and one queued at a time on this server: the rest are refused, not piled up.
    assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
    words = ["walk", "tabs", "focus", "timer", "music"]
    for word in words:
        scored = httpx.post(url, json={**body, "reward": f"keyword:{word}"}, timeout=60)
        assert scored.status_code == 200, scored.text
    text = httpx.get(f"{tight_server.base_url}/metrics", timeout=10).text
    assert 'reward="keyword"' in text and not any(f'reward="keyword:{w}"' in text for w in words)
    ok = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "alignment": {"strategy": "best_of_n", "n": 2,
                                                                                "reward": "tiny"}}
    assert httpx.post(f"{tight_server.v1}/chat/completions", json=ok, timeout=300).status_code == 200


def test_listening_beyond_loopback_without_a_key_warns_at_start(tight_server):
    log = tight_server.log_path.read_text(errors="replace")
    assert "WARNING: listening on 0.0.0.0 without an API key" in log


def engine_processes(server) -> list[psutil.Process]:
    children = psutil.Process(server.process.pid).children(recursive=True)
    return [p for p in children if "EngineCore" in " ".join([p.name(), *p.cmdline()])]


def test_killed_engine_is_detected_failed_fast_and_restarted(tight_server):
    """Last in this module: kills the engine process (like the OOM killer would)."""
    wait_idle(tight_server)
    victims = engine_processes(tight_server)
    assert victims, [p.cmdline() for p in psutil.Process(tight_server.process.pid).children(recursive=True)]
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 600, "ignore_eos": True}

    async def in_flight_request():
        async with httpx.AsyncClient(timeout=120) as http:
            task = asyncio.create_task(http.post(f"{tight_server.v1}/chat/completions", json=body))
            await asyncio.sleep(1.5)
            for p in victims:
                os.kill(p.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            response = await task
            return response, time.monotonic() - killed_at

    response, failed_after = asyncio.run(in_flight_request())
    assert response.status_code == 503 and failed_after < 10, response.text
    assert response.json()["error"]["type"] == "service_unavailable"

    # The supervisor restarts the engine; /ready returns to 200 and requests work again.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if httpx.get(f"{tight_server.base_url}/ready", timeout=10).status_code == 200:
            break
        time.sleep(1)
    assert httpx.get(f"{tight_server.base_url}/ready", timeout=10).status_code == 200
    r = httpx.post(f"{tight_server.v1}/chat/completions", json={**body, "max_tokens": 4}, timeout=120)
    assert r.status_code == 200
    assert metric(tight_server, "aligner_engine_restarts_total") == 1
    assert f"engine {MODEL} died (restart 1 of" in tight_server.log_path.read_text()


def test_vllm_engine_arguments_reach_the_engine_config(tight_server):
    """What vLLM built, read back from its config object and logged at engine start."""
    log = tight_server.log_path.read_text(errors="replace")
    line = next(line for line in log.splitlines() if f"engine {MODEL} vLLM config: " in line)
    config = json.loads(line.split("vLLM config: ", 1)[1])
    assert (config["seed"], config["tensor_parallel_size"], config["max_num_batched_tokens"]) == (7, 1, 3072)
    assert config["enable_chunked_prefill"] is False and config["block_size"] == 32  # CPU defaults kept
