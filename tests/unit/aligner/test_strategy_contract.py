"""The contract every registered strategy keeps, run over an in-memory engine in seconds.

Each strategy in `strategy_names()` needs an entry in SETUPS (a valid request, whether it
returns several choices, the `info` it documents, requests its `check` must refuse): a
strategy added without one fails here. Only the engines (`tests.fakes`) and one failing
reward are fakes; the strategies, the reward registry and the built-in rules are the real ones.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
from pydantic import ValidationError

from aligner.rewards import Reward, RewardError, RewardRegistry
from aligner.strategies import (
    KeepAlive,
    StrategyContext,
    StrategyLimits,
    StrategyParamError,
    StrategyResult,
    StrategyUnavailable,
    get_strategy,
    strategy_names,
)
from aligner.strategies.base import sampling_conflicts
from aligner.strategies.pipeline import Pipeline, PipelineParams, order_error
from aligner.strategies.templates import DEFAULT_IN_CONTEXT
from decoding import guide_spec
from decoding.engine import SamplingConfig, SequenceDelta, StructuredOutput
from tests.fakes import EOS_ID, FakeEngine, PrefixLM

REQUEST_ID = "chatcmpl-contract"
MESSAGES = [{"role": "user", "content": "why is the sky blue ?"}]
HELPER = "helper"
GUIDES = {"helpful": "genarm", "safe": "args"}
HELPER_WORDS = ("fine", "clear", "short", "reply", "kind", "words", "here", "now")
FINISH_REASONS = ("stop", "length")
MAX_CANDIDATES = 4  # the server limit the refusal cases push past


def length_penalty(text: str) -> float:
    """The built-in `length_penalty` rule, recomputed to check the scores strategies report."""
    return -len(text.split()) / 100.0


class BrokenReward(Reward):
    """A reward model that fails on every call."""

    name = "broken"
    kind = "rule"
    description = "always fails"

    def score(self, prompts, responses):
        raise RewardError(self.name, "the scorer crashed")


def make_guides(modes: dict[str, str], max_slots: int = 8, max_len: int = 4096):
    """The guide catalog the server builds, from whichever module holds it now."""
    catalog = getattr(guide_spec, "GuideCatalog", None)
    if catalog is None:
        from aligner.strategies.guided import GuideRegistry

        return GuideRegistry(modes=dict(modes), max_slots=max_slots, max_len=max_len)
    accepted = inspect.signature(catalog).parameters
    if "specs" in accepted:
        specs = {name: {"path": f"/guides/{name}", "mode": mode} for name, mode in modes.items()}
        return catalog(specs=specs, max_slots=max_slots, max_len=max_len)
    return catalog(modes=dict(modes), max_slots=max_slots, max_len=max_len)


class World:
    """A policy engine, a helper model, the built-in rewards plus `broken`, and a request's
    context built as `server.serving_chat` builds it."""

    def __init__(self, *, n: int = 1, max_tokens: int = 12, seed: int | None = 7, step_delay: float = 0.0,
                 ignore_eos: bool = False, max_candidates: int = 16, messages=MESSAGES):
        self.engine = FakeEngine(max_model_len=4096, lm=PrefixLM())
        self.helper = FakeEngine(max_model_len=4096, lm=PrefixLM(words=HELPER_WORDS))
        for engine in self.engines:
            engine.step_delay = step_delay
        self.rewards = RewardRegistry.with_builtins()
        self.rewards.add(BrokenReward())
        self.guides = make_guides(GUIDES)
        self.ctx = StrategyContext(
            engine=self.engine,
            rewards=self.rewards,
            request_id=REQUEST_ID,
            messages=list(messages),
            prompt_ids=self.engine.tokenizer.encode_chat(messages),
            sampling=SamplingConfig(max_tokens=max_tokens, n=n, temperature=1.0, seed=seed, ignore_eos=ignore_eos),
            limits=StrategyLimits(max_candidates=max_candidates),
            keepalive_s=0.001,
            templates={},
            guides=self.guides,
            helpers={HELPER: self.helper},
        )

    @property
    def engines(self) -> list[FakeEngine]:
        return [self.engine, self.helper]

    @property
    def requests(self):
        """Every engine request, policy and helper, in the order they started."""
        return sorted((r for engine in self.engines for r in engine.requests), key=lambda r: r.started_ns)

    def running(self) -> set[str]:
        return set().union(*(engine.running for engine in self.engines))

    def aborted(self) -> list[str]:
        return [i for engine in self.engines for i in engine.aborted]


# --- what each strategy documents --------------------------------------------------------


def check_selection(result: StrategyResult, world: World) -> None:
    """best-of-N family: `selected` indexes `candidates`, `scores` are the chosen ones' rewards."""
    info = result.info
    assert len(info["selected"]) == len(result.choices) == len(info["scores"])
    for choice, index, score in zip(result.choices, info["selected"], info["scores"]):
        assert result.candidates[index] is choice
        assert score == choice.score == pytest.approx(length_penalty(choice.text))
    assert all(c.score == pytest.approx(length_penalty(c.text)) for c in result.candidates)


