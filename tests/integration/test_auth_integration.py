"""API keys on the real server: required everywhere but /health, compared in constant time."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import MODEL, start_server, stop_server

pytestmark = pytest.mark.integration

KEY = "test-key-123"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    running = start_server(tmp_path_factory.mktemp("keyed"), "--max-model-len", "1024", api_key=KEY)
    yield running
    stop_server(running)


def test_right_key_is_served(keyed_server):
    client = openai.OpenAI(base_url=keyed_server.v1, api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content


@pytest.mark.parametrize("key", ["wrong-key", "test-key-12", "test-key-1234"])
def test_wrong_key_is_refused_with_the_envelope(keyed_server, key):
    client = openai.OpenAI(base_url=keyed_server.v1, api_key=key, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.models.list()
    assert info.value.status_code == 401
    assert info.value.body["type"] == "authentication_error"


@pytest.mark.parametrize("path", ["/v1/models", "/ready", "/metrics"])
def test_missing_key_is_refused_everywhere_but_health(keyed_server, path):
    r = httpx.get(keyed_server.base_url + path, timeout=10)
    assert r.status_code == 401
    assert r.json()["error"]["message"].startswith("missing API key")
    assert httpx.get(keyed_server.base_url + "/health", timeout=10).status_code == 200


def test_server_without_key_needs_none(server):
    r = httpx.get(f"{server.v1}/models", timeout=10)
    assert r.status_code == 200
