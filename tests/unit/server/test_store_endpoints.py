"""Traces, feedback and deletion over a fake engine and a real SQLite store: what is stored for
an answer, what each endpoint accepts and refuses, and that a slow, full or broken store never
reaches an answer."""

from __future__ import annotations

import json
import threading
import time

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from aligner.store import Store
from server.app import build_app
from server.config import ServerConfig, StoreConfig
from tests.fakes import FakeEngine

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
BEST_OF_3 = {"strategy": "best_of_n", "n": 3, "reward": "length_penalty"}


@pytest.fixture
def store(tmp_path):
    opened = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    yield opened
    opened.close()


def make_client(store, *, api_key: str | None = KEY, **store_config) -> TestClient:
    store_config.setdefault("traces", True)
    config = ServerConfig(served_model_name="fake-model", api_key=api_key, store=StoreConfig(**store_config))
    return TestClient(build_app(FakeEngine(max_model_len=1024), config, start_engine=False, store=store))


@pytest.fixture
def api(store):
    """The app over a fake engine and a SQLite store, tracing every answer."""
    with make_client(store) as running:
        yield running


def chat(client, alignment=None, **body) -> dict:
    body = {"model": "fake-model", "messages": MESSAGES, "max_tokens": 3, **body}
    if alignment is not None:
        body["alignment"] = alignment
    r = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def trace_of(client, response_id: str) -> dict:
    r = client.get(f"/v1/alignment/traces/{response_id}", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def feedback(client, **body):
    return client.post("/v1/alignment/feedback", json=body, headers=AUTH)


def metric(client, line_start: str) -> float:
    for line in client.get("/metrics", headers=AUTH).text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{line_start} not in /metrics")


def assert_error(r, status: int, param: str | None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


# -- traces --------------------------------------------------------------------------------


def test_a_best_of_n_answer_is_traced_under_its_id_with_every_candidate(api):
    body = chat(api, BEST_OF_3, user="alice", seed=3, temperature=0.9)
    assert body["alignment"]["traced"] is True
    assert "candidates" not in body["alignment"]  # not asked for, yet kept in the trace
    trace = trace_of(api, body["id"])
    assert trace["object"] == "alignment.trace" and trace["id"] == body["id"]
    assert trace["user"] == "alice" and trace["model"] == "fake-model" and trace["strategy"] == "best_of_n"
    # The conversation as the chat template saw it: developer is system.
    assert trace["conversation"] == [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "hello there"}]
    assert len(trace["candidates"]) == 3
    assert [c["index"] for c in trace["candidates"]] == [0, 1, 2]
    for candidate in trace["candidates"]:
        assert set(candidate["scores"]) == {"length_penalty"}
        assert candidate["completion_tokens"] == 3 and candidate["finish_reason"] == "length"
    picked = trace["candidates"][trace["selected"][0]]
    assert picked["text"] == body["choices"][0]["message"]["content"]
    assert trace["selected"] == body["alignment"]["selected"]
    assert trace["usage"] == body["usage"]
    assert [s["stage"] for s in trace["timings"]["stages"]] == ["generate", "score"]
    assert trace["timings"]["total_s"] >= 0
    assert trace["endpoint"] == "chat.completions"
    assert trace["choices"] == [{"index": 0, "message": body["choices"][0]["message"],
                                 "finish_reason": body["choices"][0]["finish_reason"]}]
    assert trace["request"] == {"max_tokens": 3, "seed": 3, "temperature": 0.9}
    assert trace["alignment"]["params"] == body["alignment"]["params"]
    assert trace["feedback"] == []
    assert metric(api, "aligner_traces_written_total") == 1


def test_a_plain_answer_has_its_choices_as_candidates(api):
    body = chat(api, n=2, temperature=1.0)
    trace = trace_of(api, body["id"])
    assert trace["strategy"] == "none"
    assert [c["text"] for c in trace["candidates"]] == [c["message"]["content"] for c in body["choices"]]
    assert trace["selected"] == [0, 1]


def test_a_streamed_answer_is_traced_when_it_ends(api):
    r = api.post("/v1/chat/completions", headers=AUTH, json={
        "model": "fake-model", "messages": MESSAGES, "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True}, "alignment": BEST_OF_3})
    events = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    last = events[-1]
    assert last["alignment"]["traced"] is True
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    trace = trace_of(api, last["id"])
    assert trace["choices"][0]["message"]["content"] == text
    assert trace["usage"] == last["usage"]
    assert len(trace["candidates"]) == 3


def test_a_responses_answer_is_traced_under_the_response_id(api):
    r = api.post("/v1/responses", headers=AUTH, json={
        "model": "fake-model", "input": "hello there", "instructions": "Be brief.", "max_output_tokens": 3,
        "user": "bob", "alignment": BEST_OF_3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["alignment"]["traced"] is True
    trace = trace_of(api, body["id"])
    assert trace["endpoint"] == "responses" and trace["user"] == "bob"
    assert trace["conversation"][0] == {"role": "system", "content": "Be brief."}
    assert trace["choices"][0]["message"]["content"] == body["output"][0]["content"][0]["text"]


def test_a_profile_is_traced_with_the_version_it_resolved_to(api):
    profiles = api.get("/v1/alignment/profiles", headers=AUTH).json()["data"]
    profile = profiles[0]
    body = chat(api, {"profile": profile["name"]})
    trace = trace_of(api, body["id"])
    assert (trace["profile"], trace["profile_version"]) == (profile["name"], str(profile["latest"]))


def test_an_unknown_trace_is_a_404_naming_the_id(api):
    assert_error(api.get("/v1/alignment/traces/chatcmpl-nope", headers=AUTH), 404, "id", "unknown_id")


def test_trace_endpoints_need_the_key(api):
    body = chat(api)
    assert api.get(f"/v1/alignment/traces/{body['id']}").status_code == 401
    assert api.delete(f"/v1/alignment/traces/{body['id']}").status_code == 401
    assert api.post("/v1/alignment/feedback", json={"id": body["id"], "thumbs": "up"}).status_code == 401


def test_without_an_api_key_traces_are_kept_but_not_served(store):
    with make_client(store, api_key=None) as client:
        r = client.post("/v1/chat/completions", json={"model": "fake-model", "messages": MESSAGES, "max_tokens": 2})
        response_id = r.json()["id"]
        assert_error(client.get(f"/v1/alignment/traces/{response_id}"), 403, None, "api_key_required")
        assert_error(client.delete("/v1/alignment/users/alice"), 403, None, "api_key_required")
        # Feedback needs no more than the answer did.
        assert client.post("/v1/alignment/feedback", json={"id": response_id, "thumbs": "up"}).status_code == 200
    assert store.get_trace(response_id) is not None


# -- per-request traces -----------------------------------------------------------------------


def test_a_request_asking_for_a_trace_is_refused_unless_the_operator_allows_it(store):
    with make_client(store, traces=False) as client:
        r = client.post("/v1/chat/completions", headers=AUTH, json={
            "model": "fake-model", "messages": MESSAGES, "max_tokens": 2, "alignment": {"trace": True}})
        assert_error(r, 400, "alignment.trace")
        body = chat(client)  # untraced: nothing said, nothing stored
        assert "traced" not in body["alignment"]
    assert store.get_trace(body["id"]) is None


def test_allowed_request_traces_store_only_the_answers_that_ask(store):
    with make_client(store, traces=False, allow_request_traces=True) as client:
        asked = chat(client, {"trace": True, **BEST_OF_3})
        plain = chat(client, {"trace": False})
        assert asked["alignment"]["traced"] is True and asked["alignment"]["strategy"] == "best_of_n"
        assert trace_of(client, asked["id"])["strategy"] == "best_of_n"
        assert_error(client.get(f"/v1/alignment/traces/{plain['id']}", headers=AUTH), 404, "id")


def test_trace_must_be_a_boolean(api):
    r = api.post("/v1/chat/completions", headers=AUTH, json={
        "model": "fake-model", "messages": MESSAGES, "max_tokens": 2, "alignment": {"trace": "yes"}})
    assert_error(r, 400, "alignment.trace")


def test_a_traced_user_must_fit_the_store(api):
    r = api.post("/v1/chat/completions", headers=AUTH, json={
        "model": "fake-model", "messages": MESSAGES, "max_tokens": 2, "user": "u" * 256})
    assert_error(r, 400, "user")


def test_without_a_store_the_endpoints_say_how_to_get_one():
    config = ServerConfig(served_model_name="fake-model", api_key=KEY)
    with TestClient(build_app(FakeEngine(), config, start_engine=False)) as client:
        for r in (client.get("/v1/alignment/traces/x", headers=AUTH),
                  client.post("/v1/alignment/feedback", json={"id": "x", "thumbs": "up"}, headers=AUTH),
                  client.delete("/v1/alignment/users/alice", headers=AUTH)):
            error = assert_error(r, 404, None, "store_not_configured")
            assert "--store-traces" in error["message"]
        r = client.post("/v1/chat/completions", headers=AUTH, json={
            "model": "fake-model", "messages": MESSAGES, "max_tokens": 2, "alignment": {"trace": True}})
        assert_error(r, 400, "alignment.trace")


def test_build_app_refuses_traces_without_a_store():
    config = ServerConfig(served_model_name="fake-model", store=StoreConfig(traces=True))
    with pytest.raises(ValueError, match="needs a store"):
        build_app(FakeEngine(), config, start_engine=False)


# -- feedback -----------------------------------------------------------------------------------


def test_feedback_of_each_kind_is_stored_and_counted(api, store):
    first = chat(api, BEST_OF_3, seed=1, temperature=1.0)
    second = chat(api, BEST_OF_3, seed=2, temperature=1.0)  # the same conversation
    cases = [
        ({"thumbs": "up"}, "rating", {"rating": 1.0, "rating_scale": "thumbs"}),
        ({"thumbs": "down"}, "rating", {"rating": -1.0, "rating_scale": "thumbs"}),
        ({"rating": 4}, "rating", {"rating": 4.0, "rating_scale": "stars"}),
        ({"preferred_candidate": 2}, "preference", {"preferred_candidate": 2}),
        ({"preferred_over": second["id"]}, "pairwise", {"preferred_over": second["id"]}),
        ({"comment": "too terse"}, "comment", {"comment": "too terse"}),
    ]
    for body, kind, expected in cases:
        r = feedback(api, id=first["id"], user="alice", **body)
        assert r.status_code == 200, r.text
        [row] = r.json()["data"]
        assert row["kind"] == kind and row["response_id"] == first["id"] and row["user"] == "alice"
        assert {k: row[k] for k in expected} == expected
    assert [r["kind"] for r in store.feedback_for(first["id"])] == [kind for _, kind, _ in cases]
    assert [r["kind"] for r in store.feedback_for(second["id"])] == ["pairwise"]  # named as the other
    for kind, count in (("rating", 3), ("preference", 1), ("pairwise", 1), ("comment", 1)):
        assert metric(api, f'aligner_feedback_total{{kind="{kind}"}}') == count
    assert len(trace_of(api, first["id"])["feedback"]) == len(cases)


def test_a_body_saying_several_things_is_several_rows_with_the_comment_on_the_first(api):
    first, second = chat(api, BEST_OF_3), chat(api, BEST_OF_3)
    r = feedback(api, id=first["id"], rating=5, preferred_candidate=1, preferred_over=second["id"],
                 comment="the second candidate was best")
    rows = r.json()["data"]
    assert [row["kind"] for row in rows] == ["rating", "preference", "pairwise"]
    assert [row["comment"] for row in rows] == ["the second candidate was best", None, None]


@pytest.mark.parametrize("body, status, param", [
    ({"id": "chatcmpl-unknown", "thumbs": "up"}, 404, "id"),
    ({"preferred_candidate": 3}, 400, "preferred_candidate"),  # three candidates: 0..2
    ({"preferred_candidate": -1}, 400, "preferred_candidate"),
    ({"preferred_candidate": True}, 400, "preferred_candidate"),
    ({"preferred_over": "chatcmpl-unknown"}, 404, "preferred_over"),
    ({"rating": 6}, 400, "rating"),
    ({"rating": 0}, 400, "rating"),
    ({"rating": 4.5}, 400, "rating"),
    ({"thumbs": "sideways"}, 400, "thumbs"),
    ({"thumbs": "up", "rating": 5}, 400, None),
    ({"comment": "   "}, 400, None),
    ({"comment": "x" * 10_001}, 400, "comment"),
    ({}, 400, None),  # says nothing
    ({"thumbs": "up", "stars": 5}, 400, "stars"),  # an unknown field is refused, not ignored
    ({"thumbs": "up", "user": ""}, 400, "user"),
    ({"thumbs": "up", "client_key": "k" * 201}, 400, "client_key"),
])
def test_bad_feedback_is_refused_naming_the_field_and_stores_nothing(api, store, body, status, param):
    answer = chat(api, BEST_OF_3)
    r = feedback(api, **{"id": answer["id"], **body})
    assert_error(r, status, param)
    assert store.feedback_for(answer["id"]) == []


def test_a_pairwise_preference_needs_the_same_conversation(api, store):
    first = chat(api)
    other = chat(api, messages=[{"role": "user", "content": "something else"}])
    assert_error(feedback(api, id=first["id"], preferred_over=other["id"]), 400, "preferred_over")
    assert_error(feedback(api, id=first["id"], preferred_over=first["id"]), 400, "preferred_over")
    # A refused pairwise row takes the body's other rows with it.
    assert_error(feedback(api, id=first["id"], thumbs="up", preferred_over=other["id"]), 400, "preferred_over")
    assert store.feedback_for(first["id"]) == []


def test_a_client_key_makes_feedback_idempotent(api, store):
    answer = chat(api, BEST_OF_3)
    body = {"id": answer["id"], "thumbs": "up", "preferred_candidate": 1, "client_key": "tap-1"}
    first = feedback(api, **body).json()["data"]
    again = feedback(api, **body).json()["data"]
    assert first == again and [row["client_key"] for row in first] == ["tap-1", "tap-1"]
    assert len(store.feedback_for(answer["id"])) == 2
    assert metric(api, 'aligner_feedback_total{kind="rating"}') == 1  # the retry is not counted
    error = assert_error(feedback(api, **{**body, "thumbs": "down"}), 409, "client_key")
    assert "tap-1" in error["message"]
    other = chat(api, BEST_OF_3)  # the key on another answer: refused without naming the first
    reused = assert_error(feedback(api, id=other["id"], thumbs="up", client_key="tap-1"), 409, "client_key")
    assert answer["id"] not in reused["message"] and "feedback " not in reused["message"]
    # A body of several things is one transaction: a conflict on its second row stores no first.
    assert feedback(api, id=other["id"], preferred_candidate=1, client_key="tap-2").status_code == 200
    conflict = assert_error(feedback(api, id=other["id"], thumbs="up", preferred_candidate=2, client_key="tap-2"),
                            409, "client_key")
    assert conflict["message"] == "client_key 'tap-2' was already used for different feedback"
    assert [row["kind"] for row in store.feedback_for(other["id"])] == ["preference"]


def test_feedback_right_after_the_answer_waits_for_its_trace(store):
    class SlowStore:
        """Writes a trace 0.5 s late, as a busy database would."""

        def __getattr__(self, name):
            return getattr(store, name)

        def put_trace(self, trace):
            time.sleep(0.5)
            store.put_trace(trace)

    with make_client(SlowStore()) as client:
        answer = chat(client)
        assert store.get_trace(answer["id"]) is None  # still on its way
        assert feedback(client, id=answer["id"], thumbs="up").status_code == 200


# -- deletion -------------------------------------------------------------------------------------


def test_delete_a_trace_and_its_feedback(api, store):
    answer, other = chat(api), chat(api)
    feedback(api, id=answer["id"], thumbs="up")
    feedback(api, id=other["id"], preferred_over=answer["id"])
    r = api.delete(f"/v1/alignment/traces/{answer['id']}", headers=AUTH)
    assert r.status_code == 200
    assert r.json() == {"object": "alignment.deletion", "response_id": answer["id"], "user": None,
                        "deleted": {"traces": 1, "feedback": 2}, "complete_before": None}
    assert_error(api.get(f"/v1/alignment/traces/{answer['id']}", headers=AUTH), 404, "id")
    assert_error(api.delete(f"/v1/alignment/traces/{answer['id']}", headers=AUTH), 404, "id")
    assert store.get_trace(other["id"]) is not None


def test_delete_everything_about_a_user(api, store):
    theirs = [chat(api, user="alice") for _ in range(2)]
    mine = chat(api, user="bob")
    feedback(api, id=mine["id"], thumbs="down", user="alice")
    feedback(api, id=theirs[0]["id"], thumbs="up", user="bob")
    asked = time.time()
    r = api.delete("/v1/alignment/users/alice", headers=AUTH)
    assert r.status_code == 200
    assert r.json()["deleted"] == {"traces": 2, "feedback": 2, "assignments": 0}
    assert asked <= r.json()["complete_before"] <= time.time()  # requests that arrived before it leave no row
    assert all(store.get_trace(t["id"]) is None for t in theirs)
    assert store.get_trace(mine["id"]) is not None and store.feedback_for(mine["id"]) == []


# -- a store that is slow, full or broken --------------------------------------------------------


class BrokenStore:
    """Every call fails as a database that went away does."""

    url = "sqlite:///broken"

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise sa.exc.OperationalError("SELECT 1", {}, Exception("unable to open database file"))

        return fail


def test_a_broken_store_fails_no_answer_and_every_endpoint_says_503():
    with make_client(BrokenStore(), retention_days=None) as client:
        answers = [chat(client, BEST_OF_3) for _ in range(3)]
        assert all(a["choices"][0]["message"]["content"] for a in answers)
        client.app.state.serving_store.writer.flush(5)
        assert metric(client, 'aligner_store_errors_total{kind="write_failed"}') == 3
        for r in (client.get(f"/v1/alignment/traces/{answers[0]['id']}", headers=AUTH),
                  feedback(client, id=answers[0]["id"], thumbs="up"),
                  client.delete(f"/v1/alignment/traces/{answers[0]['id']}", headers=AUTH),
                  client.delete("/v1/alignment/users/alice", headers=AUTH)):
            assert_error(r, 503, None, "store_unavailable")
        assert metric(client, 'aligner_store_errors_total{kind="request_failed"}') == 4
        assert metric(client, "aligner_traces_written_total") == 0


class HeldStore:
    """`store`, whose trace writes wait at `gate` (`entered` is set when the first arrives)."""

    def __init__(self, store):
        self.store, self.gate, self.entered = store, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.store, name)

    def put_trace(self, trace):
        self.entered.set()
        self.gate.wait(10)
        return self.store.put_trace(trace)


def test_a_full_writer_drops_the_trace_not_the_answer(store):
    held = HeldStore(store)
    gate, entered = held.gate, held.entered
    try:
        with make_client(held, max_pending=1) as client:
            first = chat(client)
            assert entered.wait(5)  # held in the writer
            second = chat(client)  # queued
            started = time.perf_counter()
            third = chat(client)  # nowhere to go
            assert time.perf_counter() - started < 5
            assert (first["alignment"]["traced"], second["alignment"]["traced"], third["alignment"]["traced"]) \
                == (True, True, False)
            assert metric(client, 'aligner_store_errors_total{kind="queue_full"}') == 1
            assert metric(client, "aligner_store_pending") == 2
            assert metric(client, "aligner_store_full") == 1
            assert client.get("/ready", headers=AUTH).json()["store"]["full"] is True
            gate.set()
            client.app.state.serving_store.writer.flush(5)
            assert metric(client, "aligner_store_pending") == 0
            assert_error(client.get(f"/v1/alignment/traces/{third['id']}", headers=AUTH), 404, "id")
    finally:
        gate.set()
    assert store.get_trace(second["id"]) is not None


def test_a_hung_store_call_is_a_503_after_the_timeout(store):
    release = threading.Event()

    class HungStore:
        def __getattr__(self, name):
            return getattr(store, name)

        def get_trace(self, trace_id):
            release.wait(10)
            return store.get_trace(trace_id)

    try:
        with make_client(HungStore(), request_timeout_s=0.2) as client:
            assert_error(client.get("/v1/alignment/traces/x", headers=AUTH), 503, None, "store_unavailable")
    finally:
        release.set()


def test_retention_prunes_old_traces_in_the_background(store):
    store.put_trace({"id": "old", "conversation": [{"role": "user", "content": "hi"}],
                     "created_at": time.time() - 40 * 86400})
    store.put_trace({"id": "new", "conversation": [{"role": "user", "content": "hi"}]})
    with make_client(store, retention_days=30) as client:
        deadline = time.monotonic() + 5
        while store.get_trace("old") is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        client.app.state.serving_store.writer.flush(5)
    assert store.get_trace("old") is None and store.get_trace("new") is not None


def test_a_user_deleted_while_their_traces_wait_in_the_writer_keeps_none(store):
    held = HeldStore(store)
    gate, entered = held.gate, held.entered
    try:
        with make_client(held, trace_wait_s=0.2) as client:
            first, queued = chat(client, user="carol"), chat(client, user="carol")
            assert entered.wait(5)
            r = client.delete("/v1/alignment/users/carol", headers=AUTH)  # the writer does not flush in time
            assert r.status_code == 200 and r.json()["deleted"]["traces"] == 0
            gate.set()
            assert client.app.state.serving_store.writer.flush(5)
            assert store.get_trace(first["id"]) is None and store.get_trace(queued["id"]) is None
            later = chat(client, user="carol")  # she comes back: a new request is kept
            assert trace_of(client, later["id"])["user"] == "carol"
    finally:
        gate.set()


def test_retention_runs_while_the_writer_is_full(store):
    held = HeldStore(store)
    gate, entered = held.gate, held.entered
    store.put_trace({"id": "old", "conversation": [{"role": "user", "content": "hi"}],
                     "created_at": time.time() - 40 * 86400})
    try:
        with make_client(held, max_pending=1, retention_days=30, prune_interval_s=0.05) as client:
            chat(client)
            assert entered.wait(5)
            chat(client)  # the queue is full from here on
            assert client.app.state.serving_store.writer.full
            store.put_trace({"id": "old-2", "conversation": [{"role": "user", "content": "hi"}],
                             "created_at": time.time() - 40 * 86400})
            deadline = time.monotonic() + 5
            while store.get_trace("old-2") is not None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert store.get_trace("old") is None and store.get_trace("old-2") is None
    finally:
        gate.set()


def test_a_huge_request_stores_a_bounded_trace_with_its_candidates(api):
    stops = [f"{i}" + "x" * 60_000 for i in range(16)]  # about 1 MB of stop strings
    answer = chat(api, BEST_OF_3, stop=stops)
    trace = trace_of(api, answer["id"])
    assert trace["request"]["truncated"] is True and trace["request"]["bytes"] > 900_000
    assert len(trace["candidates"]) == 3 and trace["conversation"][-1]["content"] == "hello there"
    assert len(json.dumps(trace)) < 256 << 10


def test_bound_trace_drops_the_request_then_the_tools_then_the_choices():
    from server.serving_store import bound_trace

    trace = {"id": "t", "conversation": [], "candidates": [{"text": "y" * 1000}],
             "extra": {"request": {"stop": ["x" * 5000]}, "tools": [{"d": "z" * 3000}], "choices": [{"t": "y" * 1000}],
                       "endpoint": "chat.completions"}}
    kept, size = bound_trace(trace, 100_000)
    assert kept is trace and size == len(json.dumps(trace).encode())
    kept, size = bound_trace(trace, 6000)
    assert kept["extra"]["request"]["truncated"] and kept["extra"]["tools"] == trace["extra"]["tools"]
    kept, size = bound_trace(trace, 1000)
    assert all(kept["extra"][k]["truncated"] for k in ("request", "tools", "choices"))
    assert kept["candidates"] == trace["candidates"] and kept["extra"]["endpoint"] == "chat.completions"
    assert size == len(json.dumps(kept).encode()) and trace["extra"]["request"]["stop"]  # the original stays


def test_a_trace_that_cannot_be_built_costs_the_answer_nothing(api, monkeypatch):
    def broken(**fields):
        raise TypeError("a field the trace builder did not expect")

    monkeypatch.setattr("server.serving_chat.build_trace", broken)
    body = chat(api, BEST_OF_3)
    assert body["choices"][0]["message"]["content"] and body["alignment"]["traced"] is False
    assert metric(api, 'aligner_store_errors_total{kind="write_failed"}') == 1
