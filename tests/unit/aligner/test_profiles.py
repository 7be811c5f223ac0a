"""Profiles file and alignment resolution: versions, precedence, and one set of checks that
refuses the same alignment object at load and at request time for the same reason."""

from __future__ import annotations

import asyncio

import pytest

from aligner.alignment import AlignmentError, check_profile_alignment, resolve_alignment
from aligner.profiles import DEFAULT_PROFILES, ProfileError, ProfileStore
from aligner.rewards import RewardRegistry
from aligner.spec import AlignmentSpec
from aligner.strategies import StrategyContext, StrategyLimits
from decoding.engine import SamplingConfig
from server import alignment as server_alignment
from server.config import ServerConfig
from server.protocol import ErrorResponse
from tests.fakes import FakeEngine

TEMPLATES_AND_A_PROFILE = (
    "templates:\n  terse: {system: be brief}\n"
    "profiles:\n  t:\n    - version: 1\n      alignment: {pipeline: [{strategy: urial, template: terse}, {strategy: none}]}\n"
)


def load(tmp_path, text: str) -> ProfileStore:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return ProfileStore.load(path, check_profile_alignment)


def profile_file(alignment: str) -> str:
    return f"profiles:\n  a:\n    - version: 1\n      alignment: {alignment}\n"


def context(store: ProfileStore | None = None) -> StrategyContext:
    return StrategyContext(
        engine=FakeEngine(),
        rewards=RewardRegistry.with_builtins(),
        request_id="r",
        messages=[{"role": "user", "content": "hi"}],
        prompt_ids=[1, 2, 3],
        sampling=SamplingConfig(max_tokens=4),
        limits=StrategyLimits(max_candidates=8),
        templates=store.templates if store else {},
    )


def at_request(alignment, store=None) -> AlignmentError:
    with pytest.raises(AlignmentError) as info:
        resolve_alignment(alignment, None, None, "none", context(store), store)
    return info.value


def envelope(alignment, header=None, alias=None, default="none") -> ErrorResponse:
    config = ServerConfig(served_model_name="m", default_strategy=default)
    store = ProfileStore.load(DEFAULT_PROFILES, check_profile_alignment)
    model = f"m@{alias}" if alias else "m"
    planner = server_alignment.planner_for(config, store)
    origin = server_alignment.origin_of("chat.completions", header=header, model=model)
    with pytest.raises(AlignmentError) as info:  # as serving plans a request
        asyncio.run(planner.plan(AlignmentSpec.parse(alignment), context(store), origin))
    error = server_alignment.alignment_error(info.value)
    assert isinstance(error, ErrorResponse)
    assert error.status_code == 400 and error.error.type == "invalid_request_error"
    return error


# The profiles file.


def test_shipped_profiles_load_and_resolve_latest_and_pinned():
    store = ProfileStore.load(DEFAULT_PROFILES, check_profile_alignment)
    assert {"helpful", "harmless", "concise"} <= set(store.profiles)
    assert store.resolve("helpful").version == max(store.profiles["helpful"])
    assert store.resolve("helpful@1").alignment == {"strategy": "best_of_n", "n": 4}
    assert "concise" in store.templates


