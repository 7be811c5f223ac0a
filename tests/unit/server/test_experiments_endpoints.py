"""A/B experiments over a fake engine and a real SQLite store: the arm a request gets and what
the answer says of it, what may go with an experiment, stickiness through the store (weights
changed, store slow), the traces it leaves, and the report and listing endpoints."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from aligner.alignment import check_profile_alignment
from aligner.experiments import Experiment, hashed_arm
from aligner.profiles import ProfileStore
from aligner.store import Store
from server.app import build_app
from server.config import ServerConfig, StoreConfig
from tests.fakes import FakeEngine

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "hello there"}]
PROFILES = """\
profiles:
  tone:
    - version: 1
      alignment: {strategy: none}
    - version: 2
      alignment: {strategy: best_of_n, n: 2, reward: length_penalty}
experiments:
  tone-test:
    arms: [{profile: tone@1, weight: 1}, {profile: tone@2, weight: 1}]
  coin:
    unit: random
    arms: [{profile: tone@1}, {profile: tone@2}]
"""
TONE_TEST = Experiment(name="tone-test", arms=[{"profile": "tone@1"}, {"profile": "tone@2"}])


def hashed_arm_of(user: str) -> str:
    return hashed_arm(TONE_TEST, user)


@pytest.fixture
def profiles(tmp_path) -> ProfileStore:
    path = tmp_path / "profiles.yaml"
    path.write_text(PROFILES)
    return ProfileStore.load(path, check_profile_alignment)


@pytest.fixture
def store(tmp_path):
    opened = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    yield opened
    opened.close()


def make_api(profiles, store, **store_config) -> TestClient:
    # A store given with no trace flags, as `--store URL` alone: experiment requests are still traced.
    config = ServerConfig(served_model_name="fake-model", api_key=KEY, store=StoreConfig(**store_config))
    return TestClient(build_app(FakeEngine(max_model_len=1024), config, profiles=profiles, start_engine=False,
                                store=store))


@pytest.fixture
def api(profiles, store):
    with make_api(profiles, store) as running:
        yield running


def post(api, alignment=None, path="/v1/chat/completions", **body):
    body = {"model": "fake-model", "messages": MESSAGES, "max_tokens": 3, **body}
    if alignment is not None:
        body["alignment"] = alignment
    return api.post(path, json=body, headers=AUTH)


def chat(api, alignment=None, **body) -> dict:
    r = post(api, alignment, **body)
    assert r.status_code == 200, r.text
    return r.json()


def flush(api) -> None:
    assert api.app.state.serving_store.writer.flush(5)


def test_a_request_gets_its_users_arm_and_the_answer_says_which(api, store, profiles):
    experiment = profiles.experiments["tone-test"]
    for user in ("ann", "bob", "cat", "dan"):
        body = chat(api, {"experiment": "tone-test"}, user=user)
        arm = hashed_arm(experiment, user)
        share = experiment.shares()[arm]
        assert body["alignment"]["experiment"] == {"name": "tone-test", "arm": arm, "unit": "user", "propensity": share}
        assert body["alignment"]["strategy"] == ("none" if arm == "tone@1" else "best_of_n")
        assert body["alignment"]["source"] == f"body:profile {arm}" and body["alignment"]["traced"] is True
        flush(api)
        trace = store.get_trace(body["id"])
        assert (trace["experiment"], trace["arm"], trace["user"]) == ("tone-test", arm, user)
        assert (trace["profile"], trace["profile_version"]) == ("tone", arm[-1])
        assert trace["extra"]["alignment"]["experiment"] == body["alignment"]["experiment"]
    # Requests without an experiment are not traced under `--store URL` alone.
    plain = chat(api, user="ann")
    flush(api)
    assert store.get_trace(plain["id"]) is None and "traced" not in plain["alignment"]


def test_the_arm_is_sticky_per_user(api):
    arms = {}
    for round_ in range(3):
        for i in range(12):
            body = chat(api, {"experiment": "tone-test"}, user=f"user-{i}")
            arms.setdefault(f"user-{i}", set()).add(body["alignment"]["experiment"]["arm"])
    assert all(len(seen) == 1 for seen in arms.values())
    assert set().union(*arms.values()) == {"tone@1", "tone@2"}


def test_without_a_user_or_in_a_random_experiment_the_arm_is_drawn(api, store):
    drawn = [chat(api, {"experiment": "tone-test"})["alignment"]["experiment"] for _ in range(30)]
    assert {d["unit"] for d in drawn} == {"random"} and {d["arm"] for d in drawn} == {"tone@1", "tone@2"}
    coin = [chat(api, {"experiment": "coin"}, user="ann")["alignment"]["experiment"] for _ in range(30)]
    assert {c["unit"] for c in coin} == {"random"} and {c["arm"] for c in coin} == {"tone@1", "tone@2"}
    flush(api)
    with store.engine.connect() as conn:  # random units are not kept as assignments
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM experiment_assignments").scalar() == 0


@pytest.mark.parametrize("alignment, param, code", [
    ({"experiment": "tone-test", "profile": "tone@2"}, "alignment.profile", "unsupported_combination"),
    ({"experiment": "tone-test", "strategy": "best_of_n"}, "alignment.strategy", "unsupported_combination"),
    ({"experiment": "tone-test", "pipeline": [{"strategy": "none"}]}, "alignment.pipeline", "unsupported_combination"),
    ({"experiment": "tone-test", "n": 4}, "alignment.n", "unsupported_combination"),
    ({"experiment": "no-such"}, "alignment.experiment", "unknown_experiment"),
    ({"experiment": 3}, "alignment.experiment", "invalid_value"),
])
def test_what_cannot_go_with_an_experiment_is_a_400_naming_it(api, alignment, param, code):
    r = post(api, alignment, user="ann")
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, code)


def test_request_wide_limits_and_switches_go_with_an_experiment(api):
    body = chat(api, {"experiment": "tone-test", "deadline_s": 30, "return_candidates": True, "trace": True},
                user="bob")
    assert body["alignment"]["experiment"]["name"] == "tone-test"
    assert body["alignment"]["budget"]["deadline_s"] == 30


def test_a_streamed_answer_names_its_arm_on_the_last_chunk(api, store):
    body = {"model": "fake-model", "messages": MESSAGES, "max_tokens": 3, "stream": True, "user": "ann",
            "alignment": {"experiment": "tone-test"}}
    with api.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    last = events[-1]
    assert last["alignment"]["experiment"]["arm"] == hashed_arm_of("ann")
    flush(api)
    assert store.get_trace(last["id"])["arm"] == hashed_arm_of("ann")


def test_the_responses_api_takes_an_experiment(api, store):
    r = api.post("/v1/responses", json={"model": "fake-model", "input": "hello there", "max_output_tokens": 3,
                                           "user": "cat", "alignment": {"experiment": "tone-test"}}, headers=AUTH)
    assert r.status_code == 200, r.text
    flush(api)
    assert store.get_trace(r.json()["id"])["arm"] == hashed_arm_of("cat")


def test_a_stored_arm_outlives_a_change_of_weights(api, store, profiles):
    # The user was assigned when the weights were different: the store keeps them on that arm.
    other = {"tone@1": "tone@2", "tone@2": "tone@1"}[hashed_arm_of("ann")]
    assert store.assign_arm("tone-test", "ann", lambda: other) == other
    assert chat(api, {"experiment": "tone-test"}, user="ann")["alignment"]["experiment"]["arm"] == other
    # A first request stores the hashed arm.
    chat(api, {"experiment": "tone-test"}, user="bob")
    assert store.assign_arm("tone-test", "bob", lambda: "never") == hashed_arm_of("bob")
    # A stored arm since removed from the file gives way to the hashed one.
    store.assign_arm("tone-test", "cat", lambda: "tone@7")
    assert chat(api, {"experiment": "tone-test"}, user="cat")["alignment"]["experiment"]["arm"] == hashed_arm_of("cat")


def test_a_slow_store_costs_the_assignment_its_memory_not_the_answer(profiles, store, monkeypatch):
    release = threading.Event()

    def stuck(*args, **kwargs):
        release.wait(10)
        return "tone@1"

    monkeypatch.setattr(store, "assign_arm", stuck)
    with make_api(profiles, store, assignment_timeout_s=0.2) as api:
        began = time.monotonic()
        body = chat(api, {"experiment": "tone-test"}, user="dan")
        release.set()
        assert time.monotonic() - began < 5
        assert body["alignment"]["experiment"]["arm"] == hashed_arm_of("dan")
        metrics = api.get("/metrics", headers=AUTH).text
        assert 'aligner_store_errors_total{kind="request_failed"} 1.0' in metrics


def test_without_a_store_arms_are_still_sticky_and_the_report_says_why_not(profiles):
    config = ServerConfig(served_model_name="fake-model", api_key=KEY)
    with TestClient(build_app(FakeEngine(max_model_len=1024), config, profiles=profiles, start_engine=False)) as api:
        arms = {chat(api, {"experiment": "tone-test"}, user="eve")["alignment"]["experiment"]["arm"] for _ in range(5)}
        assert arms == {hashed_arm_of("eve")}
        r = api.get("/v1/alignment/experiments/tone-test", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["code"] == "store_not_configured"
        assert "--store URL" in r.json()["error"]["message"]


def test_the_report_counts_the_store(api, store):
    ids = {}
    for i in range(16):
        body = chat(api, {"experiment": "tone-test"}, user=f"u{i}")
        ids[body["id"]] = body["alignment"]["experiment"]["arm"]
    one = [i for i, arm in ids.items() if arm == "tone@1"]
    two = [i for i, arm in ids.items() if arm == "tone@2"]
    assert one and two
    for rid in one[:2]:
        assert api.post("/v1/alignment/feedback", json={"id": rid, "thumbs": "down"}, headers=AUTH).status_code == 200
    for rid in two[:2]:
        assert api.post("/v1/alignment/feedback", json={"id": rid, "rating": 5}, headers=AUTH).status_code == 200
    r = api.post("/v1/alignment/feedback", json={"id": two[0], "preferred_over": one[0]}, headers=AUTH)
    assert r.status_code == 200, r.text

    flush(api)  # the report counts what is written: it never waits on the writer
    r = api.get("/v1/alignment/experiments/tone-test", headers=AUTH)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["object"] == "alignment.experiment_report" and report["requests"] == 16
    first, second = report["arms"]
    assert (first["arm"], first["requests"], second["arm"], second["requests"]) == ("tone@1", len(one), "tone@2", len(two))
    assert first["rating"]["mean"] == 0.0 and second["rating"]["mean"] == 1.0
    assert second["rating"]["by_scale"]["stars"]["mean"] == 5.0
    assert (second["win_rate"]["wins"], second["win_rate"]["n"], first["win_rate"]["wins"]) == (1, 1, 0)
    assert first["reward"]["n"] == 0 and second["reward"]["n"] == len(two)  # tone@1 scores nothing
    assert first["completion_tokens"]["mean"] == 3.0 and second["completion_tokens"]["mean"] == 6.0
    assert first["latency_s"]["n"] == len(one) and first["latency_s"]["p50"]["value"] > 0
    (versus,) = report["comparisons"]
    assert (versus["arm"], versus["baseline"]) == ("tone@2", "tone@1")
    assert versus["rating"]["difference"] == 1.0 and versus["completion_tokens"]["difference"] == 3.0
    assert versus["win_rate"] == {"wins": 1, "n": 1, "rate": 1.0, "ci95": pytest.approx([0.2065, 1.0], abs=1e-4),
                                  "p_value": 1.0}
    assert report["experiment"]["arms"][0] == {"profile": "tone@1", "weight": 1.0, "share": 0.5}

    later = api.get("/v1/alignment/experiments/tone-test", params={"since": time.time() + 60}, headers=AUTH)
    assert later.json()["requests"] == 0 and later.json()["since"] > time.time()
    iso = api.get("/v1/alignment/experiments/tone-test", params={"since": "2000-01-01"}, headers=AUTH)
    assert iso.json()["requests"] == 16


def test_the_report_kept_up_to_date_equals_one_counted_afresh(api, store, profiles):
    """The server's report reads only what was written since its last read (issue 38): after
    new traces, a judgement that replaces an earlier one, and a deletion, it equals a report
    counted from nothing over the same store."""
    from aligner.experiments import experiment_report

    def served() -> dict:
        flush(api)
        r = api.get("/v1/alignment/experiments/tone-test", headers=AUTH)
        assert r.status_code == 200, r.text
        return r.json()

    def afresh() -> dict:
        return json.loads(json.dumps(experiment_report(
            "tone-test", profiles.experiments["tone-test"], store.experiment_traces("tone-test"),
            store.experiment_feedback("tone-test"))))

    ids = [chat(api, {"experiment": "tone-test"}, user=f"u{i}")["id"] for i in range(6)]
    assert served() == afresh()
    tally = api.app.state.chat.experiments.reports._tallies[("tone-test", None)]
    read = tally.seq
    ids += [chat(api, {"experiment": "tone-test"}, user=f"v{i}")["id"] for i in range(4)]
    for thumbs in ("up", "down"):  # the second replaces the first
        assert api.post("/v1/alignment/feedback", json={"id": ids[0], "thumbs": thumbs, "user": "judge"},
                        headers=AUTH).status_code == 200
    report = served()
    assert report == afresh() and report["requests"] == 10 and report["repeats_ignored"] == 1
    assert api.app.state.chat.experiments.reports._tallies[("tone-test", None)] is tally and tally.seq > read
    assert api.delete("/v1/alignment/users/u1", headers=AUTH).status_code == 200
    report = served()
    assert report == afresh() and report["requests"] == 9
    assert api.app.state.chat.experiments.reports._tallies[("tone-test", None)] is not tally  # counted anew


def test_report_refusals(api):
    assert api.get("/v1/alignment/experiments/tone-test").status_code == 401  # the key, like every endpoint
    r = api.get("/v1/alignment/experiments/no-such", headers=AUTH)
    assert r.status_code == 404 and (r.json()["error"]["param"], r.json()["error"]["code"]) == ("name", "unknown_experiment")
    for bad in ("yesterday", "nan"):
        r = api.get("/v1/alignment/experiments/tone-test", params={"since": bad}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == "since"
    # A configured experiment without traces yet reports empty arms.
    assert [a["requests"] for a in api.get("/v1/alignment/experiments/coin", headers=AUTH).json()["arms"]] == [0, 0]


def test_an_experiment_removed_from_the_file_still_reports_from_the_store(api, store):
    store.put_trace({"id": "old-1", "conversation": MESSAGES, "experiment": "retired", "arm": "tone@1",
                     "usage": {"completion_tokens": 4}, "timings": {"total_s": 0.1}})
    report = api.get("/v1/alignment/experiments/retired", headers=AUTH).json()
    assert report["experiment"] is None and [a["arm"] for a in report["arms"]] == ["tone@1"]
    assert report["arms"][0]["completion_tokens"]["mean"] == 4.0 and report["comparisons"] == []


def test_experiments_are_listed_and_counted(api):
    listed = api.get("/v1/alignment/experiments", headers=AUTH).json()
    assert [e["name"] for e in listed["data"]] == ["coin", "tone-test"]
    assert listed["data"][0]["unit"] == "random"
    arm = chat(api, {"experiment": "tone-test"}, user="ann")["alignment"]["experiment"]["arm"]
    metrics = api.get("/metrics", headers=AUTH).text
    assert f'aligner_experiment_assignments_total{{arm="{arm}",experiment="tone-test",unit="user"}} 1.0' in metrics