def check_best_of_n(result: StrategyResult, world: World) -> None:
    check_selection(result, world)
    # One engine request samples every candidate; the best come first.
    assert len(result.candidates) == SETUPS["best_of_n"].params["n"] == world.engine.requests[0].sampling.n
    scores = result.info["scores"]
    assert scores[0] == max(c.score for c in result.candidates) and scores == sorted(scores, reverse=True)


def check_soft_best_of_n(result: StrategyResult, world: World) -> None:
    check_selection(result, world)
    assert len(set(result.info["selected"])) == len(result.choices)  # drawn without replacement


def check_speculative_rejection(result: StrategyResult, world: World) -> None:
    info = result.info
    (best,) = result.choices
    assert info["selected"] == [best.index] and info["scores"] == [best.score]
    assert best.score == pytest.approx(length_penalty(best.text))
    assert set(info) >= {"rounds", "stopped_early"}
    finished = {i: score for r in info["rounds"]
                for i, score in zip(r["candidates"], r["scores"]) if i in r["finished"]}
    assert best.index in finished and best.score == max(finished.values())
    assert info["stopped_early"] == SETUPS["speculative_rejection"].params["n"] - len(finished)
    for earlier, later in zip(info["rounds"], info["rounds"][1:]):
        assert set(later["candidates"]) <= set(earlier["kept"])
    # Extensions continue each survivor from the prompt plus its own tokens so far.
    prompt = world.ctx.prompt_ids
    for request in world.engine.requests[1:]:
        assert request.prompt_ids[: len(prompt)] == prompt and request.sampling.n == 1


def check_blockwise(result: StrategyResult, world: World) -> None:
    info = result.info
    (choice,) = result.choices
    assert info["blocks"] == len(info["steps"]) >= 1
    # The search goes on until the answer ends or the budget is spent.
    assert choice.finish_reason == "stop" or len(choice.token_ids) == world.ctx.sampling.max_tokens
    assert 0.0 <= info["prefix_cache_hit_rate"] <= 1.0
    if info["blocks"] > 1:
        assert info["prefix_cache_hit_rate"] > 0  # later blocks continue a cached prefix
    assert world.engine.tokenizer.decode(choice.token_ids) == choice.text
    accepted: list[int] = []
    for step, request in zip(info["steps"], [r for r in world.engine.requests if "-block-" in r.request_id]):
        assert request.prompt_ids == world.ctx.prompt_ids + accepted
        scores = [c["score"] for c in step["candidates"]]
        assert scores[step["selected"]] == max(scores)
        accepted += request.outputs[step["selected"]]
    assert accepted == choice.token_ids


def check_population(result: StrategyResult, world: World, children: int) -> None:
    """particle_filter / beam_search: each step grows every unfinished kept particle by
    `children` blocks, one engine request per distinct answer so far, continuing it; the
    answer is the best-scoring kept particle."""
    info = result.info
    (choice,) = result.choices
    assert choice.finish_reason == "stop" or len(choice.token_ids) == world.ctx.sampling.max_tokens
    assert choice.score == pytest.approx(length_penalty(choice.text)) == info["scores"][0]
    kept = info["particles"]
    assert choice.text == kept[info["selected"]]["text"]
    assert choice.score == max(p["score"] for p in kept)
    assert all(p["finish_reason"] in FINISH_REASONS for p in kept)
    assert len(info["steps"]) >= 2
    prompt = world.ctx.prompt_ids
    for step in info["steps"]:
        requests = [r for r in world.engine.requests if f"-step-{step['step']}-" in r.request_id]
        assert len(requests) == len({r.request_id for r in requests})
        assert sum(r.sampling.n for r in requests) == step["grown"]
        assert all(r.prompt_ids[: len(prompt)] == prompt for r in requests)
        assert len(step["kept"]) == len(kept) and all(0 <= i < len(step["scores"]) for i in step["kept"])
        pool = step["candidates"]
        assert [round(length_penalty(c["text"]), 4) for c in pool] == pytest.approx(step["scores"])
    assert world.engine.tokenizer.decode(choice.token_ids) == choice.text


def check_particle_filter(result: StrategyResult, world: World) -> None:
    check_population(result, world, 1)
    for step in result.info["steps"]:
        assert sum(step["weights"]) == pytest.approx(1.0, abs=1e-3)
        assert 1.0 <= step["effective_particles"] <= len(step["weights"]) + 1e-9
        # systematic resampling: each particle is drawn floor or ceil of n * weight times
        n = len(step["kept"])
        for i, w in enumerate(step["weights"]):
            assert abs(step["kept"].count(i) - n * w) < 1 + 1e-3


def check_beam_search(result: StrategyResult, world: World) -> None:
    check_population(result, world, SETUPS["beam_search"].params["k"])
    for step in result.info["steps"]:  # the best distinct partial answers are kept
        texts = [c["text"] for c in step["candidates"]]
        kept = step["kept"]
        assert len({texts[i] for i in kept}) == min(len(kept), len(set(texts)))
        floor = min(step["scores"][i] for i in kept)
        assert all(step["scores"][i] <= floor for i in range(len(texts)) if texts[i] not in {texts[j] for j in kept})


