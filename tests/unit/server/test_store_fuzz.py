"""Fuzzing the store's endpoints (schemathesis) over a real SQLite store with answers and
feedback in it: no input gives a 5xx, and every refusal is an error envelope."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from aligner.store import Store
from server.app import build_app
from server.config import ServerConfig, StoreConfig
from server.protocol_store import FeedbackRequest
from tests.fakes import FakeEngine, internal_detail

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CASES_PER_OPERATION = 150

store = Store.open(f"sqlite:///{Path(tempfile.mkdtemp(prefix='aligner-fuzz-')) / 'store.db'}")
app = build_app(FakeEngine(max_model_len=256),
                ServerConfig(served_model_name="fake-model", api_key=KEY, store=StoreConfig(traces=True)),
                start_engine=False, store=store)
schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH).include(
    path_regex=r"^/v1/alignment/(traces|users|feedback)")


def _seed() -> list[str]:
    """Two stored answers to one conversation (and one to another) for the cases to hit."""
    client = TestClient(app)
    ids = []
    for content in ("hello", "hello", "other"):
        r = client.post("/v1/chat/completions", headers=AUTH, json={
            "model": "fake-model", "messages": [{"role": "user", "content": content}], "max_tokens": 2,
            "alignment": {"strategy": "best_of_n", "n": 2, "reward": "length_penalty"}})
        ids.append(r.json()["id"])
    app.state.serving_store.writer.flush(10)
    return ids


SEEDED = _seed()
outcomes: list[tuple[str, int]] = []


@schema.hook("map_body")
def _aim_at_stored_answers(context, body):
    # Feedback names stored answers (an unknown id is one 404 case), so that fuzzing reaches
    # the checks against them: candidate range, the same conversation, client keys.
    # A third of them lose the unknown fields the fuzzer adds (each one a 400 of its own).
    if isinstance(body, dict):
        if isinstance(body.get("id"), str) and len(body["id"]) % 3 == 1:
            for field in set(body) - set(FeedbackRequest.model_fields):
                del body[field]
        for field in ("id", "preferred_over"):
            if isinstance(body.get(field), str) and len(body[field]) % 3:
                body[field] = SEEDED[len(body[field]) % 3]
    return body


@schema.parametrize()
@settings(max_examples=CASES_PER_OPERATION, derandomize=True, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_store_endpoints_never_answer_5xx(case):
    response = case.call(headers=AUTH)
    outcomes.append((f"{case.method} {case.path}", response.status_code))
    assert response.status_code < 500, (case.as_curl_command(), response.text)
    if response.status_code >= 400:
        assert response.json()["error"]["message"]
        assert not internal_detail(response.text), (case.as_curl_command(), response.text)


def test_fuzzing_reached_stored_answers():
    if not outcomes:
        import pytest

        pytest.skip("run together with test_store_endpoints_never_answer_5xx")
    feedback = [status for operation, status in outcomes if operation == "POST /v1/alignment/feedback"]
    # Stored, refused by the model, and refused against the stored answers (the counts vary a
    # little with the hypothesis version; that each kind happens is the point).
    assert feedback.count(200) >= 1 and feedback.count(400) >= 10 and feedback.count(404) >= 1, sorted(set(feedback))
