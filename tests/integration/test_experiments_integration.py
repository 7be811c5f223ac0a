"""A/B experiments through the real server (vLLM on CPU) on a SQLite store: a user keeps one arm
on every request, 80 users split close to the weights, and the experiment's report equals a
recount done here from the store file with plain SQL. The server is the shared keyed one
(`store_server`, whose profiles hold the experiment `tone-test`); only this module uses that
experiment."""

from __future__ import annotations

import concurrent.futures
import json
import math
import sqlite3
import time

import httpx
import numpy as np
import pytest

from aligner import stats
from tests.conftest import MODEL, STORE_SERVER_KEY

pytestmark = pytest.mark.integration

KEY = STORE_SERVER_KEY
AUTH = {"Authorization": f"Bearer {KEY}"}
HTTP_TIMEOUT_S = 300
USERS = 80  # the split is checked within 4.5 sigma of the weights at this count
RETURNING = 8  # users who come back twice more
QUESTIONS = ["Say something cheerful!", "Name a fruit.", "Greet me.", "What is two plus two?"]
# The arms of `tone-test` (`tests.conftest.EXPERIMENT_PROFILES`), weighted 1:3.
SHARES = {"tone@1": 0.25, "tone@2": 0.75}


@pytest.fixture(scope="module")
def server(store_server):
    return store_server


@pytest.fixture(scope="module")
def db_path(store_server):
    return store_server.db_path


def ask(server, user: str, question: int, **alignment) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTIONS[question]}], "max_tokens": 8,
            "user": user, "alignment": {"experiment": "tone-test", **alignment}}
    r = httpx.post(f"{server.v1}/chat/completions", json=body, headers=AUTH, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, r.text
    return r.json()


def metric(server, line_start: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", headers=AUTH, timeout=HTTP_TIMEOUT_S).text
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="module")
def answered(server) -> list[dict]:
    """Every user's first request, then the returning users' second and third: (user, question,
    the answer's id and experiment report)."""
    jobs = [(f"user-{i:03d}", i % len(QUESTIONS)) for i in range(USERS)]
    jobs += [(f"user-{i:03d}", (i + k) % len(QUESTIONS)) for k in (1, 2) for i in range(RETURNING)]
    written = metric(server, "aligner_traces_written_total")  # the shared server's earlier answers
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda job: ask(server, *job), jobs))
    # Every trace written before anything reads the store.
    deadline = time.monotonic() + 60
    while metric(server, "aligner_traces_written_total") < written + len(jobs) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(server, "aligner_traces_written_total") == written + len(jobs)
    return [{"user": user, "question": q, "id": body["id"], "experiment": body["alignment"]["experiment"],
             "strategy": body["alignment"]["strategy"], "traced": body["alignment"]["traced"]}
            for (user, q), body in zip(jobs, bodies, strict=True)]


def test_arms_are_sticky_per_user_and_split_close_to_the_weights(answered):
    assert all(a["traced"] and a["strategy"] == "best_of_n" for a in answered)
    assert {a["experiment"]["unit"] for a in answered} == {"user"}
    arms: dict[str, set[str]] = {}
    for a in answered:
        arms.setdefault(a["user"], set()).add(a["experiment"]["arm"])
    assert len(arms) == USERS and all(len(seen) == 1 for seen in arms.values())
    firsts = [next(iter(seen)) for seen in arms.values()]
    for arm, share in SHARES.items():
        sigma = math.sqrt(share * (1 - share) / USERS)
        assert abs(firsts.count(arm) / USERS - share) < 4.5 * sigma, (arm, firsts.count(arm))


