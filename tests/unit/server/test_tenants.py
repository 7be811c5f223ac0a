"""Keys with a tenant and a role (issue 38), over a fake engine and a real SQLite store: what
each role may call, and that one tenant's traces, feedback and users are another's 404s."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from aligner.store import Store
from server.app import build_app
from server.config import ServerConfig, StoreConfig
from tests.fakes import FakeEngine

KEYS = {"a": "key-a tenant=team-a role=client", "b": "key-b tenant=team-b role=client",
        "metrics": "key-probe role=metrics", "admin": "key-root"}
MESSAGES = [{"role": "user", "content": "hello there"}]


def auth(who: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[who].split()[0]}"}


@pytest.fixture
def store(tmp_path):
    opened = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    yield opened
    opened.close()


@pytest.fixture
def api(store, tmp_path):
    (tmp_path / "keys").write_text("\n".join(KEYS.values()) + "\n")
    config = ServerConfig(served_model_name="fake-model", api_key_file=str(tmp_path / "keys"),
                          store=StoreConfig(traces=True))
    with TestClient(build_app(FakeEngine(max_model_len=1024), config, start_engine=False, store=store)) as client:
        yield client


def answer(api, who: str, user: str | None = None, **alignment) -> str:
    body = {"model": "fake-model", "messages": MESSAGES, "max_tokens": 3, "user": user,
            "alignment": alignment or None}
    r = api.post("/v1/chat/completions", json=body, headers=auth(who))
    assert r.status_code == 200, r.text
    return r.json()["id"]


@pytest.mark.parametrize("method,path,allowed", [
    ("GET", "/metrics", {"admin", "metrics"}),
    ("GET", "/health", {"admin", "metrics", "a"}),
    ("GET", "/v1/models", {"admin", "a"}),
    ("POST", "/v1/alignment/reload", {"admin"}),
    ("GET", "/v1/alignment/experiments", {"admin"}),
    ("GET", "/v1/alignment/experiments/tone", {"admin"}),
    ("GET", "/openapi.json", {"admin"}),
    ("GET", "/docs", {"admin"}),
    ("GET", "/v1/alignment/traces/nope", {"admin", "a"}),
    ("DELETE", "/v1/alignment/users/nobody", {"admin", "a"}),
])
def test_each_role_calls_what_it_may_and_gets_a_403_elsewhere(api, method, path, allowed):
    for who in ("admin", "a", "metrics"):
        r = api.request(method, path, headers=auth(who))
        if who in allowed:
            assert r.status_code != 403, (who, r.text)
        else:
            assert r.status_code == 403, (who, r.status_code)
            error = r.json()["error"]
            assert error["type"] == "permission_error" and error["code"] == "permission_denied"
    assert api.request(method, path).status_code in ((200,) if path == "/health" else (401,))


def test_a_metrics_key_generates_nothing(api):
    r = api.post("/v1/chat/completions", headers=auth("metrics"),
                 json={"model": "fake-model", "messages": MESSAGES, "max_tokens": 3})
    assert r.status_code == 403


def test_another_tenants_trace_is_a_404_like_a_missing_one(api, store):
    mine = answer(api, "a", user="alice")
    assert api.get(f"/v1/alignment/traces/{mine}", headers=auth("a")).status_code == 200  # waits for the write
    assert store.get_trace(mine)["tenant"] == "team-a"
    assert api.get(f"/v1/alignment/traces/{mine}", headers=auth("admin")).status_code == 200
    theirs = api.get(f"/v1/alignment/traces/{mine}", headers=auth("b"))
    missing = api.get("/v1/alignment/traces/chatcmpl-none", headers=auth("b"))
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["message"].replace(mine, "X") == missing.json()["error"]["message"].replace(
        "chatcmpl-none", "X")
    for body in ({"id": mine, "thumbs": "down"}, {"id": answer(api, "b"), "preferred_over": mine}):
        r = api.post("/v1/alignment/feedback", json=body, headers=auth("b"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_id", r.text
    assert api.delete(f"/v1/alignment/traces/{mine}", headers=auth("b")).status_code == 404
    assert store.get_trace(mine) is not None and store.feedback_for(mine) == []
    assert api.post("/v1/alignment/feedback", json={"id": mine, "thumbs": "up"}, headers=auth("a")).status_code == 200
    assert api.delete(f"/v1/alignment/traces/{mine}", headers=auth("a")).status_code == 200
    assert store.get_trace(mine) is None


def test_a_user_is_one_person_per_tenant(api, store):
    a_alice, b_alice, root_alice = answer(api, "a", "alice"), answer(api, "b", "alice"), answer(api, "admin", "alice")
    assert api.get(f"/v1/alignment/traces/{root_alice}", headers=auth("admin")).status_code == 200  # written
    assert api.post("/v1/alignment/feedback", headers=auth("b"),
                    json={"id": b_alice, "thumbs": "up", "user": "alice"}).status_code == 200
    r = api.delete("/v1/alignment/users/alice", headers=auth("b"))
    assert r.status_code == 200 and r.json()["deleted"]["traces"] == 1 and r.json()["deleted"]["feedback"] == 1
    assert store.get_trace(b_alice) is None and store.get_trace(a_alice) is not None
    assert store.get_trace(root_alice) is not None  # the admin's own (default) tenant is another tenant too
    # A client names no other tenant; an admin names one, or deletes the name everywhere.
    r = api.delete("/v1/alignment/users/alice?tenant=team-a", headers=auth("b"))
    assert r.status_code == 403 and r.json()["error"]["param"] == "tenant"
    assert api.delete("/v1/alignment/users/alice?tenant=a%2Fb", headers=auth("admin")).status_code == 400
    r = api.delete("/v1/alignment/users/alice?tenant=team-a", headers=auth("admin"))
    assert r.json()["deleted"]["traces"] == 1 and store.get_trace(root_alice) is not None
    r = api.delete("/v1/alignment/users/alice", headers=auth("admin"))
    assert r.json()["deleted"]["traces"] == 1 and store.get_trace(root_alice) is None


def test_a_user_id_with_a_control_character_is_refused(api):
    body = {"model": "fake-model", "messages": MESSAGES, "max_tokens": 3, "user": "ali\x1fce"}
    r = api.post("/v1/chat/completions", json=body, headers=auth("a"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "user"
    assert api.delete("/v1/alignment/users/ali%00ce", headers=auth("a")).status_code == 400


def test_client_keys_are_a_key_space_per_tenant(api, store):
    a_answer, b_answer = answer(api, "a"), answer(api, "b")
    for who, response_id in (("a", a_answer), ("b", b_answer)):
        for _ in range(2):  # the same body again: the same row, within the tenant
            r = api.post("/v1/alignment/feedback", headers=auth(who),
                         json={"id": response_id, "thumbs": "up", "client_key": "vote-1"})
            assert r.status_code == 200, r.text
            assert r.json()["data"][0]["client_key"] == "vote-1"
    assert len(store.feedback_for(a_answer)) == len(store.feedback_for(b_answer)) == 1
    r = api.post("/v1/alignment/feedback", headers=auth("b"), json={"id": b_answer, "thumbs": "down",
                                                                    "client_key": "vote-1"})
    assert r.status_code == 409 and a_answer not in r.text
    trace = api.get(f"/v1/alignment/traces/{a_answer}", headers=auth("a")).json()
    assert [f["client_key"] for f in trace["feedback"]] == ["vote-1"]
    r = api.post("/v1/alignment/feedback", headers=auth("a"), json={"id": a_answer, "thumbs": "up",
                                                                    "client_key": "x\x1fvote"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "client_key"
