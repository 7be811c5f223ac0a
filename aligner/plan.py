"""One plan per request: what runs, under which limits, at what admission weight.

`plan_request` turns a request's `alignment` object and its context into a `RequestPlan`,
once: the resolved strategy tree (`aligner.alignment`), the reward versions it scores with,
the experiment arm it was given, its budget (the request's limits under the server's caps)
and what admission weighs it at. Serving then only admits the plan, runs or streams it and
renders the result. Raises `AlignmentError` (the server turns it into a 400).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aligner.alignment import ResolvedAlignment, resolve_alignment
from aligner.budget import Budget
from aligner.profiles import ProfileStore
from aligner.rewards import RewardSpecError
from aligner.strategies import StrategyContext


@dataclass(frozen=True)
class ServerCaps:
    """What the server decides for every request: the strategy when none is named, and the
    caps on a request's deadline and total tokens (None: no cap)."""

    default_strategy: str | None = None
    max_request_seconds: float | None = None
    max_request_tokens: int | None = None


@dataclass
class RequestPlan:
    resolved: ResolvedAlignment  # the strategy tree, its parameters, the rail, versions, experiment arm
    ctx: StrategyContext  # the request, its engines and rewards bound by `budget`
    budget: Budget
    sequences: int  # admission weight: sequences decoded at once
    guide_slots: int  # admission's second budget

    @property
    def strategy_name(self) -> str:
        return self.resolved.strategy.name

    def run(self):
        """The result (a coroutine), through the rail when there is one."""
        return self.resolved.run(self.ctx)

    def stream(self):
        """The stream of deltas ending with the result, through the rail when there is one."""
        return self.resolved.stream(self.ctx)


def plan_request(
    alignment: Mapping[str, Any] | None,
    ctx: StrategyContext,
    caps: ServerCaps,
    *,
    header: str | None = None,
    alias: str | None = None,
    profiles: ProfileStore | None = None,
    experiment: dict[str, str] | None = None,
    arrived: float | None = None,
) -> RequestPlan:
    """`alignment` with the strategy a header or model alias names (the body wins), resolved
    and checked against this request; `experiment` is the arm the request was assigned (its
    profile already in `alignment`); `arrived` starts the deadline (monotonic seconds)."""
    resolved = resolve_alignment(alignment, header, alias, caps.default_strategy, ctx, profiles)
    resolved.reward_versions = reward_versions(resolved, ctx.rewards)
    resolved.experiment = experiment
    budget = Budget.capped(resolved.limits, caps.max_request_seconds, caps.max_request_tokens, started=arrived)
    ctx = ctx.with_budget(budget)
    strategy, params = resolved.strategy, resolved.params
    return RequestPlan(resolved, ctx, budget, strategy.sequences(params, ctx), strategy.guide_slots(params, ctx))


def reward_versions(resolved: ResolvedAlignment, rewards) -> dict[str, str]:
    """{name: checkpoint version} of the reward models this request scores with (the default
    when it names none), so that an answer says which version of a reloaded model judged it."""
    if "reward" not in type(resolved.params).model_fields:
        return {}
    try:
        names = rewards.resolve(resolved.params.reward)
    except RewardSpecError:
        return {}
    return rewards.versions(names)
