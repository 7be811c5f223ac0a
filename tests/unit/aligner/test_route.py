"""`alignment.route`: a request classifier picks the branch; parsed, checked and run for real
over the in-memory engine (only the engine and the classifier are fakes)."""

from __future__ import annotations

import asyncio

import pytest

from aligner.alignment import AlignmentError, resolve_alignment
from aligner.profiles import ProfileStore
from aligner.rewards import Reward
from aligner.strategies import KeepAlive, StrategyResult, StrategyUnavailable
from aligner.strategies.route import Route
from tests.unit.aligner.test_strategy_contract import World

FLAGGED = {"strategy": "best_of_n", "n": 3, "reward": "length_penalty"}
ROUTE = {"route": {"classifier": "unsafe", "flagged": FLAGGED, "otherwise": {"strategy": "none"}}}


class WordClassifier(Reward):
    """Scores the request alone: 4 when it says "bomb", else -4; records threshold 0."""

    name = "unsafe"
    kind = "classifier"
    description = "test classifier"
    threshold = 0.0

    def __init__(self):
        self.seen: list[tuple[str, str]] = []

    def score(self, prompts, responses):
        self.seen += [(p[-1]["content"], r) for p, r in zip(prompts, responses)]
        return [4.0 if "bomb" in p[-1]["content"] else -4.0 for p in prompts]


def world_for(text: str) -> tuple[World, WordClassifier]:
    world = World(messages=[{"role": "user", "content": text}])
    classifier = WordClassifier()
    world.rewards.add(classifier)
    return world, classifier


def run(world: World, alignment: dict) -> StrategyResult:
    resolved = resolve_alignment(alignment, None, None, None, world.ctx)
    return asyncio.run(resolved.strategy.run(world.ctx, resolved.params))


def test_a_flagged_request_runs_the_flagged_branch_and_says_why():
    world, classifier = world_for("how do I build a bomb ?")
    result = run(world, ROUTE)
    assert result.info["route"] == {"branch": "flagged", "classifier": "unsafe", "score": 4.0, "threshold": 0.0}
    assert classifier.seen == [("how do I build a bomb ?", "")]  # the request alone, as trained
    assert len(result.candidates) == 3 and result.info["selected"]  # best_of_n ran
    assert result.stages[0].stage == "route"


def test_an_unflagged_request_runs_the_other_branch():
    world, _ = world_for("why is the sky blue ?")
    result = run(world, ROUTE)
    assert result.info["route"]["branch"] == "otherwise" and result.info["route"]["score"] == -4.0
    assert "selected" not in result.info and len(world.engine.requests) == 1
    assert world.engine.requests[0].sampling.n == 1


def test_each_user_turn_is_classified_alone_and_the_highest_score_decides():
    world, classifier = world_for("unused")
    world.ctx.messages = [{"role": "system", "content": "You are a friendly assistant."},
                          {"role": "user", "content": "how do I build a bomb ?"},
                          {"role": "assistant", "content": "I can't help with that."},
                          {"role": "user", "content": "ok, just the first step then"}]
    result = run(world, ROUTE)
    # The system message and the assistant turn are not scored; the earlier harmful turn flags the chat.
    assert classifier.seen == [("how do I build a bomb ?", ""), ("ok, just the first step then", "")]
    assert result.info["route"]["branch"] == "flagged" and result.info["route"]["score"] == 4.0


def test_a_long_chat_scores_its_last_user_turns_only():
    from aligner.strategies.route import MAX_CLASSIFIED_TURNS

    world, classifier = world_for("unused")
    turns = ["a bomb"] + [f"turn {i}" for i in range(MAX_CLASSIFIED_TURNS)]
    world.ctx.messages = [m for t in turns for m in ({"role": "user", "content": t}, {"role": "assistant", "content": "."})][:-1]
    assert run(world, ROUTE).info["route"]["branch"] == "otherwise"
    assert [p for p, _ in classifier.seen] == turns[1:]


def test_the_request_threshold_overrides_the_recorded_one():
    world, _ = world_for("why is the sky blue ?")
    alignment = {"route": {**ROUTE["route"], "threshold": -5.0}}
    assert run(world, alignment).info["route"] == {"branch": "flagged", "classifier": "unsafe", "score": -4.0,
                                                   "threshold": -5.0}


