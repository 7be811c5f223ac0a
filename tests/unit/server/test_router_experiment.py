"""A `unit: router` experiment in serving (`server.serving_experiments`): by the weights until its
router is trained, then by the router, with each choice's probability; a router trained on
other arms is not used."""

from __future__ import annotations

import random

from aligner.bandit import fit
from aligner.experiments import Experiment
from aligner.spec import AlignmentSpec
from server.serving_experiments import ServingExperiments
from tests.unit.aligner.test_bandit import CODE, convo, simulated_logs


class _Store:
    store = None


class _Metrics:
    class _Counter:
        def labels(self, *args):
            return self

        def inc(self):
            pass

    experiment_assignments = _Counter()


async def test_serving_routes_by_the_router_once_trained_and_by_the_weights_before():
    experiment = Experiment(name="pick", unit="router", router="picker", explore=0.1,
                            arms=[{"profile": "a@1", "weight": 1}, {"profile": "b@1", "weight": 3}])
    serving = ServingExperiments(_Store(), _Metrics(), rng=random.Random(0))
    spec = AlignmentSpec.parse({"experiment": "pick"})
    _, before = await serving.assign(spec, "alice", {"pick": experiment}, convo("Write a Python function"))
    assert before.unit == "router" and before.router is None
    assert before.propensity == {"a@1": 0.25, "b@1": 0.75}[before.arm]
    serving.routers = {"picker": fit(simulated_logs(400), ["a@1", "b@1"], name="picker")}
    chosen = [await serving.assign(spec, "alice", {"pick": experiment}, convo(text)) for text in CODE * 5]
    assert sum(a.arm == "a@1" for _, a in chosen) >= 24
    assert all(a.router == "picker" and 0.05 - 1e-9 <= a.propensity <= 0.95 + 1e-9 for _, a in chosen)
    assert max(a.propensity for _, a in chosen if a.arm == "a@1") > 0.8
    assert {s.profile for s, _ in chosen} <= {"a@1", "b@1"}
    # A router trained on other arms is not used.
    serving.routers = {"picker": fit(simulated_logs(50), ["a@1", "c@1"], name="picker")}
    _, fallback = await serving.assign(spec, None, {"pick": experiment}, convo("hi"))
    assert fallback.router is None and fallback.propensity in (0.25, 0.75)
