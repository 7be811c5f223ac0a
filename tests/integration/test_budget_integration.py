"""Deadlines, token budgets and adaptive best-of-N through the real server."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import MODEL

pytestmark = pytest.mark.integration

ESSAY = [{"role": "user", "content": "Write a long essay about the history of bread."}]
ONE_WORD = [{"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What colour is the sky?"}]


def post(server, messages, alignment, **extra) -> tuple[httpx.Response, float]:
    body = {"model": MODEL, "messages": messages, "alignment": alignment, **extra}
    began = time.monotonic()
    r = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=600)
    return r, time.monotonic() - began


def test_a_pipeline_that_would_run_for_minutes_answers_by_its_deadline(server):
    # Unbounded, this is minutes of CPU work: four 400-token candidates, then up to four
    # critique-and-revise rounds of 400 tokens each.
    alignment = {"pipeline": [{"strategy": "rewrite"},
                              {"strategy": "best_of_n", "n": 4, "reward": "exclaim"},
                              {"strategy": "self_refine", "rounds": 4, "reward": "exclaim"}],
                 "deadline_s": 6}
    r, seconds = post(server, ESSAY, alignment, max_tokens=400, ignore_eos=True)
    assert r.status_code == 200, r.text
    assert seconds < 6 + 1, seconds
    body = r.json()
    budget = body["alignment"]["budget"]
    assert budget["deadline_s"] == 6 and budget["exhausted"] == "deadline"
    # The refinement never ran a round: either the pipeline skipped the whole stage, or (when
    # best-of-N handed over just before the deadline, as on faster CPUs) the stage began and
    # skipped all its rounds.
    assert ({"pipeline stage 2 (self_refine)", "self_refine rounds 1-4 of choice 0"}
            & set(budget["skipped"])), budget["skipped"]
    (choice,) = body["choices"]
    assert choice["message"]["content"].strip() and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == budget["used_tokens"] > 0


def test_a_plain_stream_ends_at_its_deadline_with_length(server):
    body = {"model": MODEL, "messages": ESSAY, "max_tokens": 1500, "ignore_eos": True, "stream": True,
            "alignment": {"deadline_s": 2}}
    began, events = time.monotonic(), []
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    assert time.monotonic() - began < 2 + 1
    last = events[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["alignment"]["budget"]["exhausted"] == "deadline"
    assert sum(len(e["choices"][0]["delta"].get("content") or "") for e in events if e["choices"]) > 0


def test_max_total_tokens_stops_best_of_n_with_the_best_finished_candidate(server):
    alignment = {"strategy": "best_of_n", "n": 4, "reward": "tiny", "max_total_tokens": 80,
                 "return_candidates": True}
    # Which samples end within the budget depends on the seed and on the CPU's arithmetic (the
    # AVX2, AVX-512 and AMX kernels sample differently; on AVX2 the model never answers in one
    # word; on AMX most seeds give four short answers that all end within the budget, and which
    # seed does not depends on the prefix cache's state): a stop string ends the samples that
    # name the sky early, and the first seed whose candidates the budget cut, with one of them
    # finished, is checked.
    finished, unfinished = [], []
    for seed in range(1, 25):
        r, _ = post(server, ONE_WORD, alignment, max_tokens=100, seed=seed, stop=[" sky"])
        assert r.status_code == 200, r.text
        body = r.json()
        report = body["alignment"]
        assert body["usage"]["completion_tokens"] <= 80 + 3  # one token per candidate per step
        if report["budget"]["exhausted"] != "max_total_tokens":  # every sample ended in time
            assert all(c["finish_reason"] == "stop" for c in report["candidates"]), report
            continue
        finished = [c for c in report["candidates"] if c["finish_reason"] == "stop"]
        unfinished = [c for c in report["candidates"] if c["finish_reason"] == "length"]
        if finished and unfinished:  # the budget cut the long ones; a short answer ended
            break
    assert finished and unfinished, "no seed of 24 gave both a finished and a cut candidate"
    assert report["budget"]["exhausted"] == "max_total_tokens"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert report["scores"] == [max(c["score"] for c in finished)]
    assert all(c["score"] is None for c in unfinished)  # never scored: never eligible


def test_adaptive_best_of_n_starts_no_wave_the_budget_cannot_pay_for(server):
    alignment = {"strategy": "best_of_n", "n": 6, "batch": 2, "reward": "exclaim", "max_total_tokens": 70}
    r, _ = post(server, ESSAY, alignment, max_tokens=20, ignore_eos=True, seed=3)
    assert r.status_code == 200, r.text
    body = r.json()
    report = body["alignment"]
    assert (report["candidates_used"], report["waves"], report["stopped"]) == (2, 1, "max_total_tokens")
    assert body["usage"]["completion_tokens"] == 40  # the second wave (40 more) was never started
    assert report["budget"]["skipped"] == ["4 of 6 candidates"]


def test_the_server_cap_applies_to_requests_naming_no_limit_and_bounds_those_that_do(server):
    r, _ = post(server, ONE_WORD, {"strategy": "none"}, max_tokens=4)
    assert r.json()["alignment"]["budget"]["deadline_s"] == 600  # --max-request-seconds' default
    r, _ = post(server, ONE_WORD, {"strategy": "none", "deadline_s": 5000}, max_tokens=4)
    assert r.json()["alignment"]["budget"]["deadline_s"] == 600


@pytest.mark.parametrize("field, value", [("deadline_s", -1), ("deadline_s", "soon"), ("max_total_tokens", 0)])
def test_bad_limits_are_400s_naming_them(server, field, value):
    r, _ = post(server, ONE_WORD, {"strategy": "best_of_n", field: value}, max_tokens=4)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == f"alignment.{field}"
