"""Deadlines and token budgets: every registered strategy stops at a request's limits with an
answer, and best-of-N keeps the best finished candidate and stops sampling early.

The worlds, setups and checks are the strategy contract's (`test_strategy_contract`), so a
strategy added there is held to its budget here too.
"""

from __future__ import annotations

import time

import pytest

from aligner.budget import Budget, BudgetedEngine, BudgetParams
from aligner.rewards.base import Reward
from aligner.strategies import StrategyResult
from aligner.strategies.pipeline import Pipeline, PipelineParams
from decoding.engine import SamplingConfig, collect
from tests.fakes import FakeEngine, PrefixLM
from tests.unit.aligner.test_strategy_contract import (
    FINISH_REASONS,
    REWARD,
    STRATEGIES,
    World,
    checked,
    length_penalty,
    setup_for,
)

TOKENS = 6
DEADLINE_S = 0.3
# A chunk carries one token per sample, so a request of k samples may overrun by k - 1.
MOST_SAMPLES = 4


def assert_answered(result: StrategyResult, world: World, n: int) -> None:
    assert isinstance(result, StrategyResult)
    assert len(result.choices) == n
    assert all(c.finish_reason in FINISH_REASONS for c in result.choices)
    assert world.running() == set()  # nothing left decoding after the answer


def test_budget_limits_shares_and_caps():
    budget = Budget.capped(BudgetParams(deadline_s=10.0), 4.0, None)
    assert budget.deadline_s == 4.0 and budget.max_total_tokens is None and budget.limited
    assert Budget.capped(BudgetParams(), None, 50).max_total_tokens == 50  # the server's cap alone
    assert not Budget.capped(BudgetParams(), None, None).limited
    tokens = Budget(max_total_tokens=100)
    part = tokens.share(0.5)
    part.charge(30)
    assert (part.remaining_tokens(), tokens.remaining_tokens()) == (20, 70)
    part.charge(25)
    assert part.spent() and part.ran_out == "max_total_tokens" and tokens.ran_out == "max_total_tokens"
    assert not tokens.spent()  # the share ran out, not the request
    part.skip("a prompt stage")
    assert tokens.public()["skipped"] == ["a prompt stage"] and tokens.public()["used_tokens"] == 55


async def test_an_engine_stream_is_cut_at_the_token_budget_and_aborted():
    engine = FakeEngine(max_model_len=4096, lm=PrefixLM())
    budget = Budget(max_total_tokens=7)
    sampling = SamplingConfig(max_tokens=50, n=3, temperature=1.0, seed=1, ignore_eos=True)
    generation = await collect(BudgetedEngine(engine, budget).generate("r", [1, 2], sampling), 3)
    assert 7 <= generation.completion_tokens <= 7 + 2
    assert [s.finish_reason for s in generation.sequences] == ["length"] * 3
    assert engine.running == set() and engine.aborted == ["r"]
    assert budget.ran_out == "max_total_tokens" and budget.used_tokens == generation.completion_tokens


async def test_an_engine_stream_is_cut_at_the_deadline_even_before_its_first_token():
    engine = FakeEngine(max_model_len=4096, lm=PrefixLM())
    engine.step_delay = 5.0
    budget = Budget(deadline_s=0.1)
    began = time.monotonic()
    generation = await collect(BudgetedEngine(engine, budget).generate("r", [1], SamplingConfig(max_tokens=9)), 1)
    assert time.monotonic() - began < 1.0
    assert generation.sequences[0].finish_reason == "length" and generation.completion_tokens == 0
    assert engine.running == set() and budget.ran_out == "deadline"


@pytest.mark.parametrize("name", STRATEGIES)
async def test_every_strategy_stops_at_max_total_tokens_with_an_answer(name):
    world = World(max_tokens=40, ignore_eos=True)
    strategy, params = checked(name, world, setup_for(name).params)
    budget = Budget(max_total_tokens=TOKENS)
    result = await strategy.run(world.ctx.with_budget(budget), params)
    assert_answered(result, world, 1)
    generated = sum(r.completion_tokens for r in world.requests)
    assert generated == budget.used_tokens <= TOKENS + MOST_SAMPLES - 1
    assert budget.ran_out == "max_total_tokens"