@pytest.mark.parametrize("reference", ["nope", "helpful@9", "helpful@x", "helpful@"])
def test_unknown_references_raise_with_a_message(reference):
    store = ProfileStore.load(DEFAULT_PROFILES, check_profile_alignment)
    if reference == "helpful@":
        assert store.resolve(reference).version == max(store.profiles["helpful"])  # empty version: latest
        return
    with pytest.raises(KeyError):
        store.resolve(reference)


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        (profile_file("{strategy: warp}"), 3, "unknown alignment strategy 'warp'"),
        ("profiles:\n  a:\n    - version: 1\n      alignment: {strategy: none}\n    - version: 1\n      alignment: {}\n", 5, "repeats version 1"),
        ("profiles:\n  a:\n    - {version: 0, alignment: {}}\n", 3, "version"),
        ("profiles:\n  a:\n    - version: 1\n      alignment:\n        pipeline: [{strategy: self_refine}, {strategy: none}]\n", 3, "comes after"),
        (profile_file("{strategy: urial, template: nope}"), 3, "unknown template 'nope'; known: default"),
        ("profiles:\n  a: [\n", 3, "not valid YAML"),
        ("templates:\n  t: {examples: []}\nprofiles: {}\n", 2, "system"),
        (profile_file("{profile: b}"), 3, "cannot name another profile"),
        (profile_file("{}"), 3, "a@1: name a 'strategy', a 'pipeline' or a 'route'"),
        (profile_file("{n: 4}"), 3, "a@1: name a 'strategy', a 'pipeline' or a 'route'"),
        (profile_file("{strategy: null, return_candidates: true}"), 3, "a@1: name a 'strategy', a 'pipeline' or a 'route'"),
        (profile_file("{pipeline: [{n: 4}, {strategy: none}]}"), 3, "a@1: alignment.pipeline[0]: each stage is an object with a 'strategy'"),
        (profile_file("{strategy: best_of_n, pipeline: [{strategy: none}]}"), 3, "give either alignment.strategy or alignment.pipeline"),
        (profile_file("{pipeline: [{strategy: none}], n: 4}"), 3, "alignment.n: Extra inputs are not permitted"),
        (profile_file("{pipeline: []}"), 3, "alignment.pipeline must list 1 to 6 stages"),
        (profile_file("{strategy: best_of_n, n: 0}"), 3, "a@1: alignment.n: Input should be greater than or equal to 1"),
    ],
)
def test_malformed_files_name_the_line(tmp_path, text, line, fragment):
    with pytest.raises(ProfileError) as info:
        load(tmp_path, text)
    assert f"p.yaml:{line}:" in str(info.value) and fragment in str(info.value)


def test_profile_templates_are_known_at_load_and_at_request(tmp_path):
    store = load(tmp_path, TEMPLATES_AND_A_PROFILE)
    resolved = resolve_alignment({"profile": "t"}, None, None, "none", context(store), store)
    assert resolved.strategy.describe(resolved.params)["pipeline"][0]["template"] == "terse"
    error = at_request({"strategy": "urial", "template": "nope"}, store=store)
    assert (error.message, error.param) == ("unknown template 'nope'; known: default, terse", "alignment.template")


# Load and request agree: the file check is the request's, less what needs a server.


@pytest.mark.parametrize(
    "yaml_alignment, alignment",
    [
        ("{pipeline: [{n: 4}, {strategy: none}]}", {"pipeline": [{"n": 4}, {"strategy": "none"}]}),
        ("{pipeline: [{strategy: urial}, {strategy: warp}]}", {"pipeline": [{"strategy": "urial"}, {"strategy": "warp"}]}),
        ("{pipeline: [{strategy: none}, {strategy: urial}]}", {"pipeline": [{"strategy": "none"}, {"strategy": "urial"}]}),
        ("{pipeline: [{strategy: urial, template: nope}, {strategy: none}]}",
         {"pipeline": [{"strategy": "urial", "template": "nope"}, {"strategy": "none"}]}),
        ("{strategy: self_refine, rounds: 99}", {"strategy": "self_refine", "rounds": 99}),
        ("{strategy: none, n: 3}", {"strategy": "none", "n": 3}),
    ],
)
def test_load_and_request_refuse_the_same_object_for_the_same_reason(tmp_path, yaml_alignment, alignment):
    with pytest.raises(ProfileError) as info:
        load(tmp_path, profile_file(yaml_alignment))
    reason = at_request(alignment)
    assert str(info.value) == f"{tmp_path / 'p.yaml'}:3: profile a@1: {reason}"


