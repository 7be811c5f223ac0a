"""One plan per request: what runs, under which limits, at what admission weight, and how
its answer is kept.

`Planner.plan` turns a request's parsed `alignment` object (`aligner.spec.AlignmentSpec`)
and its context into a `RequestPlan`, once: the experiment arm it is given, the resolved
strategy tree (`aligner.alignment`), the reward versions it scores with, its budget (the
request's limits under the server's caps), what admission weighs it at, and whether and how
its answer is traced. Serving then only admits the plan, runs or streams it and renders the
result. Raises `AlignmentError` (the server turns it into a 400).

The server hands the planner what only it has, behind two small interfaces: `ExperimentArms`
(an experiment's arm for a user, sticky in the store) and `TraceStore` (whether an answer is
kept).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aligner.alignment import AlignmentError, ResolvedAlignment, resolve_alignment
from aligner.budget import Budget
from aligner.experiments import Assignment, Experiment, tenant_unit
from aligner.profiles import ProfileStore
from aligner.rewards import RewardSpecError
from aligner.spec import AlignmentSpec
from aligner.strategies import StrategyContext


@dataclass(frozen=True)
class ServerCaps:
    """What the server decides for every request: the strategy when none is named, and the
    caps on a request's deadline and total tokens (None: no cap)."""

    default_strategy: str | None = None
    max_request_seconds: float | None = None
    max_request_tokens: int | None = None


@dataclass(frozen=True)
class RequestOrigin:
    """Where a request came from, besides its `alignment`: the API (named in its trace), its
    user, the strategy an `X-Alignment-Strategy` header or a `model@strategy` alias names
    (the body wins), when it arrived (monotonic seconds: its deadline starts there), and the
    tenant of the key that sent it (None: the default tenant), who owns its trace and in whom
    its user is one person."""

    endpoint: str = "chat.completions"
    user: str | None = None
    header: str | None = None
    alias: str | None = None
    arrived: float | None = None
    tenant: str | None = None
    meter: Callable[[int], None] | None = None  # counts the tokens generated for the caller's key


@dataclass(frozen=True)
class TracePlan:
    """An answer to be traced: the API it came through, the profile (name, version) it used,
    the tenant that owns it."""

    endpoint: str
    profile: tuple[str | None, str | None]
    tenant: str | None = None


class ExperimentArms(Protocol):
    async def assign(self, spec: AlignmentSpec, user: str | None, experiments: Mapping[str, Experiment],
                     messages: list[dict[str, Any]] | None = None) -> tuple[AlignmentSpec, Assignment | None]:
        """(the request with its experiment's arm as its profile, the assignment); unchanged
        with None when it names no experiment. `messages`: the conversation, which a learned
        router reads. Raises AlignmentError."""
        ...


class TraceStore(Protocol):
    def wanted(self, asked: bool, user: str | None, experiment: bool) -> bool:
        """Whether this answer is kept (`asked`: `alignment.trace`; `experiment`: it is in
        one). Raises AlignmentError where it asked and cannot be."""
        ...


@dataclass
class RequestPlan:
    resolved: ResolvedAlignment  # the strategy tree, its parameters, the rail, versions, experiment arm
    ctx: StrategyContext  # the request, its engines and rewards bound by `budget`
    budget: Budget
    sequences: int  # admission weight: sequences decoded at once
    guide_slots: int  # admission's second budget
    trace: TracePlan | None = None  # how the answer is kept; None: it is not
    meter: Callable[[int], None] | None = None  # counts the tokens generated, for the caller's quota
    tenant: str | None = None  # whose line it waits in for admission

    @property
    def strategy_name(self) -> str:
        return self.resolved.strategy.name

    def run(self):
        """The result (a coroutine), through the rail when there is one."""
        return self.resolved.run(self.ctx)

    def stream(self):
        """The stream of deltas ending with the result, through the rail when there is one."""
        return self.resolved.stream(self.ctx)


@dataclass(frozen=True)
class Planner:
    """This server's side of planning: its caps, its profiles (a reload swaps them: a request
    keeps the planner it started with), its experiments' arms and its trace store (None:
    the server has none)."""

    caps: ServerCaps
    profiles: ProfileStore | None = None
    arms: ExperimentArms | None = None
    traces: TraceStore | None = None

    async def plan(self, spec: AlignmentSpec, ctx: StrategyContext, origin: RequestOrigin) -> RequestPlan:
        assignment = None
        if self.arms is not None and spec.experiment is not None:
            experiments = self.profiles.experiments if self.profiles is not None else {}
            spec, assignment = await self.arms.assign(spec, tenant_unit(origin.tenant, origin.user), experiments,
                                                      ctx.messages)
        trace = self._trace(spec, origin, assignment is not None)
        resolved = resolve_alignment(spec.alignment(), origin.header, origin.alias, self.caps.default_strategy, ctx,
                                     self.profiles)
        resolved.reward_versions = reward_versions(resolved, ctx.rewards)
        resolved.experiment = assignment.public() if assignment else None
        caps = self.caps
        budget = Budget.capped(resolved.limits, caps.max_request_seconds, caps.max_request_tokens,
                               started=origin.arrived)
        ctx = ctx.with_budget(budget)
        strategy, params = resolved.strategy, resolved.params
        return RequestPlan(resolved, ctx, budget, strategy.sequences(params, ctx), strategy.guide_slots(params, ctx),
                           trace, origin.meter, origin.tenant)

    def _trace(self, spec: AlignmentSpec, origin: RequestOrigin, in_experiment: bool) -> TracePlan | None:
        if self.traces is None:
            if spec.trace:
                raise AlignmentError("this server does not store traces", ("alignment", "trace"), "unsupported_value")
            return None
        if not self.traces.wanted(spec.trace, origin.user, in_experiment):
            return None
        return TracePlan(origin.endpoint, profile_of(spec.profile, self.profiles), origin.tenant)


def profile_of(reference: str | None, profiles: ProfileStore | None) -> tuple[str | None, str | None]:
    """(profile name, version) the request used, the version a bare name resolved to."""
    if reference is None or profiles is None:
        return None, None
    try:
        version = profiles.resolve(reference).version
    except KeyError:  # refused when resolved: nothing to trace
        return None, None
    return reference.partition("@")[0], str(version)


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