@pytest.mark.parametrize("name", STRATEGIES)
async def test_every_strategy_answers_by_its_deadline(name):
    world = World(max_tokens=200, ignore_eos=True, step_delay=0.01)
    strategy, params = checked(name, world, setup_for(name).params)
    budget = Budget(deadline_s=DEADLINE_S)
    result = await strategy.run(world.ctx.with_budget(budget), params)
    elapsed = time.monotonic() - budget.started
    assert_answered(result, world, 1)
    assert elapsed < DEADLINE_S + 0.25, elapsed
    assert budget.ran_out == "deadline"


async def test_best_of_n_at_its_token_budget_returns_the_best_finished_candidate():
    world = World(max_tokens=30)
    strategy, params = checked("best_of_n", world, {"n": 4, **REWARD, "return_candidates": True})
    budget = Budget(max_total_tokens=24)
    result = await strategy.run(world.ctx.with_budget(budget), params)
    (choice,) = result.choices
    finished = [c for c in result.candidates if c.finish_reason == "stop"]
    assert finished and any(c.finish_reason == "length" for c in result.candidates)
    assert choice.finish_reason == "stop"
    assert choice.score == max(length_penalty(c.text) for c in finished)
    assert budget.ran_out == "max_total_tokens" and any("unfinished" in s for s in budget.skipped)


async def test_adaptive_best_of_n_stops_at_a_clear_lead():
    world = World(max_tokens=30)
    strategy, params = checked("best_of_n", world, {"n": 8, "batch": 1, "stop_margin": 0.005, **REWARD})
    result = await strategy.run(world.ctx, params)
    info = result.info
    assert info["stopped"] == "stop_margin" and 2 <= info["candidates_used"] < 8
    assert info["candidates_used"] == len(result.candidates) == len(world.engine.requests) == info["waves"]
    (best,) = result.choices
    others = [c.score for c in result.candidates if c is not best]
    assert best.score - max(others) >= 0.005
    # Every wave but the last lacked that lead.
    for k in range(2, info["candidates_used"]):
        scores = sorted((c.score for c in result.candidates[:k]), reverse=True)
        assert scores[0] - scores[1] < 0.005


async def test_adaptive_best_of_n_starts_no_wave_its_budget_cannot_pay_for():
    world = World(max_tokens=10, ignore_eos=True)
    strategy, params = checked("best_of_n", world, {"n": 6, "batch": 2, **REWARD})
    budget = Budget(max_total_tokens=35)  # a wave costs 20 tokens: one fits, a second does not
    result = await strategy.run(world.ctx.with_budget(budget), params)
    assert result.info["candidates_used"] == 2 and result.info["stopped"] == "max_total_tokens"
    assert len(world.engine.requests) == 1 and budget.used_tokens == 20
    assert result.choices[0].finish_reason == "length"  # max_tokens, as without a budget
    assert budget.skipped == ["4 of 6 candidates"]


async def test_stop_margin_needs_waves():
    world = World()
    with pytest.raises(Exception, match="stop_margin needs batch"):
        checked("best_of_n", world, {"n": 4, "stop_margin": 1.0, **REWARD})


async def test_a_pipeline_out_of_time_keeps_the_last_completed_stage():
    world = World(max_tokens=200, ignore_eos=True, step_delay=0.01)
    stages = [checked("rewrite", world, {"rewriter": "helper"}),
              checked("best_of_n", world, {"n": 2, **REWARD}),
              checked("self_refine", world, {"rounds": 2, **REWARD})]
    budget = Budget(deadline_s=0.2)  # the rewrite (14 tokens, 0.14 s) gets half of it
    result = await Pipeline(stages).run(world.ctx.with_budget(budget), PipelineParams())
    assert time.monotonic() - budget.started < 0.2 + 0.25
    assert_answered(result, world, 1)
    # The rewrite spent its half and was cut: the answer is to the user's own words.
    assert result.info["prompt_stages"] == [{"stage": "rewrite", "cut": "deadline"}]
    decoded = next(r for r in world.engine.requests if r.request_id.endswith("-generate"))
    assert decoded.prompt_ids == world.ctx.prompt_ids
    assert budget.ran_out == "deadline"
    assert any(s.startswith("pipeline stage 0 (rewrite)") for s in budget.skipped)
    assert any(s.startswith("pipeline stage 2 (self_refine)") for s in budget.skipped)