def test_server_dependent_checks_wait_for_the_request(tmp_path):
    # Reward names and the candidate limit depend on the server a profile runs on.
    store = load(tmp_path, profile_file("{strategy: best_of_n, n: 12, reward: no-such-rm}"))
    error = at_request({"profile": "a"}, store=store)
    assert error.param == "alignment.n" and "at most 8" in error.message
    error = at_request({"profile": "a", "n": 4}, store=store)
    assert error.param == "alignment.reward.no-such-rm"
    assert check_profile_alignment({"strategy": "best_of_n", "n": 12, "reward": "no-such-rm"}, store) is None


# Precedence: body > header > alias > default; a profile is part of the body.


@pytest.mark.parametrize(
    "alignment, header, alias, expected",
    [
        (None, None, None, ("none", "default")),
        ({"strategy": None}, None, None, ("none", "default")),
        (None, None, "urial", ("urial", "alias")),
        (None, "rewrite", "urial", ("rewrite", "header")),
        ({"strategy": "best_of_n", "reward": "refusal"}, "rewrite", "urial", ("best_of_n", "body")),
        ({"pipeline": [{"strategy": "urial"}, {"strategy": "none"}]}, "rewrite", "urial", ("pipeline", "body")),
        ({"profile": "helpful@1", "reward": "refusal"}, "rewrite", "urial", ("best_of_n", "body:profile helpful@1")),
        ({"profile": "harmless@2"}, "rewrite", None, ("pipeline", "body:profile harmless@2")),
        # A body strategy replaces the profile's pipeline; a body pipeline its strategy.
        ({"profile": "concise", "strategy": "none"}, None, None, ("none", "body:profile concise")),
        ({"profile": "harmless@1", "strategy": "urial"}, None, None, ("urial", "body:profile harmless@1")),
    ],
)
def test_precedence(alignment, header, alias, expected):
    store = ProfileStore.load(DEFAULT_PROFILES, check_profile_alignment)
    resolved = resolve_alignment(alignment, header, alias, "none", context(store), store)
    assert (resolved.strategy.name, resolved.source) == expected


def test_a_body_pipeline_replaces_a_profiles_strategy_and_keeps_its_switches(tmp_path):
    store = load(tmp_path, profile_file("{strategy: rewrite, return_candidates: true}"))
    resolved = resolve_alignment({"profile": "a", "pipeline": [{"strategy": "none"}]}, None, None, "none", context(store), store)
    assert (resolved.strategy.name, resolved.source) == ("pipeline", "body:profile a")
    assert resolved.strategy.describe(resolved.params)["pipeline"] == [{"strategy": "none", "return_candidates": True, "fallback": True}]
    # The profile's other parameters stay, and must fit the replacement.
    store = ProfileStore.load(DEFAULT_PROFILES, check_profile_alignment)
    error = at_request({"profile": "helpful@1", "pipeline": [{"strategy": "none"}]}, store=store)
    assert str(error) == "alignment.n: Extra inputs are not permitted"


def test_body_fields_override_a_profile_and_pipeline_switches_reach_every_stage():
    store = ProfileStore.load(DEFAULT_PROFILES, check_profile_alignment)
    resolved = resolve_alignment({"profile": "helpful@1", "n": 2, "reward": "refusal"}, None, None, "none", context(store), store)
    assert resolved.params.n == 2
    resolved = resolve_alignment({"profile": "concise", "return_candidates": True}, None, None, "none", context(store), store)
    assert resolved.params.return_candidates
    assert resolved.strategy.describe(resolved.params)["pipeline"][0] == {"strategy": "urial", "template": "concise", "return_candidates": True, "fallback": True}


# The server's envelopes: the same messages, params and codes as the HTTP tests expect.

UNKNOWN = "unknown alignment strategy 'nope'; available: "
PIPELINE, INVALID, ORDER = "alignment.pipeline", "invalid_value", "invalid_pipeline"


@pytest.mark.parametrize(
    "header, alias, default, param",
    [("nope", None, "none", "X-Alignment-Strategy"), (None, "nope", "none", "model"), (None, None, "nope", None)],
)
def test_unknown_strategies_from_outside_the_body_name_where_they_came_from(header, alias, default, param):
    error = envelope(None, header, alias, default).error
    assert error.message.startswith(UNKNOWN) and (error.param, error.code) == (param, "unknown_strategy")


