"""API keys on the real server: required everywhere but /health, compared in constant time,
and a key file rotated by SIGHUP without a restart. The shared keyed server (`store_server`)
takes a fixed key from `--api-key` and key A from its key file; the first checks use key A,
then the file rotates to key B. The fixed key, which the store, UI and experiments tests use,
is in no file and stays."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import sqlite3
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


TENANT_KEYS = (f"{KEY_B}\nkey-team-a tenant=team-a role=client\nkey-team-b tenant=team-b role=client\n"
               "key-probe role=metrics\nkey-limited tenant=team-a role=client rpm=1\n"
               "key-voter tenant=team-v role=client rpm=60\nkey-daily tenant=team-d role=client tokens_per_day=10\n")


def use_tenant_keys(running, keys) -> None:
    if models_status(running, "key-voter") == 200:
        return
    replace_file(keys, TENANT_KEYS)
    running.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while models_status(running, "key-voter") != 200 and time.monotonic() < deadline:
        time.sleep(0.1)


def caller(running):
    def call(key: str, method: str, path: str, **kwargs) -> httpx.Response:
        return httpx.request(method, f"{running.base_url}{path}", headers={"Authorization": f"Bearer {key}"},
                             timeout=120, **kwargs)
    return call


def stored_rows(running, sql: str, *args) -> list[tuple]:
    """The store file read with plain SQL, nothing of the server's code."""
    with sqlite3.connect(f"file:{running.db_path}?mode=ro", uri=True) as conn:
        return conn.execute(sql, args).fetchall()


def wait_written(running) -> None:
    """Until the server's store writer has nothing queued."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready = caller(running)(running.api_key, "GET", "/ready").json()
        if ready["store"]["pending"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the store writer did not drain in 30 s")


def test_tenant_keys_keep_each_tenants_traces_and_users_apart(key_file_server):
    """Keys with a tenant and a role (issue 38): a metrics key reads probes only, a client key
    generates and reads its own tenant's traces, another tenant's are 404s, an admin reads
    and deletes across tenants."""
    running, keys = key_file_server
    use_tenant_keys(running, keys)
    call = caller(running)

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


def test_a_thousand_votes_from_one_key_count_once_and_hit_the_rate_limit(key_file_server):
    """One client's votes cannot stuff an experiment: a thousand thumbs-up on its own answer
    move the arm's rating by one judgement, the report says how many it ignored as repeats,
    and the key's requests per minute cut the flood short with 429s."""
    running, keys = key_file_server
    use_tenant_keys(running, keys)
    call = caller(running)

    def report() -> dict:
        r = call(running.api_key, "GET", "/v1/alignment/experiments/tone-test")
        assert r.status_code == 200, r.text
        return r.json()

    answer = call("key-voter", "POST", "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 4,
        "user": "voter", "alignment": {"experiment": "tone-test"}})
    assert answer.status_code == 200, answer.text
    trace_id, arm = answer.json()["id"], answer.json()["alignment"]["experiment"]["arm"]
    wait_written(running)
    before = report()
    rated = {a["arm"]: a["rating"]["n"] for a in before["arms"]}

    statuses = []
    with httpx.Client(base_url=running.base_url, headers={"Authorization": "Bearer key-voter"}, timeout=30) as http:
        for _ in range(1000):
            statuses.append(http.post("/v1/alignment/feedback", json={"id": trace_id, "thumbs": "up",
                                                                       "user": "voter"}).status_code)
    accepted, limited = statuses.count(200), statuses.count(429)
    assert accepted + limited == 1000 and 1 <= accepted <= 75 and limited >= 900, (accepted, limited)

    after = report()
    assert {a["arm"]: a["rating"]["n"] for a in after["arms"]} == {**rated, arm: rated[arm] + 1}
    assert after["repeats_ignored"] == before["repeats_ignored"] + accepted - 1
    assert len(stored_rows(running, "SELECT id FROM feedback WHERE trace_id = ?", trace_id)) == accepted
    # Leave the shared experiment as it was (its own tests recount it from the file).
    assert call(running.api_key, "DELETE", "/v1/alignment/users/voter").json()["deleted"]["traces"] == 1
    assert report()["repeats_ignored"] == before["repeats_ignored"]