def check_guided(result: StrategyResult, world: World) -> None:
    assert result.info["guide"] == "helpful" and result.info["mode"] == GUIDES["helpful"]
    (request,) = world.engine.requests
    spec = request.sampling.extra_args[guide_spec.EXTRA_ARGS_KEY]
    assert spec["guide"] == "helpful" and spec["mode"] == "genarm"


def check_self_refine(result: StrategyResult, world: World) -> None:
    history = result.info["self_refine"]
    assert len(history) == len(result.choices)
    for choice, record in zip(result.choices, history):
        assert record["final_score"] == pytest.approx(length_penalty(choice.text))
        rounds = record["rounds"]
        assert rounds[0]["round"] == 0 and 1 <= len(rounds) - 1 <= SETUPS["self_refine"].params["rounds"]
        kept = [r for r in rounds if r["accepted"]]
        assert kept[-1]["answer"] == choice.text
        assert all(r["score"] > prev["score"] for prev, r in zip(kept, kept[1:]))


def check_mbr(result: StrategyResult, world: World) -> None:
    from aligner.strategies.mbr import consensus

    info = result.info
    assert info["utility"] == "chrf++" and len(result.candidates) == world.engine.requests[0].sampling.n == 4
    expected = consensus([c.text for c in result.candidates])
    assert [c.score for c in result.candidates] == pytest.approx(expected, abs=1e-3)
    assert info["selected"] == [c.index for c in result.choices] and info["scores"] == [c.score for c in result.choices]
    assert result.choices[0].score == max(c.score for c in result.candidates)


def check_correct(result: StrategyResult, world: World) -> None:
    report = result.info["correct"]
    assert len(report) == len(result.choices)
    for c, (choice, record) in enumerate(zip(result.choices, report)):
        assert record["accepted"] == (record["corrected_score"] > record["original_score"])
        assert record["corrected_score"] == pytest.approx(length_penalty(record["correction"]))
        if record["accepted"]:
            assert choice.text == record["correction"]
        assert any(r.request_id.endswith(f"-correct-{c}") for r in world.helper.requests)
    assert not any("-correct-" in r.request_id for r in world.engine.requests)


def check_prompt_stage(result: StrategyResult, world: World, stage: str) -> dict:
    (info,) = result.info["prompt_stages"]
    assert info["stage"] == stage and result.info["decode_stage"] == "none"
    return info


def check_rewrite(result: StrategyResult, world: World) -> None:
    info = check_prompt_stage(result, world, "rewrite")
    assert info["original"] == MESSAGES[-1]["content"]
    assert info["rewrite"] == info["rewrites"][info["selected"]]
    (rewriter,) = world.helper.requests
    assert rewriter.request_id == f"{REQUEST_ID}-rewrite" and rewriter.sampling.temperature == 0.0
    # The policy answered the rewritten question, not the original.
    (answer,) = world.engine.requests
    assert answer.prompt_ids == world.engine.tokenizer.encode_chat([{"role": "user", "content": info["rewrite"]}])


def check_urial(result: StrategyResult, world: World) -> None:
    info = check_prompt_stage(result, world, "urial")
    assert info["template"] == "default" and info["prefix_messages"] == 1 + 2 * len(DEFAULT_IN_CONTEXT.examples)
    (request,) = world.engine.requests
    assert request.prompt_ids == world.engine.tokenizer.encode_chat(DEFAULT_IN_CONTEXT.prefix() + MESSAGES)


def check_decline(result: StrategyResult, world: World) -> None:
    from aligner.strategies.decline import FALLBACK, declined

    info = result.info["decline"]
    (request,) = world.engine.requests
    assert info["candidates"] == request.sampling.n == 3 and request.sampling.max_tokens <= 64
    texts = [world.engine.tokenizer.decode(ids) for ids in request.outputs]
    assert info["declined"] == sum(declined(t) is not None for t in texts)
    assert info["fallback"] == max(0, len(result.choices) - info["declined"])
    for choice in result.choices:  # a decline cut from a candidate, or the fixed refusal
        assert choice.text == FALLBACK or declined(choice.text) == choice.text


def check_auto(result: StrategyResult, world: World) -> None:
    """Escalated once (neither test can stop it): two rounds of two, one engine request each."""
    check_selection(result, world)
    assert [r.sampling.n for r in world.engine.requests] == [2, 2]
    assert result.info["candidates_used"] == len(result.candidates) == 4 and result.info["stopped"] is None
    (decision,) = result.info["auto"]
    assert decision["candidates"] == 2 and decision["escalated"] is True
    assert decision["spread"] >= 0 and 0 <= decision["agreement"] <= 100


def check_none(result: StrategyResult, world: World) -> None:
    assert result.info == {}


