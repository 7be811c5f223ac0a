"""`auto` over the in-memory engine: when it stops after the first round, when it escalates,
and what it reports."""

from __future__ import annotations

import asyncio

import pytest

from aligner.budget import Budget, BudgetParams
from aligner.rewards import Reward
from aligner.strategies import get_strategy
from aligner.strategies.auto import expected_gain, expected_max
from aligner.strategies.mbr import consensus
from tests.fakes import PrefixLM
from tests.unit.aligner.test_strategy_contract import World


def run_auto(world: World, **params):
    strategy = get_strategy("auto")
    checked = strategy.check(strategy.Params.model_validate(params), world.ctx)
    return asyncio.run(strategy.run(world.ctx, checked))


def test_expected_max_matches_known_values():
    # E[max of 3 standard normals] = 3 / (2 sqrt(pi)); of 4: 1.0294 (tables).
    assert expected_max(3) == pytest.approx(0.8463, abs=1e-4)
    assert expected_max(4) == pytest.approx(1.0294, abs=1e-4)
    assert [expected_max(k) for k in (1, 2, 4, 8, 16)] == sorted(expected_max(k) for k in (1, 2, 4, 8, 16))


def test_candidates_that_score_alike_stop_after_the_first_round():
    world = World(max_tokens=8)
    result = run_auto(world, n=8, start=2, reward="keyword:zebra")  # no candidate says zebra: all score 0
    assert [r.sampling.n for r in world.engine.requests] == [2]
    assert result.info["stopped"] == "gain" and result.info["candidates_used"] == 2
    (decision,) = result.info["auto"]
    assert decision["spread"] == 0 and decision["expected_gain"] == 0 and decision["escalated"] is False


def test_samples_that_say_the_same_thing_stop_on_agreement():
    world = World(max_tokens=8)
    world.engine.lm = PrefixLM(words=("same",), min_answer=100)  # every sample: "same" eight times
    result = run_auto(world, n=8, start=4, reward="length_penalty", min_gain=0, agree=90)
    texts = [c.text for c in result.candidates]
    (decision,) = result.info["auto"]
    assert decision["agreement"] == pytest.approx(sum(consensus(texts)) / len(texts), abs=0.01)
    assert decision["agreement"] == 100
    assert result.info["stopped"] == "agreement" and len(world.engine.requests) == 1


def test_samples_that_disagree_are_not_stopped_by_agreement():
    world = World(max_tokens=12)
    result = run_auto(world, n=4, start=2, reward="length_penalty", min_gain=0, agree=90)
    first = result.info["auto"][0]
    texts = [c.text for c in result.candidates[:2]]
    assert first["agreement"] == pytest.approx(sum(consensus(texts)) / 2, abs=0.01)
    assert first["agreement"] < 90
    assert first["escalated"] and result.info["candidates_used"] == 4


def test_it_doubles_the_pool_while_the_expected_gain_pays():
    world = World(max_tokens=12)
    result = run_auto(world, n=8, start=2, reward="length_penalty", min_gain=1e-6, agree=100)
    assert [r.sampling.n for r in world.engine.requests] == [2, 2, 4]
    assert result.info["candidates_used"] == 8 and result.info["stopped"] is None
    first, second = result.info["auto"]
    assert (first["candidates"], second["candidates"]) == (2, 4) and first["escalated"] and second["escalated"]
    scores = [c.score for c in result.candidates[:2]]
    assert first["expected_gain"] == pytest.approx(expected_gain(scores, 2), abs=1e-4)
    assert result.choices[0].score == max(c.score for c in result.candidates)


