"""A request's `alignment` object, parsed once: its control fields apart from the strategy's
parameters.

    {"profile": "harmless", "trace": true}
    {"experiment": "tone", "deadline_s": 5}
    {"strategy": "best_of_n", "n": 4, "reward": "tiny", "rail": {"model": "harmful-response"}}

Control fields: `trace` (store this answer), `experiment` (the arm it is given, a profile
version, is the whole recipe), `profile`, what runs (`strategy`, `pipeline` or `route`), the
output `rail`, and the request-wide limits `deadline_s` and `max_total_tokens`
(`aligner.budget`). Every other key is a parameter of the strategy, validated by it when the
alignment is resolved (`aligner.alignment`), with `return_candidates` and `fallback` shared
by all. Errors name the request's field ("alignment.trace") as `AlignmentError`s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from aligner.alignment import AlignmentError
from aligner.budget import BudgetParams

RECIPE = ("strategy", "pipeline", "route")
LIMITS = tuple(BudgetParams.model_fields)
CONTROL = ("trace", "experiment", "profile", *RECIPE, "rail", *LIMITS)
# Besides `experiment`, what a request in an experiment may set: limits and reporting switches.
ALLOWED_WITH_EXPERIMENT = frozenset({*LIMITS, "return_candidates", "fallback"})


@dataclass(frozen=True)
class AlignmentSpec:
    trace: bool = False  # the request asked for its answer to be stored
    experiment: str | None = None  # an experiment's name: its arm becomes `profile`
    profile: str | None = None  # "name" (the latest version) or "name@version"
    fields: Mapping[str, Any] = field(default_factory=dict)  # what runs, rail, limits, parameters
    given: bool = False  # the request had an alignment object at all

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> AlignmentSpec:
        """Raises AlignmentError for a control field of the wrong type.

        >>> spec = AlignmentSpec.parse({"profile": "harmless", "trace": True, "n": 2})
        >>> spec.trace, spec.profile, spec.params
        (True, 'harmless', {'n': 2})
        >>> AlignmentSpec.parse({"trace": "yes"})
        Traceback (most recent call last):
        ...
        aligner.alignment.AlignmentError: alignment.trace must be true or false, got 'yes'
        """
        if raw is None:
            return cls()
        rest = dict(raw)
        trace = rest.pop("trace", False)
        if not isinstance(trace, bool):
            raise AlignmentError(f"alignment.trace must be true or false, got {trace!r}", ("alignment", "trace"))
        experiment = rest.pop("experiment", None)
        if "experiment" in raw and not isinstance(experiment, str):
            raise AlignmentError("alignment.experiment must name an experiment", ("alignment", "experiment"))
        profile = rest.pop("profile", None)
        if "profile" in raw and not isinstance(profile, str):
            raise AlignmentError("alignment.profile must name a profile", ("alignment", "profile"))
        return cls(trace, experiment, profile, rest, True)

    @property
    def params(self) -> dict[str, Any]:
        """The strategy's own parameters (every key that is not a control field)."""
        return {k: v for k, v in self.fields.items() if k not in CONTROL}

    def beside_experiment(self) -> str | None:
        """The first field a request in an experiment may not set (its profile, its strategy or
        a parameter: the arm is the whole recipe), or None."""
        if self.experiment is None:
            return None
        if self.profile is not None:
            return "profile"
        return next((k for k in self.fields if k not in ALLOWED_WITH_EXPERIMENT), None)

    def with_arm(self, profile: str) -> AlignmentSpec:
        """The request as its experiment arm runs it: the arm's profile, no experiment left."""
        return replace(self, experiment=None, profile=profile)

    def alignment(self) -> dict[str, Any] | None:
        """The object resolution reads (`aligner.alignment.resolve_alignment`): what runs and
        its parameters, with the profile; None when the request gave none."""
        if not self.given:
            return None
        return {**self.fields, **({"profile": self.profile} if self.profile is not None else {})}