@dataclass(frozen=True)
class Setup:
    params: dict  # a valid `alignment` object for the strategy
    multi: bool  # whether it returns n > 1 choices (else check refuses n=2, naming "n")
    info: Callable[[StrategyResult, World], None]  # asserts the `info` the strategy documents
    refusals: list[tuple[dict, str]] = field(default_factory=list)  # params -> the param check names
    scoring: dict | None = None  # params under which it calls its reward (default: `params`)


REWARD = {"reward": "length_penalty"}
SETUPS: dict[str, Setup] = {
    "none": Setup({}, True, check_none),
    "best_of_n": Setup({"n": 3, **REWARD}, True, check_best_of_n,
                       [({"n": MAX_CANDIDATES + 1, **REWARD}, "n"), ({"n": 2, "reward": "nope"}, "reward.nope")]),
    "auto": Setup({"n": 4, "start": 2, "min_gain": None, "agree": None, **REWARD}, True, check_auto,
                  [({"n": MAX_CANDIDATES + 1, **REWARD}, "n"), ({"n": 2, "reward": "nope"}, "reward.nope")]),
    "soft_best_of_n": Setup({"n": 3, "lambda": 0.1, **REWARD}, True, check_soft_best_of_n,
                            [({"n": MAX_CANDIDATES + 1, **REWARD}, "n")]),
    "speculative_rejection": Setup(
        {"n": 4, "chunk_tokens": 3, "min_survivors": 1, **REWARD}, False, check_speculative_rejection,
        [({"n": MAX_CANDIDATES + 1, **REWARD}, "n"), ({"n": 2, "min_survivors": 3, **REWARD}, "min_survivors")]),
    "blockwise": Setup({"k": 3, "block_tokens": 4, "return_candidates": True, "reward": "keyword:the"}, False,
                       check_blockwise,
                       [({"k": MAX_CANDIDATES + 1, **REWARD}, "k"),
                        ({"reward": {"length_penalty": 1000.0}}, "reward.length_penalty")]),
    "particle_filter": Setup({"n": 3, "block_tokens": 4, "return_candidates": True, **REWARD}, False,
                             check_particle_filter,
                             [({"n": MAX_CANDIDATES + 1, **REWARD}, "n"), ({"reward": "nope"}, "reward.nope")]),
    "beam_search": Setup({"n": 2, "k": 2, "block_tokens": 4, "return_candidates": True, **REWARD}, False,
                         check_beam_search,
                         [({"n": 2, "k": 3, **REWARD}, "k"), ({"reward": "nope"}, "reward.nope")]),
    "guided": Setup({"guide": "helpful"}, True, check_guided,
                    [({"guide": "nope"}, "guide"), ({"guide": "safe", "mode": "genarm"}, "mode")]),
    "self_refine": Setup({"rounds": 2, "return_candidates": True, **REWARD}, True, check_self_refine,
                         [({"reward": "nope"}, "reward.nope")]),
    "correct": Setup({"corrector": HELPER, "return_candidates": True, **REWARD}, True, check_correct,
                     [({"corrector": "nope", **REWARD}, "corrector")]),
    "rewrite": Setup({"rewriter": HELPER}, True, check_rewrite,
                     [({"rewriter": "nope"}, "rewriter"), ({"candidates": MAX_CANDIDATES + 1, **REWARD}, "candidates")],
                     scoring={"candidates": 2, "rewriter": HELPER}),
    "urial": Setup({"template": "default"}, True, check_urial, [({"template": "nope"}, "template")]),
    "mbr": Setup({"n": 4}, True, check_mbr, [({"n": MAX_CANDIDATES + 1}, "n")]),
    "decline": Setup({"n": 3}, True, check_decline, [({"n": MAX_CANDIDATES + 1}, "n")]),
}
WITHOUT_SERVER_LIMITS = {"none"}  # nothing in their parameters depends on the server


def setup_for(name: str) -> Setup:
    if name not in SETUPS:
        pytest.fail(f"strategy {name!r} has no contract setup: add it to SETUPS in {__file__}")
    return SETUPS[name]


def takes_reward(name: str) -> bool:
    return "reward" in get_strategy(name).Params.model_fields


def checked(name: str, world: World, params: dict):
    strategy = get_strategy(name)
    return strategy, strategy.check(strategy.Params.model_validate(params), world.ctx)


# --- what every result must satisfy ------------------------------------------------------


def assert_answers(result: StrategyResult, world: World, n: int) -> None:
    assert isinstance(result, StrategyResult)
    assert len(result.choices) == n
    for choice in result.choices:
        assert choice.text.strip(), result.choices
        assert choice.finish_reason in FINISH_REASONS
        if choice.token_ids:  # engine tokens (not a rewritten answer): they are the text
            assert world.engine.tokenizer.decode(choice.token_ids) == choice.text


