"""API keys on the real server: required everywhere but /health, compared in constant time,
and a key file rotated by SIGHUP without a restart. The shared keyed server (`store_server`)
takes a fixed key from `--api-key` and key A from its key file; the first checks use key A,
then the file rotates to key B. The fixed key, which the store, UI and experiments tests use,
is in no file and stays."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest

from tests.conftest import MODEL, ROTATED_KEY

pytestmark = pytest.mark.integration

KEY_A, KEY_B = ROTATED_KEY, "file-key-bravo"


def models_status(server, key: str) -> int:
    return httpx.get(f"{server.v1}/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code


def replace_file(path, text: str) -> None:
    # As an operator would rotate: the server never reads half a file.
    staged = path.with_suffix(".new")
    staged.write_text(text)
    os.replace(staged, path)


@pytest.fixture(scope="module")
def key_file_server(store_server):
    return store_server, store_server.key_file


def test_right_key_is_served(key_file_server):
    client = openai.OpenAI(base_url=key_file_server[0].v1, api_key=KEY_A, max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content


@pytest.mark.parametrize("key", ["wrong-key", KEY_A[:-1], KEY_A + "4"])  # a prefix, a longer key
def test_wrong_key_is_refused_with_the_envelope(key_file_server, key):
    client = openai.OpenAI(base_url=key_file_server[0].v1, api_key=key, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.models.list()
    assert info.value.status_code == 401
    assert info.value.body["type"] == "authentication_error"


@pytest.mark.parametrize("path", ["/v1/models", "/ready", "/metrics"])
def test_missing_key_is_refused_everywhere_but_health(key_file_server, path):
    running, _ = key_file_server
    r = httpx.get(running.base_url + path, timeout=10)
    assert r.status_code == 401
    assert r.json()["error"]["message"].startswith("missing API key")
    assert httpx.get(running.base_url + "/health", timeout=10).status_code == 200


def test_server_without_key_needs_none(server):
    r = httpx.get(f"{server.v1}/models", timeout=10)
    assert r.status_code == 200


def test_server_without_key_refuses_other_origins_and_rebound_hosts(server):
    """No key, on loopback: a web page the user has open must not reload, generate or read.
    A foreign `Origin` (what browsers add) and a foreign `Host` (DNS rebinding) are 403s."""
    own = server.v1.split("://", 1)[1].split("/", 1)[0]  # 127.0.0.1:PORT
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({"Origin": "https://evil.example"}, {"Host": f"rebound.example:{own.rsplit(':', 1)[1]}"}):
        for method, path, payload in (("POST", "/alignment/reload", None), ("POST", "/chat/completions", body),
                                      ("GET", "/alignment/profiles", None)):
            r = httpx.request(method, f"{server.v1}{path}", json=payload, headers=headers, timeout=30)
            assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin_refused", (headers, path)
    same = httpx.post(f"{server.v1}/chat/completions", json=body, headers={"Origin": f"http://{own}"}, timeout=120)
    assert same.status_code == 200  # the server's own page (its UI) is served


def test_key_file_rotates_on_sighup_and_survives_a_bad_file(key_file_server):
    running, keys = key_file_server
    assert models_status(running, KEY_A) == 200
    assert models_status(running, "unknown-key") == 401
    assert models_status(running, KEY_B) == 401

    replace_file(keys, f"{KEY_B}\n")
    running.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while models_status(running, KEY_B) != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert models_status(running, KEY_B) == 200
    assert models_status(running, KEY_A) == 401
    assert models_status(running, running.api_key) == 200  # --api-key is not the file's

    # An emptied file must not lock everyone out: B stays, the server stays up.
    replace_file(keys, "# nothing here yet\n")
    running.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "not reloaded" not in running.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running.process.poll() is None
    assert models_status(running, KEY_B) == 200 and models_status(running, KEY_A) == 401
    log = running.log_path.read_text()
    assert "API key file not reloaded" in log and "1 loaded from" in log
    assert KEY_A not in log and KEY_B not in log


def test_tenant_keys_keep_each_tenants_traces_and_users_apart(key_file_server):
    """Keys with a tenant and a role (issue 38): a metrics key reads probes only, a client key
    generates and reads its own tenant's traces, another tenant's are 404s, an admin reads
    and deletes across tenants."""
    running, keys = key_file_server
    replace_file(keys, f"{KEY_B}\nkey-team-a tenant=team-a role=client\nkey-team-b tenant=team-b role=client\n"
                       "key-probe role=metrics\nkey-limited tenant=team-a role=client rpm=1\n")
    running.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while models_status(running, "key-team-a") != 200 and time.monotonic() < deadline:
        time.sleep(0.1)

    def call(key: str, method: str, path: str, **kwargs) -> httpx.Response:
        return httpx.request(method, f"{running.base_url}{path}", headers={"Authorization": f"Bearer {key}"},
                             timeout=120, **kwargs)

    assert call("key-probe", "GET", "/metrics").status_code == 200
    assert call("key-probe", "GET", "/ready").status_code == 200
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4,
            "user": "carol"}
    refused = call("key-probe", "POST", "/v1/chat/completions", json=body)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
    assert call("key-team-a", "GET", "/metrics").status_code == 403
    assert call("key-team-a", "POST", "/v1/alignment/reload").status_code == 403
    assert call("key-team-b", "GET", "/v1/alignment/experiments/tone-test").status_code == 403

    answer = call("key-team-a", "POST", "/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    trace_id = answer.json()["id"]
    assert call("key-team-a", "GET", f"/v1/alignment/traces/{trace_id}").json()["user"] == "carol"
    for method, path, payload in (("GET", f"/v1/alignment/traces/{trace_id}", None),
                                  ("POST", "/v1/alignment/feedback", {"id": trace_id, "thumbs": "down"}),
                                  ("DELETE", f"/v1/alignment/traces/{trace_id}", None)):
        r = call("key-team-b", method, path, json=payload)
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_id", (method, r.text)
    # Team B's "carol" is another person: deleting her leaves team A's carol.
    assert call("key-team-b", "DELETE", "/v1/alignment/users/carol").json()["deleted"]["traces"] == 0
    assert call(running.api_key, "GET", f"/v1/alignment/traces/{trace_id}").status_code == 200
    deleted = call(running.api_key, "DELETE", "/v1/alignment/users/carol", params={"tenant": "team-a"})
    assert deleted.status_code == 200 and deleted.json()["deleted"]["traces"] == 1
    assert call("key-team-a", "GET", f"/v1/alignment/traces/{trace_id}").status_code == 404

    # A key past its requests per minute: 429 with Retry-After; the tenant's other key goes on.
    assert call("key-limited", "GET", "/v1/models").status_code == 200
    limited = call("key-limited", "GET", "/v1/models")
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert call("key-team-a", "GET", "/v1/models").status_code == 200
    metrics = call(running.api_key, "GET", "/metrics").text
    assert 'aligner_rate_limited_total{limit="rpm",tenant="team-a"} 1.0' in metrics
