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