def assert_usage_matches_engines(result: StrategyResult, world: World) -> None:
    """Every engine request is one stage report, with the engine's own token counts."""
    reports = [s for s in result.stages if s.prompt_tokens or s.completion_tokens]
    by_stage = {s.stage: s for s in reports}
    assert len(by_stage) == len(reports), [s.stage for s in reports]
    assert len(world.requests) == len(reports)
    for request in world.requests:
        stage = re.sub(rf"^{REQUEST_ID}(-s\d+)*-", "", request.request_id)
        report = by_stage[stage]
        assert (report.prompt_tokens, report.completion_tokens, report.cached_tokens) == (
            len(request.prompt_ids), request.completion_tokens, request.cached_tokens), stage
    assert result.completion_tokens == sum(r.completion_tokens for r in world.requests)
    assert result.prompt_tokens == sum(len(r.prompt_ids) for r in world.requests)
    assert world.running() == set() and world.aborted() == []


async def drain(stream) -> list:
    return [event async for event in stream]


def assert_stream(events: list, n: int) -> StrategyResult:
    """Deltas and keep-alives, then exactly one result whose texts the deltas spell out."""
    *body, result = events
    assert isinstance(result, StrategyResult)
    assert all(isinstance(e, (SequenceDelta, KeepAlive)) for e in body), body
    texts = [""] * n
    for delta in (e for e in body if isinstance(e, SequenceDelta)):
        assert 0 <= delta.index < n
        texts[delta.index] += delta.text
        if delta.finish_reason is not None:
            assert delta.finish_reason == result.choices[delta.index].finish_reason
    assert texts == [c.text for c in result.choices]
    return result


async def cancel_mid_generation(task: asyncio.Task, world: World, request: int = 1) -> set[str]:
    """Cancel `task` once its `request`-th engine request is decoding; the ids that were running."""
    for _ in range(100_000):
        started = world.requests[request - 1:]
        if started and any(r.request_id in world.running() and r.completion_tokens for r in started):
            break
        await asyncio.sleep(0)
    running = world.running()
    assert running, "no engine request started"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return running


def assert_all_aborted(world: World, running: set[str]) -> None:
    assert world.running() == set()
    assert running <= set(world.aborted())
    assert set(world.aborted()) == {r.request_id for r in world.requests if r.aborted}


# --- the contract -----------------------------------------------------------------------

STRATEGIES = strategy_names()
SCORING = [name for name in STRATEGIES if takes_reward(name)]


def test_every_registered_strategy_has_a_setup():
    assert set(STRATEGIES) <= set(SETUPS), sorted(set(STRATEGIES) - set(SETUPS))
    assert {"none", "best_of_n", "blockwise", "guided", "rewrite", "urial"} <= set(STRATEGIES)


@pytest.mark.parametrize("name", STRATEGIES)
def test_params_defaults_and_setup_validate(name):
    setup = setup_for(name)
    strategy = get_strategy(name)
    defaults = strategy.Params.model_validate({})
    assert defaults.fallback is True and defaults.return_candidates is False
    with pytest.raises(ValidationError):
        strategy.Params.model_validate({"no_such_field": 1})
    world = World()
    params = strategy.check(strategy.Params.model_validate(setup.params), world.ctx)
    assert isinstance(params, strategy.Params)
    assert strategy.sequences(params, world.ctx) >= 1


@pytest.mark.parametrize("name", STRATEGIES)
def test_check_refuses_out_of_range_requests_naming_the_field(name):
    setup = setup_for(name)
    if not setup.refusals:
        assert name in WITHOUT_SERVER_LIMITS, f"{name} needs at least one refusal case"
        return
    world = World(max_candidates=MAX_CANDIDATES)
    strategy = get_strategy(name)
    for params, param in setup.refusals:
        try:
            strategy.check(strategy.Params.model_validate(params), world.ctx)
        except StrategyParamError as exc:
            assert exc.param == param, (params, str(exc))
        else:
            pytest.fail(f"{name} accepted {params} with max_candidates={MAX_CANDIDATES}; "
                        f"expected a refusal of {param!r}")
    assert world.requests == []


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("name", STRATEGIES)
async def test_run_answers_every_choice_and_accounts_for_every_token(name, n):
    setup = setup_for(name)
    world = World(n=n)
    if n > 1 and not setup.multi:
        with pytest.raises(StrategyParamError) as refused:
            checked(name, world, setup.params)
        assert refused.value.param == "n"
        return
    strategy, params = checked(name, world, setup.params)
    result = await strategy.run(world.ctx, params)
    assert_answers(result, world, n)
    assert_usage_matches_engines(result, world)
    setup.info(result, world)


@pytest.mark.parametrize("name", STRATEGIES)
async def test_stream_spells_out_the_result_and_matches_run(name):
    setup = setup_for(name)
    n = 2 if setup.multi else 1
    world = World(n=n)
    strategy, params = checked(name, world, setup.params)
    result = assert_stream(await drain(strategy.stream(world.ctx, params)), n)
    assert_answers(result, world, n)
    assert_usage_matches_engines(result, world)
    setup.info(result, world)
    # A seeded request is reproducible: run() on a fresh engine gives the same answers.
    again = World(n=n)
    rerun = await strategy.run(again.ctx, strategy.check(strategy.Params.model_validate(setup.params), again.ctx))
    assert [c.text for c in rerun.choices] == [c.text for c in result.choices]