def test_a_high_bar_for_the_gain_stops_where_a_low_one_escalates():
    low, high = World(max_tokens=12), World(max_tokens=12)
    escalated = run_auto(low, n=4, start=2, reward="length_penalty", min_gain=1e-6, agree=100)
    stopped = run_auto(high, n=4, start=2, reward="length_penalty", min_gain=1e6, agree=100)
    gain = escalated.info["auto"][0]["expected_gain"]
    assert gain > 0 and stopped.info["auto"][0]["expected_gain"] == gain  # same seed, same first round
    assert escalated.info["candidates_used"] == 4 and stopped.info["candidates_used"] == 2
    assert stopped.info["stopped"] == "gain"


def test_a_token_cap_the_next_round_cannot_pay_for_stops_it():
    world = World(max_tokens=12)
    world.ctx = world.ctx.with_budget(Budget.capped(BudgetParams(max_total_tokens=30), None, None))
    result = run_auto(world, n=8, start=2, reward="length_penalty", min_gain=0, agree=100)
    used = sum(len(c.token_ids) for c in result.candidates)
    assert result.info["stopped"] == "max_total_tokens" and used <= 30
    assert result.info["auto"][-1]["stopped"] == "max_total_tokens"


def test_one_first_candidate_always_gets_a_second_round():
    world = World(max_tokens=8)
    result = run_auto(world, n=2, start=1, reward="keyword:zebra")
    assert [r.sampling.n for r in world.engine.requests] == [1, 1]
    assert result.info["auto"] == [{"candidates": 1, "escalated": True}]


def test_start_beyond_n_is_refused_and_the_default_start_fits_n_1():
    params = get_strategy("auto").Params
    with pytest.raises(ValueError, match="start"):
        params.model_validate({"n": 2, "start": 3})
    assert params.model_validate({"n": 1}).start == 1 and params.model_validate({}).start == 2


def test_the_first_round_holds_every_answer_the_request_returns():
    """A request for 4 answers never stops with fewer candidates than that."""
    world = World(n=4, max_tokens=8)
    result = run_auto(world, n=8, start=2, reward="keyword:zebra")  # all score alike: stops after one round
    assert [r.sampling.n for r in world.engine.requests] == [4]
    assert len(result.choices) == 4 and result.info["stopped"] == "gain"


def test_null_turns_a_test_off():
    world = World(max_tokens=8)
    world.engine.lm = PrefixLM(words=("same",), min_answer=100)  # identical answers, identical scores
    result = run_auto(world, n=8, start=2, reward="keyword:zebra", min_gain=None, agree=None)
    assert result.info["candidates_used"] == 8 and result.info["stopped"] is None
    assert [d["escalated"] for d in result.info["auto"]] == [True, True]


def test_admission_weighs_its_largest_round():
    strategy, world = get_strategy("auto"), World()
    assert strategy.sequences(strategy.Params.model_validate({"n": 8}), world.ctx) == 4  # rounds 2, 2, 4
    assert strategy.sequences(strategy.Params.model_validate({"n": 8, "start": 8}), world.ctx) == 8
    assert strategy.sequences(strategy.Params.model_validate({"n": 8}), World(n=4).ctx) == 4  # rounds 4, 4


class FailsSecondTime(Reward):
    """A model reward that scores the first round and fails on the next."""

    name, kind, description = "flaky", "model", "fails on its second call"

    def __init__(self):
        self.calls = 0

    def score(self, prompts, responses):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("the scorer crashed")
        return [float(len(r)) for r in responses]


def test_a_reward_that_fails_in_a_later_round_keeps_the_earlier_rounds_in_the_report():
    world = World(max_tokens=12)
    world.rewards.add(FailsSecondTime())
    result = run_auto(world, n=4, start=2, reward="flaky", min_gain=0, agree=100)
    assert result.info["fallback"]["reward"] == "flaky"
    (decision,) = result.info["auto"]  # the first round's decision, made on its scores
    assert decision["candidates"] == 2 and decision["escalated"] is True
    assert result.info["candidates_used"] == 4 and result.info["waves"] == 2
    assert len(result.choices) == 1 and [r.sampling.n for r in world.engine.requests] == [2, 2]
