"""The `alignment` object parsed once: control fields apart, errors naming the request's field."""

from __future__ import annotations

import pytest

from aligner.alignment import AlignmentError
from aligner.spec import AlignmentSpec


def test_control_fields_come_apart_from_the_strategys_parameters():
    raw = {"strategy": "best_of_n", "n": 4, "reward": "tiny", "trace": True, "deadline_s": 5,
           "rail": {"model": "harmful-response"}, "profile": "harmless@2"}
    spec = AlignmentSpec.parse(raw)
    assert (spec.trace, spec.profile, spec.experiment) == (True, "harmless@2", None)
    assert spec.params == {"n": 4, "reward": "tiny"}
    # What resolution reads: everything but the trace switch, the profile kept.
    assert spec.alignment() == {k: v for k, v in raw.items() if k != "trace"}


def test_no_alignment_object_stays_none_and_an_empty_one_stays_empty():
    assert AlignmentSpec.parse(None).alignment() is None
    assert AlignmentSpec.parse({}).alignment() == {}


def test_an_experiments_arm_becomes_the_profile():
    spec = AlignmentSpec.parse({"experiment": "tone", "deadline_s": 3, "return_candidates": True})
    assert spec.beside_experiment() is None
    armed = spec.with_arm("tone@2")
    assert armed.experiment is None and armed.alignment() == {"deadline_s": 3, "return_candidates": True,
                                                              "profile": "tone@2"}


@pytest.mark.parametrize("raw, field", [
    ({"experiment": "tone", "profile": "tone@1"}, "profile"),
    ({"experiment": "tone", "strategy": "none"}, "strategy"),
    ({"experiment": "tone", "n": 2}, "n"),
])
def test_a_recipe_beside_an_experiment_is_named(raw, field):
    assert AlignmentSpec.parse(raw).beside_experiment() == field


@pytest.mark.parametrize("raw, param", [
    ({"trace": "yes"}, "alignment.trace"),
    ({"experiment": 3}, "alignment.experiment"),
    ({"profile": ["harmless"]}, "alignment.profile"),
])
def test_a_control_field_of_the_wrong_type_names_itself(raw, param):
    with pytest.raises(AlignmentError) as info:
        AlignmentSpec.parse(raw)
    assert info.value.param == param


# The planner: an experiment's arm, the trace plan and the resolved strategy in one plan.


class Arms:
    """An `ExperimentArms` that gives every user of experiment "tone" the arm tone@2."""

    async def assign(self, spec, user, experiments, messages=None):
        from aligner.experiments import Assignment

        if spec.experiment is None:
            return spec, None
        if spec.experiment not in experiments:
            raise AlignmentError("unknown experiment", ("alignment", "experiment"), "unknown_experiment")
        return spec.with_arm("tone@2"), Assignment(spec.experiment, "tone@2", "user", user)


class Traces:
    """A `TraceStore` that keeps what it is asked to keep and every experiment's answer."""

    def __init__(self):
        self.calls = []

    def wanted(self, asked, user, experiment):
        self.calls.append((asked, user, experiment))
        return asked or experiment


TONE = """\
profiles:
  tone:
    - version: 1
      alignment: {strategy: none}
    - version: 2
      alignment: {strategy: best_of_n, n: 2, reward: {length_penalty: 1.0}}
experiments:
  tone:
    unit: user
    arms: [{profile: tone@1, weight: 1}, {profile: tone@2, weight: 1}]
"""


def plan(raw, tmp_path, traces=None, arms=None, origin=None):
    import asyncio

    from aligner.alignment import check_profile_alignment
    from aligner.plan import Planner, RequestOrigin, ServerCaps
    from aligner.profiles import ProfileStore
    from tests.unit.aligner.test_profiles import context

    (tmp_path / "profiles.yaml").write_text(TONE)
    profiles = ProfileStore.load(tmp_path / "profiles.yaml", check_profile_alignment)
    planner = Planner(ServerCaps(default_strategy="none", max_request_tokens=500), profiles, arms, traces)
    return asyncio.run(planner.plan(AlignmentSpec.parse(raw), context(profiles), origin or RequestOrigin()))


def test_an_experiment_request_is_planned_on_its_arm_and_traced_with_its_profile_version(tmp_path):
    from aligner.plan import RequestOrigin, TracePlan

    traces = Traces()
    planned = plan({"experiment": "tone"}, tmp_path, traces, Arms(), RequestOrigin("responses", user="ann"))
    assert planned.strategy_name == "best_of_n" and planned.sequences == 2
    assert planned.resolved.experiment == {"name": "tone", "arm": "tone@2", "unit": "user"}
    assert planned.trace == TracePlan("responses", ("tone", "2"))
    assert traces.calls == [(False, "ann", True)]
    assert planned.budget.remaining_tokens() == 500  # the server's cap


def test_an_untraced_plain_request_has_no_trace_plan(tmp_path):
    planned = plan(None, tmp_path, Traces(), Arms())
    assert planned.strategy_name == "none" and planned.trace is None and planned.resolved.experiment is None


def test_a_trace_asked_of_a_server_without_a_store_is_refused(tmp_path):
    with pytest.raises(AlignmentError) as info:
        plan({"trace": True}, tmp_path)
    assert (info.value.param, info.value.code) == ("alignment.trace", "unsupported_value")
    with pytest.raises(AlignmentError) as info:
        plan({"experiment": "colour"}, tmp_path, Traces(), Arms())
    assert info.value.code == "unknown_experiment"