@pytest.mark.parametrize("name", STRATEGIES)
async def test_cancelling_run_aborts_every_engine_request(name):
    world = World(max_tokens=400, step_delay=0.0005, ignore_eos=True)
    strategy, params = checked(name, world, setup_for(name).params)
    running = await cancel_mid_generation(asyncio.ensure_future(strategy.run(world.ctx, params)), world)
    assert_all_aborted(world, running)


@pytest.mark.parametrize("name", STRATEGIES)
async def test_cancelling_run_in_its_last_engine_request_aborts_it(name):
    params = setup_for(name).params
    complete = World(max_tokens=24, ignore_eos=True)
    strategy, checked_params = checked(name, complete, params)
    await strategy.run(complete.ctx, checked_params)
    last = len(complete.requests)
    world = World(max_tokens=24, step_delay=0.0005, ignore_eos=True)
    strategy, checked_params = checked(name, world, params)
    running = await cancel_mid_generation(asyncio.ensure_future(strategy.run(world.ctx, checked_params)), world, last)
    assert complete.requests[last - 1].request_id in running
    assert_all_aborted(world, running)
    assert len(world.requests) == last  # nothing started after the cancel


@pytest.mark.parametrize("name", STRATEGIES)
async def test_cancelling_a_stream_consumer_aborts_every_engine_request(name):
    world = World(max_tokens=400, step_delay=0.0005, ignore_eos=True)
    strategy, params = checked(name, world, setup_for(name).params)
    events: list = []

    async def consume():
        async for event in strategy.stream(world.ctx, params):
            events.append(event)

    running = await cancel_mid_generation(asyncio.ensure_future(consume()), world)
    assert_all_aborted(world, running)
    assert not any(isinstance(e, StrategyResult) for e in events)


@pytest.mark.parametrize("name", STRATEGIES)
async def test_closing_a_stream_after_its_first_event_leaves_nothing_running(name):
    world = World(max_tokens=400, step_delay=0.0005, ignore_eos=True)
    strategy, params = checked(name, world, setup_for(name).params)
    stream = strategy.stream(world.ctx, params)
    first = await anext(stream)
    assert isinstance(first, (SequenceDelta, KeepAlive))
    await stream.aclose()
    # Every level closes the stream inside it: the engine's requests end with the close,
    # not a few loop ticks later when asyncio finalizes abandoned generators.
    assert world.running() == set()
    assert set(world.aborted()) == {r.request_id for r in world.requests if r.aborted}


@pytest.mark.parametrize("fallback", [True, False])
@pytest.mark.parametrize("name", SCORING)
async def test_a_failing_reward_falls_back_or_fails_as_asked(name, fallback):
    setup = setup_for(name)
    world = World()
    params = {**(setup.scoring or setup.params), "reward": "broken", "fallback": fallback}
    strategy, params = checked(name, world, params)
    if not fallback:
        with pytest.raises(StrategyUnavailable, match="broken"):
            await strategy.run(world.ctx, params)
        assert world.running() == set()
        return
    result = await strategy.run(world.ctx, params)
    assert_answers(result, world, 1)
    assert_usage_matches_engines(result, world)
    assert "fallback" in result.info, f"no top-level info['fallback'] in {result.info}"
    assert result.info["fallback"]["reward"] == "broken"
    assert "the scorer crashed" in result.info["fallback"]["reason"]


# --- strategy-specific behaviour the contract relies on ----------------------------------


async def test_blockwise_entropy_segmentation_asks_for_logprobs_and_cuts_blocks():
    world = World(max_tokens=24, ignore_eos=True)
    params = {"k": 2, "block_tokens": 8, "min_block_tokens": 1, "segment": "entropy", **REWARD}
    strategy, params = checked("blockwise", world, params)
    result = assert_stream(await drain(strategy.stream(world.ctx, params)), 1)
    blocks = [r for r in world.engine.requests if "-block-" in r.request_id]
    assert all(r.sampling.logprobs == 20 for r in blocks)
    # Some block was cut before block_tokens, at a high-entropy position.
    assert len(blocks) > len(result.choices[0].token_ids) / 8
    assert_usage_matches_engines(result, world)


async def test_blockwise_threshold_retries_when_no_block_clears_it():
    world = World(max_tokens=8)
    params = {"k": 2, "block_tokens": 4, "accept_threshold": 5.0, "max_retries": 1, **REWARD}
    strategy, params = checked("blockwise", world, params)
    result = await strategy.run(world.ctx, params)
    assert all(step["retries"] == 1 for step in result.info["steps"])
    assert any(r.request_id.endswith("-retry1") for r in world.engine.requests)
    assert_usage_matches_engines(result, world)


async def test_guided_refuses_a_prompt_beyond_the_guides_length():
    world = World(max_tokens=4090)
    with pytest.raises(StrategyParamError) as refused:
        checked("guided", world, {"guide": "helpful"})
    assert refused.value.param == "guide"