def test_the_report_equals_a_recount_from_the_store(server, answered, db_path):
    by_question: dict[int, dict[str, list[str]]] = {}
    for i, a in enumerate(answered):
        body = ({"thumbs": "up" if i % 2 else "down"} if i % 3 == 0 else
                {"rating": i % 5 + 1} if i % 3 == 1 else None)
        if body is not None:
            r = httpx.post(f"{server.v1}/alignment/feedback", json={"id": a["id"], **body}, headers=AUTH,
                           timeout=HTTP_TIMEOUT_S)
            assert r.status_code == 200, r.text
        by_question.setdefault(a["question"], {}).setdefault(a["experiment"]["arm"], []).append(a["id"])
    pairs = 0
    for arms in by_question.values():  # pairwise preferences between the arms' answers to one question
        for k, (one, two) in enumerate(zip(arms.get("tone@1", []), arms.get("tone@2", []), strict=False)):
            winner, loser = (two, one) if k % 3 else (one, two)
            r = httpx.post(f"{server.v1}/alignment/feedback", json={"id": winner, "preferred_over": loser},
                           headers=AUTH, timeout=HTTP_TIMEOUT_S)
            assert r.status_code == 200, r.text
            pairs += 1
    assert pairs >= 20

    deadline = time.monotonic() + 30  # the report counts what is written; the last traces may be queued
    while True:
        r = httpx.get(f"{server.v1}/alignment/experiments/tone-test", headers=AUTH, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 200, r.text
        report = r.json()
        if report["requests"] == len(answered) or time.monotonic() > deadline:
            break
        time.sleep(0.2)

    # The recount: the store file read with plain SQL, nothing of the server's code.
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
        traces = conn.execute("SELECT id, user, arm, candidates, selected, usage, timings FROM traces "
                              "WHERE experiment = 'tone-test'").fetchall()
        ratings = conn.execute("SELECT trace_id, rating, rating_scale FROM feedback WHERE kind = 'rating'").fetchall()
        pairwise = conn.execute("SELECT trace_id, other_trace_id FROM feedback WHERE kind = 'pairwise'").fetchall()
    arm_of = {t[0]: t[2] for t in traces}
    pairwise = [(w, lo) for w, lo in pairwise if w in arm_of and lo in arm_of]  # the experiment's answers only
    assert arm_of == {a["id"]: a["experiment"]["arm"] for a in answered}
    assert report["requests"] == len(answered)
    assert [a["arm"] for a in report["arms"]] == ["tone@1", "tone@2"]
    recounted = {}
    for row in report["arms"]:
        arm = row["arm"]
        mine = [t for t in traces if t[2] == arm]
        rewards = []
        for _, _, _, candidates, selected, _, _ in mine:
            scores = [json.loads(candidates)[i]["score"] for i in json.loads(selected)]
            rewards.append(sum(scores) / len(scores))
        tokens = [float(json.loads(t[5])["completion_tokens"]) for t in mine]
        latencies = sorted(json.loads(t[6])["total_s"] for t in mine)
        rated = [(r + 1) / 2 if scale == "thumbs" else (r - 1) / 4 for tid, r, scale in ratings if arm_of.get(tid) == arm]
        stars = [r for tid, r, scale in ratings if arm_of.get(tid) == arm and scale == "stars"]
        contests = [(w, lo) for w, lo in pairwise if arm in (arm_of[w], arm_of[lo]) and arm_of[w] != arm_of[lo]]
        wins = sum(arm_of[w] == arm for w, _ in contests)
        recounted[arm] = (rated, rewards, tokens, latencies)

        assert row["requests"] == len(mine) and row["users"] == len({t[1] for t in mine})
        assert row["configured_share"] == SHARES[arm] and row["share"] == pytest.approx(len(mine) / len(traces))
        assert row["rating"]["n"] == len(rated) > 10
        assert row["rating"]["mean"] == pytest.approx(np.mean(rated))
        assert row["rating"]["ci95"] == pytest.approx(stats.mean_interval(rated)["ci95"])
        assert row["rating"]["by_scale"]["stars"]["mean"] == pytest.approx(np.mean(stars))
        assert (row["win_rate"]["wins"], row["win_rate"]["n"]) == (wins, len(contests))
        assert row["win_rate"]["ci95"] == pytest.approx(stats.wilson_interval(wins, len(contests)))
        assert row["reward"]["n"] == len(rewards) and row["reward"]["mean"] == pytest.approx(np.mean(rewards))
        assert row["completion_tokens"]["mean"] == pytest.approx(np.mean(tokens))
        assert row["completion_tokens"]["ci95"] == pytest.approx(stats.mean_interval(tokens)["ci95"])
        for name, q in (("p50", 0.5), ("p95", 0.95)):
            assert row["latency_s"][name]["value"] == pytest.approx(np.quantile(latencies, q))
            assert row["latency_s"][name]["ci95"] == pytest.approx(stats.quantile_interval(latencies, q))

    (versus,) = report["comparisons"]
    assert (versus["arm"], versus["baseline"]) == ("tone@2", "tone@1")
    for field, column in (("rating", 0), ("reward", 1), ("completion_tokens", 2), ("latency_s", 3)):
        expected = stats.welch(recounted["tone@1"][column], recounted["tone@2"][column])
        assert versus[field]["difference"] == pytest.approx(expected["difference"])
        if expected["p_value"] is not None:
            assert versus[field]["p_value"] == pytest.approx(expected["p_value"])
            assert versus[field]["ci95"] == pytest.approx(expected["ci95"])
    head = [(w, lo) for w, lo in pairwise if {arm_of[w], arm_of[lo]} == {"tone@1", "tone@2"}]
    wins = sum(arm_of[w] == "tone@2" for w, _ in head)
    assert (versus["win_rate"]["wins"], versus["win_rate"]["n"]) == (wins, len(head)) == (wins, pairs)
    assert versus["win_rate"]["p_value"] == pytest.approx(stats.binomial_test(wins, len(head)))


def test_what_cannot_go_with_an_experiment_is_refused(server):
    for alignment, param in (({"experiment": "tone-test", "profile": "tone@2"}, "alignment.profile"),
                             ({"experiment": "tone-test", "strategy": "none"}, "alignment.strategy"),
                             ({"experiment": "colour-test"}, "alignment.experiment")):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "user": "x",
                "alignment": alignment}
        r = httpx.post(f"{server.v1}/chat/completions", json=body, headers=AUTH, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.get(f"{server.v1}/alignment/experiments/colour-test", headers=AUTH, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_experiment"
    assert httpx.get(f"{server.v1}/alignment/experiments/tone-test", timeout=HTTP_TIMEOUT_S).status_code == 401