class SlowModel(Reward):
    """A reward model (scored on its own thread, not free like a rule) whose k-th call takes
    `delays[k]` seconds (the last delay repeats); it scores like `length_penalty`."""

    name, kind, description = "slow", "model", "a reward model that takes its time"

    def __init__(self, *delays: float):
        self.delays, self.calls = list(delays), 0

    def score(self, prompts, responses):
        time.sleep(self.delays[min(self.calls, len(self.delays) - 1)])
        self.calls += 1
        return [length_penalty(r) for r in responses]


def slow_world(*delays: float, **kw) -> World:
    world = World(**kw)
    world.rewards.add(SlowModel(*delays))
    return world


def within(budget: Budget, slack: float = 0.5) -> bool:
    return time.monotonic() - budget.started < budget.deadline_s + slack


async def test_best_of_n_under_a_deadline_leaves_its_reward_model_time_to_score():
    # Unbounded, sampling takes 4 s; the deadline's last 10% (0.2 s) is left to the reward model.
    world = slow_world(0.02, max_tokens=400, ignore_eos=True, step_delay=0.01)
    strategy, params = checked("best_of_n", world, {"n": 3, "reward": "slow", "return_candidates": True})
    budget = Budget(deadline_s=2.0)
    result = await strategy.run(world.ctx.with_budget(budget), params)
    assert within(budget) and budget.ran_out == "deadline"
    assert "fallback" not in result.info  # scored, not a plain answer
    assert all(c.cut and c.score is not None for c in result.candidates)
    assert result.info["scores"] == [max(c.score for c in result.candidates)]


async def test_adaptive_best_of_n_drops_a_wave_the_deadline_left_unscored():
    world = slow_world(0.01, 2.0, max_tokens=10, ignore_eos=True, step_delay=0.01)
    strategy, params = checked("best_of_n", world, {"n": 8, "batch": 2, "reward": "slow"})
    budget = Budget(deadline_s=1.5)  # the second wave is sampled, its scoring (2 s) outlives the deadline
    result = await strategy.run(world.ctx.with_budget(budget), params)
    assert within(budget)
    info = result.info
    assert (info["candidates_used"], info["stopped"]) == (2, "deadline") and "fallback" not in info
    assert len(world.engine.requests) == 2  # the second wave was sampled, then dropped unscored
    assert result.choices[0].score is not None and result.choices[0].index in (0, 1)


async def test_speculative_rejection_out_of_time_to_score_keeps_the_last_rounds_best():
    world = slow_world(0.01, 2.0, max_tokens=60, ignore_eos=True, step_delay=0.01)
    strategy, params = checked("speculative_rejection", world,
                               {"n": 4, "chunk_tokens": 3, "min_survivors": 1, "reward": "slow"})
    budget = Budget(deadline_s=1.5)
    result = await strategy.run(world.ctx.with_budget(budget), params)
    assert within(budget) and "fallback" not in result.info
    (best,) = result.choices
    first_round = result.info["rounds"][0]
    assert best.score == max(first_round["scores"]) and best.finish_reason == "length"


async def test_blockwise_out_of_time_to_score_keeps_the_accepted_blocks():
    world = slow_world(0.01, 2.0, max_tokens=60, ignore_eos=True, step_delay=0.01)
    strategy, params = checked("blockwise", world, {"k": 2, "block_tokens": 4, "reward": "slow"})
    budget = Budget(deadline_s=1.5)
    result = await strategy.run(world.ctx.with_budget(budget), params)
    assert within(budget) and "fallback" not in result.info
    (choice,) = result.choices
    assert result.info["blocks"] == 1 and len(choice.token_ids) == 4 and choice.finish_reason == "length"