@pytest.mark.parametrize("stream", [False, True])
async def test_pipeline_runs_prompt_then_decode_then_output_stages(stream):
    world = World()
    stages = [checked("urial", world, {"template": "default"}),
              checked("best_of_n", world, {"n": 2, **REWARD}),
              checked("self_refine", world, {"rounds": 1, **REWARD})]
    assert order_error([s.phase for s, _ in stages]) is None
    pipeline = Pipeline(stages)
    if stream:
        result = assert_stream(await drain(pipeline.stream(world.ctx, PipelineParams())), 1)
    else:
        result = await pipeline.run(world.ctx, PipelineParams())
    assert_answers(result, world, 1)
    assert_usage_matches_engines(result, world)
    assert result.stages[0].stage == "urial"
    assert [s["stage"] for s in result.info["prompt_stages"]] == ["urial"]
    assert result.info["decode_stage"] == "best_of_n" and "self_refine" in result.info
    assert len(result.info["selected"]) == 1
    # Decoding saw the URIAL prefix, in a request of its own.
    decoded = next(r for r in world.engine.requests if r.request_id == f"{REQUEST_ID}-s0-generate")
    assert world.engine.tokenizer.decode(decoded.prompt_ids).startswith("system: ")


async def test_pipeline_without_output_stages_streams_the_decode_stage():
    world = World(max_tokens=12)
    pipeline = Pipeline([checked("rewrite", world, {"rewriter": HELPER}),
                         checked("urial", world, {"template": "default"}),
                         checked("blockwise", world, {"k": 2, "block_tokens": 3, **REWARD})])
    events = await drain(pipeline.stream(world.ctx, PipelineParams()))
    result = assert_stream(events, 1)
    assert sum(isinstance(e, SequenceDelta) and bool(e.text) for e in events) == result.info["blocks"]
    assert_usage_matches_engines(result, world)
    assert [s.stage for s in result.stages[:2]] == ["rewrite", "urial"]
    assert [s["stage"] for s in result.info["prompt_stages"]] == ["rewrite", "urial"]
    assert result.info["decode_stage"] == "blockwise"
    assert all(r.request_id.startswith(f"{REQUEST_ID}-s0-s1-block-") for r in world.engine.requests)


async def test_cancelling_a_pipeline_aborts_its_engine_requests():
    world = World(max_tokens=400, step_delay=0.0005, ignore_eos=True)
    pipeline = Pipeline([checked("urial", world, {"template": "default"}),
                         checked("best_of_n", world, {"n": 3, **REWARD}),
                         checked("correct", world, {"corrector": HELPER, **REWARD})])
    running = await cancel_mid_generation(asyncio.ensure_future(pipeline.run(world.ctx, PipelineParams())), world)
    assert running == {f"{REQUEST_ID}-s0-generate"}
    assert_all_aborted(world, running)


# --- the fake engine itself ------------------------------------------------------------


async def generate(engine: FakeEngine, prompt: list[int], **sampling) -> tuple[list[list[int]], list[str | None]]:
    """Each sample's token ids and finish reason."""
    config = SamplingConfig(**sampling)
    outputs: list[list[int]] = [[] for _ in range(config.n)]
    finish: list[str | None] = [None] * config.n
    async for chunk in engine.generate(f"r{len(engine.calls)}", prompt, config):
        for delta in chunk.sequences:
            outputs[delta.index] += delta.token_ids
            finish[delta.index] = delta.finish_reason or finish[delta.index]
    return outputs, finish


async def test_fake_engine_continues_a_prefix_and_repeats_a_seed():
    engine = FakeEngine(lm=PrefixLM(), max_model_len=4096)
    prompt = engine.tokenizer.encode_chat(MESSAGES)
    (full, other), _ = await generate(engine, prompt, max_tokens=6, n=2, seed=3, ignore_eos=True)
    assert full != other
    (again, _), _ = await generate(engine, prompt, max_tokens=6, n=2, seed=3, ignore_eos=True)
    assert again == full
    (rest,), _ = await generate(engine, prompt + full[:2], max_tokens=4, seed=3, ignore_eos=True)
    assert full[:2] + rest == full
    assert engine.requests[-1].cached_tokens == len(prompt) + 1  # all but the last prompt token
    (greedy_a, greedy_b), _ = await generate(engine, prompt, max_tokens=6, n=2, temperature=0.0, seed=1)
    assert greedy_a == greedy_b


async def test_fake_engine_ends_answers_with_stop_or_length_and_honours_stop_strings():
    engine = FakeEngine(lm=PrefixLM(), max_model_len=4096)
    prompt = engine.tokenizer.encode_chat(MESSAGES)
    outputs, finish = await generate(engine, prompt, max_tokens=8, n=8, seed=0)
    assert set(finish) == {"stop", "length"}
    for out, reason in zip(outputs, finish):
        assert (out[-1] == EOS_ID) == (reason == "stop") and len(out) >= 3
    # The same sample with a stop string: its text ends right before the string's first occurrence.
    index = max(range(len(outputs)), key=lambda i: len(outputs[i]))
    full = engine.tokenizer.decode(outputs[index])
    stop = full.split()[2]
    text, reason = "", None
    async for chunk in engine.generate("s", prompt, SamplingConfig(max_tokens=8, n=index + 1, seed=0, stop=(stop,))):
        for delta in chunk.sequences:
            if delta.index == index:
                text += delta.text
                reason = delta.finish_reason or reason
    assert reason == "stop" and text == full[: full.index(stop)]