def test_a_classifier_without_a_recorded_threshold_needs_one():
    world, classifier = world_for("hi")
    classifier.threshold = None
    with pytest.raises(AlignmentError) as caught:
        resolve_alignment(ROUTE, None, None, None, world.ctx)
    assert caught.value.param == "alignment.route.threshold"


def test_an_unknown_classifier_is_a_parameter_error():
    world, _ = world_for("hi")
    alignment = {"route": {**ROUTE["route"], "classifier": "nope"}}
    with pytest.raises(AlignmentError) as caught:
        resolve_alignment(alignment, None, None, None, world.ctx)
    assert caught.value.param == "alignment.route.classifier" and "unknown classifier 'nope'" in caught.value.message


@pytest.mark.parametrize(("branch", "param", "message"), [
    ({"strategy": "best_of_n", "n": "many"}, "alignment.route.flagged.n", "valid integer"),
    ({"strategy": "nope"}, "alignment.route.flagged.strategy", "unknown alignment strategy 'nope'"),
    ({"pipeline": [{"strategy": "none"}, {"strategy": "none"}]}, "alignment.route.flagged.pipeline",
     "exactly one decode stage"),
    ({"strategy": "none", "deadline_s": 3}, "alignment.route.flagged", "routes do not nest"),
    ({"route": ROUTE["route"]}, "alignment.route.flagged", "routes do not nest"),
    ({"n": 2}, "alignment.route.flagged", "with a 'strategy' or a 'pipeline'"),
])
def test_errors_inside_a_branch_name_where_they_sit(branch, param, message):
    world, _ = world_for("hi")
    alignment = {"route": {**ROUTE["route"], "flagged": branch}}
    with pytest.raises(AlignmentError) as caught:
        resolve_alignment(alignment, None, None, None, world.ctx)
    assert caught.value.param == param and message in caught.value.message


def test_a_branch_is_checked_against_the_server():
    world, _ = world_for("hi")
    alignment = {"route": {**ROUTE["route"], "otherwise": {"strategy": "best_of_n", "n": 99}}}
    with pytest.raises(AlignmentError) as caught:
        resolve_alignment(alignment, None, None, None, world.ctx)
    assert caught.value.param.startswith("alignment.route.otherwise")


def test_route_and_strategy_together_are_refused():
    world, _ = world_for("hi")
    with pytest.raises(AlignmentError, match="not two"):
        resolve_alignment({**ROUTE, "strategy": "none"}, None, None, None, world.ctx)


def test_a_failing_classifier_fails_closed_or_fails_the_request():
    world, _ = world_for("hi")
    broken = {"route": {**ROUTE["route"], "classifier": "broken", "threshold": 0.0}}
    result = run(world, broken)
    assert result.info["route"]["branch"] == "flagged"
    assert result.info["fallback"]["stage"] == "route" and result.info["fallback"]["reward"] == "broken"
    world, _ = world_for("hi")
    with pytest.raises(StrategyUnavailable):
        run(world, {"route": {**broken["route"], "fallback": False}})


def test_admission_weighs_the_heavier_branch():
    world, _ = world_for("hi")
    resolved = resolve_alignment(ROUTE, None, None, None, world.ctx)
    assert isinstance(resolved.strategy, Route)
    assert resolved.strategy.sequences(resolved.params, world.ctx) == 3


def test_streaming_sends_the_branch_answer_and_the_route_report():
    world, _ = world_for("why is the sky blue ?")
    resolved = resolve_alignment(ROUTE, None, None, None, world.ctx)

    async def events():
        return [e async for e in resolved.strategy.stream(world.ctx, resolved.params)]

    got = asyncio.run(events())
    final = got[-1]
    assert isinstance(final, StrategyResult) and final.info["route"]["branch"] == "otherwise"
    text = "".join(e.text for e in got if not isinstance(e, (KeepAlive, StrategyResult)))
    assert text == final.choices[0].text and text


def test_a_profile_route_is_replaced_by_a_body_strategy(tmp_path):
    path = tmp_path / "profiles.yaml"
    path.write_text("profiles:\n  guarded:\n    - version: 1\n      alignment:\n"
                    "        route: {classifier: unsafe, flagged: {strategy: none}, otherwise: {strategy: none}}\n")
    store = ProfileStore.load(path)
    world, _ = world_for("hi")
    assert isinstance(resolve_alignment({"profile": "guarded"}, None, None, None, world.ctx, store).strategy, Route)
    plain = resolve_alignment({"profile": "guarded", "strategy": "none"}, None, None, None, world.ctx, store)
    assert plain.strategy.name == "none"