@pytest.mark.parametrize(
    "alignment, message, param, code",
    [
        ({"strategy": "nope"}, UNKNOWN, "alignment.strategy", "unknown_strategy"),
        ({"strategy": 3}, "alignment.strategy must be a string", "alignment.strategy", INVALID),
        ({"profile": "no-such-profile"}, "unknown profile 'no-such-profile'", "alignment.profile", "unknown_profile"),
        ({"profile": "helpful@99"}, "profile 'helpful' has no version '99'", "alignment.profile", "unknown_profile"),
        ({"profile": 3}, "alignment.profile must name a profile", "alignment.profile", INVALID),
        ({"pipeline": []}, "alignment.pipeline must list 1 to 6 stages", PIPELINE, INVALID),
        ({"pipeline": [{"strategy": "none"}] * 7}, "alignment.pipeline must list", PIPELINE, INVALID),
        ({"pipeline": [{"n": 3}]}, "each stage is an object with a 'strategy'", "alignment.pipeline[0]", INVALID),
        ({"pipeline": [{"strategy": "urial"}, {"strategy": "nope"}]}, UNKNOWN, "alignment.pipeline[1].strategy", "unknown_strategy"),
        ({"pipeline": [{"strategy": "urial"}]}, "a pipeline needs exactly one decode stage, this one has 0", PIPELINE, ORDER),
        ({"pipeline": [{"strategy": "self_refine", "reward": "refusal"}, {"strategy": "none"}]},
         "stage 1 ('decode') comes after an 'output' stage", PIPELINE, ORDER),
        ({"pipeline": [{"strategy": "none"}, {"strategy": "best_of_n", "reward": "tiny"}]},
         "a pipeline needs exactly one decode stage, this one has 2", PIPELINE, ORDER),
        ({"strategy": "best_of_n", "pipeline": [{"strategy": "none"}]},
         "give either alignment.strategy or alignment.pipeline, not both", PIPELINE, INVALID),
        ({"pipeline": [{"strategy": "self_refine"}, {"strategy": "none", "n": 1}]},
         "alignment.pipeline[1].n: Extra inputs are not permitted", "alignment.pipeline[1].n", INVALID),
        ({"pipeline": [{"strategy": "none"}, {"strategy": "self_refine", "rounds": 99}]},
         "alignment.pipeline[1].rounds: Input should be less than or equal to 4", "alignment.pipeline[1].rounds", INVALID),
        ({"pipeline": [{"strategy": "urial", "template": "missing"}, {"strategy": "none"}]},
         "unknown template 'missing'; known: concise, default", "alignment.pipeline[0].template", INVALID),
        ({"strategy": "best_of_n", "n": 0, "bogus": 1},
         "alignment.n: Input should be greater than or equal to 1 (and 1 more error)", "alignment.n", INVALID),
        ({"strategy": "best_of_n", "n": 99, "reward": "refusal"}, "n must be at most 8 on this server", "alignment.n", INVALID),
        ({"strategy": "best_of_n", "reward": "nope"}, "unknown reward 'nope'", "alignment.reward.nope", INVALID),
    ],
)
def test_server_envelopes(alignment, message, param, code):
    error = envelope(alignment).error
    assert error.message.startswith(message) and (error.param, error.code) == (param, code)


def test_a_request_reports_the_structural_error_before_server_checks():
    # Stage 0's reward is unknown here and the order is wrong: the order is what load reports too.
    alignment = {"pipeline": [{"strategy": "best_of_n", "n": 2, "reward": "nope"}, {"strategy": "self_refine"}, {"strategy": "none"}]}
    error = envelope(alignment).error
    assert (error.param, error.code) == ("alignment.pipeline", "invalid_pipeline")
    alignment["pipeline"].pop()
    assert envelope(alignment).error.param == "alignment.pipeline[0].reward.nope"