async def test_fake_engine_abort_ends_a_running_request():
    engine = FakeEngine(lm=PrefixLM(), max_model_len=4096)
    stream = engine.generate("a", [1, 2, 3], SamplingConfig(max_tokens=100, n=2, ignore_eos=True))
    await anext(stream)
    await engine.abort("a")
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].finished and {d.finish_reason for d in chunks[-1].sequences} == {"abort"}
    assert engine.aborted == ["a"] and engine.running == set() and engine.requests[0].aborted
    stream = engine.generate("b", [1, 2, 3], SamplingConfig(max_tokens=100, ignore_eos=True))
    await anext(stream)
    await stream.aclose()
    assert engine.aborted == ["a", "b"] and engine.running == set()


def test_fake_tokenizer_decodes_what_the_engine_streams():
    engine = FakeEngine(lm=PrefixLM())
    ids = engine.tokenizer.encode("a b c") + [EOS_ID]
    assert engine.tokenizer.decode(ids) == "a b c "


CHOICES = ("alpha", "beta", "gamma")


class EagerReward(Reward):
    """Scores every answer higher than any before it, so every revision and correction is kept."""

    name = "eager"
    kind = "rule"
    description = "later is better"

    def __init__(self):
        self.calls = 0

    def score(self, prompts, responses):
        self.calls += 1
        return [self.calls * 1000.0 + i for i in range(len(responses))]


@pytest.mark.parametrize("name", STRATEGIES)
async def test_a_structured_output_is_honoured_by_every_answer_or_refused(name):
    """The fake engine knows one grammar (a choice of words): every answer a strategy returns
    (revisions and corrections included) obeys it, or the strategy refuses the request."""
    setup = setup_for(name)
    world = World(n=2 if setup.multi else 1)
    world.ctx.sampling = replace(world.ctx.sampling, structured=StructuredOutput(choice=CHOICES))
    strategy = get_strategy(name)
    if conflicts := sampling_conflicts(strategy, world.ctx.sampling):
        assert [param for param, _ in conflicts] == ["response_format"]
        assert "structured" in strategy.refuses
        return
    world.rewards.add(EagerReward())
    _, params = checked(name, world, {**setup.params, **({"reward": "eager"} if takes_reward(name) else {})})
    result = await strategy.run(world.ctx, params)
    assert [c.text.strip() in CHOICES for c in result.choices] == [True] * len(result.choices), result.choices


@pytest.mark.parametrize("name", STRATEGIES)
async def test_logprobs_are_returned_for_every_answer_token_or_refused(name):
    setup = setup_for(name)
    world = World(n=2 if setup.multi else 1)
    world.ctx.sampling = replace(world.ctx.sampling, logprobs=2)
    strategy = get_strategy(name)
    if conflicts := sampling_conflicts(strategy, world.ctx.sampling):
        assert [param for param, _ in conflicts] == ["logprobs"]
        return
    _, params = checked(name, world, setup.params)
    result = await strategy.run(world.ctx, params)
    for choice in result.choices:
        assert choice.logprobs is not None and [lp.token_id for lp in choice.logprobs] == choice.token_ids, choice


# Strategies that join engine requests into one answer: the engine sees a stop string only
# inside one request, so a string across two blocks (or chunks) is theirs to find.
JOINING = {"blockwise": 4, "particle_filter": 4, "beam_search": 4, "speculative_rejection": 3}  # -> block size


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("name", sorted(JOINING))
async def test_a_stop_string_across_a_block_boundary_ends_the_answer(name, include):
    plain_world = World(max_tokens=12, ignore_eos=True)
    strategy, params = checked(name, plain_world, SETUPS[name].params)
    plain = (await strategy.run(plain_world.ctx, params)).choices[0].text
    words = plain.split()
    size = JOINING[name]
    assert len(words) > size + 1
    stop = f"{words[size - 1]} {words[size]}"  # the last word of the first block and the first of the next
    world = World(max_tokens=12, ignore_eos=True)
    world.ctx.sampling = replace(world.ctx.sampling, stop=(stop,), include_stop_str_in_output=include)
    strategy, params = checked(name, world, SETUPS[name].params)
    events = await drain(strategy.stream(world.ctx, params))
    result = assert_stream(events, 1)
    (choice,) = result.choices
    # Every token goes out in some delta, also those whose text waited for the next block.
    assert [t for e in events if isinstance(e, SequenceDelta) for t in e.token_ids] == choice.token_ids
    before = plain[:plain.index(stop)]
    # The first block is the plain run's (the string is not whole in it), and the answer ends there.
    assert choice.text == (before + stop if include else before), (choice.text, stop)
    assert choice.finish_reason == "stop"
    for request in world.engine.requests:  # the engine is still given the strings, for stops within a block
        assert request.sampling.stop == (stop,)
