"""The start-up self-check through the real server: a kernel broken in bf16 (injected by the
tests' own vLLM plugin, `tests/vllm_faults.py`, which rotates the logits of bf16 models in
every engine process) is caught before /ready turns 200 and the server rebuilds in float32;
broken in float32 too, it stays not ready with the reason, and never serves (that server is
asked for float32 from the start: the bf16 -> float32 step is the first test's)."""

from __future__ import annotations

import time

import httpx
import pytest

from bench.launch import start_server, stop_server
from tests.conftest import MODEL
from tests.vllm_faults import fault_env

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _self_check(response: httpx.Response) -> dict | None:
    policy = (response.json().get("numerics") or {}).get("policy") or {}
    return policy.get("self_check")


def fell_back_to_float32(server) -> str:
    """Assert the server rebuilt in float32, passed both engine checks there and answers the
    France question; return its log."""
    ready = httpx.get(f"{server.base_url}/ready", timeout=10)
    assert ready.status_code == 200
    policy = ready.json()["numerics"]["policy"]
    assert policy["configuration"] == "safe" and policy["dtype"] == "float32"
    check = policy["self_check"]
    assert check["status"] == "passed" and check["fallback"] is True
    for name in ("engine", "engine decode"):
        assert check[name]["agreement"] >= 0.9 and check[name]["configuration"] == "float32", check[name]
        assert check[name]["positions"] >= 8
    reply = httpx.post(f"{server.v1}/chat/completions", timeout=120, json={
        "model": MODEL, "messages": QUESTION, "max_tokens": 12, "temperature": 0})
    assert reply.status_code == 200 and "Paris" in reply.json()["choices"][0]["message"]["content"]
    log = server.log_path.read_text(errors="replace")
    assert "rebuilding in float32" in log
    return log


def test_a_kernel_broken_in_bf16_is_caught_and_the_server_serves_float32(tmp_path_factory):
    folder = tmp_path_factory.mktemp("numerics-fallback")
    server = start_server(folder, "--max-model-len", "512", env=fault_env(folder / "plugin", "bfloat16"))
    try:
        log = fell_back_to_float32(server)
        assert "(engine): FAILED in bfloat16" in log
    finally:
        stop_server(server)


def test_a_fault_only_in_decoding_is_caught_by_the_decode_check(tmp_path_factory):
    """Prompt logprobs right, sampled tokens wrong (a kernel broken only in decoding): the
    prefill check passes, the decode check fails, the server rebuilds in float32."""
    folder = tmp_path_factory.mktemp("numerics-decode-fault")
    server = start_server(folder, "--max-model-len", "512", env=fault_env(folder / "plugin", "bfloat16@sampled"))
    try:
        log = fell_back_to_float32(server)
        assert "(engine): passed in bfloat16" in log and "(engine decode): FAILED in bfloat16" in log
    finally:
        stop_server(server)


def test_a_kernel_broken_everywhere_keeps_the_server_not_ready(tmp_path_factory):
    folder = tmp_path_factory.mktemp("numerics-broken")
    server = start_server(folder, "--max-model-len", "512", "--dtype", "float32",
                          env=fault_env(folder / "plugin", "all"),
                          ready_when=lambda r: (_self_check(r) or {}).get("status") == "failed")
    try:
        ready = httpx.get(f"{server.base_url}/ready", timeout=10)
        assert ready.status_code == 503
        message = ready.json()["error"]["message"]
        assert "self-check failed" in message and "FAILED in float32" in message
        assert ready.json()["numerics"]["policy"]["self_check"]["engine"]["agreement"] < 0.5
        assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200  # alive, not ready
        reply = httpx.post(f"{server.v1}/chat/completions", timeout=60, json={
            "model": MODEL, "messages": QUESTION, "max_tokens": 4})
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "engine_unavailable"
        time.sleep(3)  # the supervisor must not rebuild the same wrong engine again and again
        assert httpx.get(f"{server.base_url}/ready", timeout=10).status_code == 503
        assert "restarted" not in server.log_path.read_text(errors="replace")
    finally:
        stop_server(server)
