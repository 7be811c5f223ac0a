"""A/B experiments in serving: the arm of a request that names `alignment.experiment`, and
`GET /v1/alignment/experiments[/{name}]` (`aligner.experiments` holds the rules and the report).

A request's arm is a hash of (experiment, user) onto the weights, so it is sticky with or
without a store and the same on every replica. With a store, the user's first arm is also kept
(`Store.assign_arm`), so the user stays on it when the weights change later; that look-up is
bounded by `StoreConfig.assignment_timeout_s` and, if the store is slow or down, the hashed arm
is used (counted as a store `request_failed`): a store never costs an answer. Without a `user`,
or in a `unit: random` experiment, the arm is drawn at random by the weights. In a `unit: router`
experiment a learned router (`aligner.bandit`, from the models directory; a reload swaps it)
picks each request's arm from its conversation, with at least `explore` spread evenly; the
answer and its trace carry the choice's probability (`alignment.experiment.propensity`).

An experiment's arm is the whole recipe: a request naming one may add only request-wide
switches (`aligner.spec.ALLOWED_WITH_EXPERIMENT`); `profile`, `strategy`, `pipeline` or any strategy parameter
beside it is a 400 naming the field. Its trace is stored whenever the server has a store
(`--store URL` is enough), since the report counts traces.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import numpy as np

from aligner.alignment import AlignmentError
from aligner.bandit import BanditRouter, features
from aligner.experiments import Assignment, Experiment, ExperimentReports, assign
from aligner.spec import ALLOWED_WITH_EXPERIMENT, AlignmentSpec
from aligner.store import Store
from server.errors import invalid_request, make_error
from server.metrics import ServerMetrics
from server.protocol import ErrorResponse
from server.serving_store import ServingStore

logger = logging.getLogger(__name__)

NO_STORE = ("this server keeps no store, and an experiment's report is counted from the traces in it: start "
            "the server with --store URL (experiment requests are then traced)")


class ServingExperiments:
    def __init__(self, store: ServingStore, metrics: ServerMetrics, rng: random.Random | None = None):
        self.store, self.metrics = store, metrics
        self.rng = rng or random.Random()  # draws for requests without a user
        self.routers: Mapping[str, BanditRouter] = {}  # `unit: router`: set at start, swapped by a reload
        self._warned: set[tuple[str, str]] = set()  # (experiment, router) pairs whose arms differ, logged once
        self.reports = ExperimentReports()  # kept up to date: each reads only new rows

    async def assign(self, spec: AlignmentSpec, user: str | None, experiments: Mapping[str, Experiment],
                     messages: list[dict[str, Any]] | None = None) -> tuple[AlignmentSpec, Assignment | None]:
        """(the request with its experiment's arm as its profile, the assignment), unchanged
        with None when it names no experiment (`aligner.plan.ExperimentArms`). Raises
        AlignmentError (a 400) for an unknown experiment or a field that cannot go with one."""
        if spec.experiment is None:
            return spec, None
        loc = ("alignment", "experiment")
        experiment = experiments.get(spec.experiment)
        if experiment is None:
            known = ", ".join(sorted(experiments)) or "none"
            raise AlignmentError(f"unknown experiment {spec.experiment!r}; available: {known}", loc,
                                 "unknown_experiment")
        if (key := spec.beside_experiment()) is not None:
            raise AlignmentError(
                f"alignment.{key} cannot go with an experiment: its arm (a profile version) is the whole "
                f"recipe; besides alignment.experiment only {', '.join(sorted(ALLOWED_WITH_EXPERIMENT))} "
                "may be set", ("alignment", key), "unsupported_combination")
        if experiment.unit == "router":
            chosen = self._routed(experiment, messages or [])
        else:
            chosen = await self._sticky(experiment, assign(experiment, user, self.rng))
        self.metrics.experiment_assignments.labels(experiment.name, chosen.arm, chosen.unit).inc()
        return spec.with_arm(chosen.arm), chosen

    def _routed(self, experiment: Experiment, messages: list[dict[str, Any]]) -> Assignment:
        """The arm the experiment's router picks for this conversation, with its probability;
        by the weights (the first data's logging policy) while the router is not trained, or
        when it was trained on other arms (logged as a warning)."""
        router = self.routers.get(experiment.router or "")
        if router is not None and sorted(router.arms) != sorted(experiment.arm_names):
            if (experiment.name, router.ref) not in self._warned:
                self._warned.add((experiment.name, router.ref))
                logger.warning("experiment %s: router %s was trained on arms %s, the experiment has %s; "
                               "choosing by the weights until it is retrained", experiment.name, router.ref,
                               router.arms, experiment.arm_names)
            router = None
        if router is None:
            return assign(experiment, None, self.rng)
        choice = router.choose(features(messages), np.random.default_rng(self.rng.getrandbits(64)), experiment.explore)
        return Assignment(experiment.name, choice.arm, "router", propensity=choice.propensity, router=router.ref)

    async def _sticky(self, experiment: Experiment, hashed: Assignment) -> Assignment:
        """With a store, the user's first arm (the hashed one is stored if there is none yet)."""
        if hashed.unit != "user" or self.store.store is None:
            return hashed
        stored = await self.store.run("assign an experiment arm",
                                      lambda store: store.assign_arm(experiment.name, hashed.user, lambda: hashed.arm),
                                      timeout_s=self.store.config.assignment_timeout_s)
        if isinstance(stored, ErrorResponse) or stored == hashed.arm:
            return hashed
        if stored not in experiment.arm_names:  # an arm since removed from the file
            return hashed
        return Assignment(hashed.experiment, stored, "user", hashed.user)

    @staticmethod
    def describe(experiments: Mapping[str, Experiment]) -> dict[str, Any]:
        return {"object": "list", "data": [e.public() for _, e in sorted(experiments.items())]}

    async def report(self, name: str, since: str | None,
                     experiments: Mapping[str, Experiment]) -> dict[str, Any] | ErrorResponse:
        """The experiment's report from the store, over the traces created at `since` or later
        (epoch seconds or an ISO 8601 date or time, UTC unless it says). An experiment gone
        from the file still reports, on the arms its traces name."""
        if self.store.store is None:
            return make_error(NO_STORE, 404, code="store_not_configured")
        start = parse_since(since)
        if isinstance(start, ErrorResponse):
            return start
        experiment = experiments.get(name)

        def count(store: Store) -> dict[str, Any]:
            # What is written: no wait on the writer (under steady traffic it is never empty, and
            # a wait per report would hold a store thread); queued traces count in the next one.
            return self.reports.report(store, name, experiment, start)

        report = await self.store.run("count an experiment", count)
        if isinstance(report, ErrorResponse):
            return report
        if experiment is None and report["requests"] == 0:
            known = ", ".join(sorted(experiments)) or "none"
            return make_error(f"no experiment {name!r} in the profiles file nor in the store; configured: {known}",
                              404, param="name", code="unknown_experiment")
        return report


def parse_since(since: str | None) -> float | None | ErrorResponse:
    """Epoch seconds from a query value: a number, or an ISO 8601 date or time (UTC unless it
    names its zone).

    >>> parse_since("1750000000.5"), parse_since("2025-06-01"), parse_since(None)
    (1750000000.5, 1748736000.0, None)
    """
    if since is None:
        return None
    try:
        value = float(since)
    except ValueError:
        pass
    else:
        if math.isfinite(value):
            return value
        return invalid_request(f"since must be a finite number of seconds, got {since!r}", "since")
    try:
        when = datetime.fromisoformat(since)
    except ValueError:
        return invalid_request(f"since must be epoch seconds or an ISO 8601 date or time, got {since!r}", "since")
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
