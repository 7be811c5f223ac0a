"""`particle_filter` and `beam_search` over the in-memory engine: resampling follows the
reward's softmax, a population that agrees streams before the search ends, and beams grow by
`k` blocks each. The contract (`test_strategy_contract`) checks the rest."""

from __future__ import annotations

import hashlib
import math

import pytest

from aligner.rewards.base import Reward
from aligner.strategies import StrategyResult
from decoding.engine import SequenceDelta
from tests.unit.aligner.test_strategy_contract import World, checked


def chars(text: str) -> float:
    """Characters in the text, plus a fraction from its hash so distinct texts do not tie."""
    return len(text) + int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32


class CharacterCount(Reward):
    name = "chars"
    kind = "rule"
    description = "characters in the answer, ties broken by a hash"

    def score(self, prompts, responses):
        return [chars(r) for r in responses]


def world(**kw) -> World:
    w = World(max_tokens=24, **kw)
    w.rewards.add(CharacterCount())
    return w


async def stream(strategy, w: World, params) -> tuple[list, list[int]]:
    """The stream's events, and how many engine requests had started when each came."""
    events, started = [], []
    async for event in strategy.stream(w.ctx, params):
        events.append(event)
        started.append(len(w.engine.requests))
    return events, started


async def test_particle_weights_are_the_softmax_of_the_scores_over_the_temperature():
    w = world(ignore_eos=True)
    strategy, params = checked("particle_filter", w, {"n": 4, "block_tokens": 4, "reward": "chars",
                                                      "resample_temperature": 3.0})
    result = await strategy.run(w.ctx, params)
    steps = result.info["steps"]
    assert len(steps) == 6  # 24 tokens in blocks of 4, never ending early
    for step in steps:
        scores = step["scores"]
        top = max(scores)
        expected = [math.exp((s - top) / 3.0) for s in scores]
        assert step["weights"] == pytest.approx([e / sum(expected) for e in expected], abs=1e-4)
        assert step["effective_particles"] == pytest.approx(1 / sum(x * x for x in step["weights"]), abs=1e-2)
    (choice,) = result.choices
    assert len(choice.token_ids) == 24 and choice.finish_reason == "length"


async def test_a_sharp_resampling_agrees_on_one_particle_and_streams_it_before_the_search_ends():
    w = world(ignore_eos=True)
    strategy, params = checked("particle_filter", w, {"n": 4, "block_tokens": 4, "reward": "chars",
                                                      "resample_temperature": 0.01})
    events, started = await stream(strategy, w, params)
    result = events[-1]
    assert isinstance(result, StrategyResult)
    deltas = [(e, s) for e, s in zip(events, started) if isinstance(e, SequenceDelta) and e.text]
    total = len(w.engine.requests)
    # All weight on the best particle: every step's survivors are its copies, so each step's
    # block is streamed before the next step's engine requests start.
    assert len(deltas) == 6 and all(s < total for _, s in deltas[:-1])
    for step in result.info["steps"]:
        assert len(set(step["kept"])) == 1 and step["scores"][step["kept"][0]] == max(step["scores"])
    assert result.info["streamed_early_tokens"] == 24
    assert "".join(e.text for e, _ in deltas) == result.choices[0].text
    # Copies of one particle continue in one engine request of n = 4.
    assert [r.sampling.n for r in w.engine.requests] == [4] * 6


async def test_a_flat_resampling_keeps_particles_apart_and_streams_at_the_end():
    w = world(ignore_eos=True)
    strategy, params = checked("particle_filter", w, {"n": 4, "block_tokens": 4, "reward": "chars",
                                                      "resample_temperature": 100.0})
    events, started = await stream(strategy, w, params)
    result = events[-1]
    assert result.info["streamed_early_tokens"] < 24
    assert max(len(set(step["kept"])) for step in result.info["steps"]) >= 3
    text = "".join(e.text for e in events if isinstance(e, SequenceDelta))
    assert text == result.choices[0].text
    assert result.choices[0].score == max(p["score"] for p in result.info["particles"])


async def test_beam_search_grows_each_distinct_beam_by_k_blocks_and_keeps_the_best():
    w = world()
    strategy, params = checked("beam_search", w, {"n": 2, "k": 3, "block_tokens": 4, "reward": "chars",
                                                  "return_candidates": True})
    result = await strategy.run(w.ctx, params)
    for step in result.info["steps"]:
        requests = [r for r in w.engine.requests if f"-step-{step['step']}-" in r.request_id]
        # Both beams start empty: one request of n * k; then one of k per distinct beam.
        assert [r.sampling.n for r in requests] == ([6] if step["step"] == 0 else [3] * len(requests))
        assert step["grown"] == sum(r.sampling.n for r in requests)
        texts = [c["text"] for c in step["candidates"]]
        kept = sorted(step["scores"][i] for i in step["kept"])
        others = [s for i, s in enumerate(step["scores"]) if texts[i] not in {texts[j] for j in step["kept"]}]
        assert all(s <= kept[0] for s in others)
    (choice,) = result.choices
    assert choice.score == max(p["score"] for p in result.info["particles"]) == pytest.approx(chars(choice.text))


def test_the_admission_weight_is_every_sequence_a_step_decodes():
    w = world()
    strategy, params = checked("beam_search", w, {"n": 2, "k": 3, "reward": "chars"})
    assert strategy.sequences(params, w.ctx) == 6
    strategy, params = checked("particle_filter", w, {"n": 4, "reward": "chars"})
    assert strategy.sequences(params, w.ctx) == 4