def test_a_key_past_its_tokens_per_day_is_refused_generation_until_midnight(key_file_server):
    """tokens_per_day counts what the policy generated for the key: once used up, generation is
    a 429 with Retry-After (until the UTC day ends); reading models is not generation."""
    running, keys = key_file_server
    use_tenant_keys(running, keys)
    call = caller(running)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to twenty."}], "max_tokens": 8,
            "ignore_eos": True}
    used = 0
    while used < 10:
        r = call("key-daily", "POST", "/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        used += r.json()["usage"]["completion_tokens"]
    refused = call("key-daily", "POST", "/v1/chat/completions", json=body)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "tokens" in refused.json()["error"]["message"]
    seconds_to_midnight = 86_400 - time.time() % 86_400
    assert abs(int(refused.headers["Retry-After"]) - seconds_to_midnight) < 60
    assert call("key-daily", "GET", "/v1/models").status_code == 200
    metrics = call(running.api_key, "GET", "/metrics").text
    assert 'aligner_rate_limited_total{limit="tokens_per_day",tenant="team-d"} 1.0' in metrics
    assert 'aligner_tenant_generated_tokens_total{tenant="team-d"} ' + f"{float(used)}" in metrics


def test_a_one_mebibyte_request_stores_a_bounded_trace(key_file_server):
    """16 stop strings of 62 KiB each: the answer is served, and its stored trace keeps the
    conversation and candidates but not the request's settings, which are marked truncated."""
    running, keys = key_file_server
    use_tenant_keys(running, keys)
    stops = [f"{i:02d}" + "x" * (62 << 10) for i in range(16)]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2, "stop": stops}
    assert len(json.dumps(body).encode()) > 1_000_000
    answer = caller(running)("key-team-a", "POST", "/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    trace_id = answer.json()["id"]
    wait_written(running)
    stored = caller(running)("key-team-a", "GET", f"/v1/alignment/traces/{trace_id}")
    assert stored.status_code == 200
    trace = stored.json()
    assert trace["request"]["truncated"] is True and trace["request"]["bytes"] > 1_000_000
    assert trace["conversation"][-1]["content"] == "Say hi." and trace["candidates"]
    (size,) = stored_rows(running, "SELECT length(CAST(extra AS BLOB)) + length(CAST(candidates AS BLOB)) + "
                                   "length(CAST(conversation AS BLOB)) FROM traces WHERE id = ?", trace_id)[0]
    assert size < 256 << 10


def test_deleting_a_user_while_their_answers_stream_leaves_no_row_of_theirs(key_file_server):
    """A user's deletion racing their streaming answers: answers still streaming (and their
    traces queued after) when the deletion is answered leave no row, and the answer says from
    when the deletion holds."""
    running, keys = key_file_server
    use_tenant_keys(running, keys)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
            "max_tokens": 96, "stream": True, "user": "racer", "temperature": 0.8, "ignore_eos": True}
    started = concurrent.futures.ThreadPoolExecutor(4)
    first_chunk = [concurrent.futures.Future() for _ in range(4)]

    def stream(k: int) -> int:
        chunks = 0
        with httpx.stream("POST", f"{running.v1}/chat/completions", json=body, timeout=300,
                          headers={"Authorization": "Bearer key-team-a"}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                    if chunks == 1:
                        first_chunk[k].set_result(time.time())
        return chunks

    with started:
        streams = [started.submit(stream, k) for k in range(4)]
        for future in first_chunk:
            future.result(timeout=120)
        deleted = caller(running)("key-team-a", "DELETE", "/v1/alignment/users/racer")
        still_streaming = sum(not s.done() for s in streams)
        chunks = [s.result(timeout=300) for s in streams]
    assert deleted.status_code == 200, deleted.text
    assert still_streaming >= 1 and min(chunks) > 10  # the deletion did race the answers
    assert deleted.json()["complete_before"] <= time.time()
    wait_written(running)
    assert stored_rows(running, "SELECT id FROM traces WHERE user = 'racer'") == []
