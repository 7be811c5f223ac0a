"""Resolve an `alignment` object (a request's or a profile's) to a strategy and its parameters.

Which strategy runs, by precedence: `alignment.strategy` (or `alignment.pipeline`) in the
body, then the strategy a request header names, then a `<model>@<strategy>` model alias,
then the server's default. Parameters always come from the `alignment` object (defaults
otherwise). `alignment.route` instead lets a request classifier pick one of two alignments
(`aligner.strategies.route`). `alignment.profile` names a profile, a complete recipe that
the body's own fields override: a body `strategy`, `pipeline` or `route` replaces the
profile's. `deadline_s` and `max_total_tokens` are request-wide limits
(`aligner.budget`), taken out before the strategy's parameters are validated.

One code path serves both a request and the profiles file at start. With a request
context, `resolve_alignment` also runs each strategy's server-dependent check
(`Strategy.check`: reward names, limits, guides, prompt lengths); without one (at load)
everything else still runs: strategy names, parameter validation, pipeline shape and
order, template names. Errors are raised as `AlignmentError`; the server maps them to
HTTP envelopes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from aligner.budget import BudgetParams
from aligner.profiles import ProfileStore
from aligner import rail as output_rail
from aligner.rail import RailParams
from aligner.strategies import (
    Strategy,
    StrategyContext,
    StrategyParamError,
    StrategyParams,
    get_strategy,
    strategy_names,
)
from aligner.strategies.base import sampling_conflicts
from aligner.strategies.pipeline import Pipeline, order_error
from aligner.strategies.route import BRANCHES, Route
from aligner.strategies.templates import BUILTIN_TEMPLATES

MAX_PIPELINE_STAGES = 6
# pydantic's names for union members and validators in an error's `loc`; not fields.
_UNION_MEMBER_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


class AlignmentError(ValueError):
    """Why an alignment object cannot run.

    `loc` is where the problem sits in the request body, e.g. ("alignment", "pipeline", 1, "n").
    `origin` is "body", or where a strategy name came from otherwise: "header", "alias" or
    "default" (`loc` is then empty). `code` is a machine-readable reason, e.g.
    "unknown_strategy". `errors` holds pydantic's error list, each `loc` prefixed with where
    the parameters sit, when parameter validation failed.
    """

    def __init__(
        self,
        message: str,
        loc: tuple = (),
        code: str | None = None,
        *,
        origin: str = "body",
        errors: list[dict[str, Any]] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.loc = tuple(loc)
        self.code = code
        self.origin = origin
        self.errors = errors

    @classmethod
    def from_validation(cls, exc: ValidationError, loc: tuple) -> AlignmentError:
        errors = [dict(e, loc=(*loc, *e["loc"])) for e in exc.errors()]
        first = errors[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        return cls(message, first["loc"], errors=errors)

    @property
    def param(self) -> str | None:
        """The location as a dotted name, e.g. "alignment.pipeline[1].n"."""
        parts: list[str] = []
        for item in self.loc:
            if isinstance(item, int):
                parts.append(f"[{item}]")
            elif item in _UNION_MEMBER_NAMES or "[" in item or item.startswith("function-"):
                continue
            else:
                parts.append(("." if parts else "") + item)
        return "".join(parts) or None

    def __str__(self) -> str:
        param = self.param
        if param is None or self.message.startswith(param):
            return self.message
        return f"{param}: {self.message}"


@dataclass
class ResolvedAlignment:
    strategy: Strategy
    params: StrategyParams
    source: str  # body, header, alias or default; ":profile REF" appended when a profile was used
    # The request's own deadline and token cap (the server caps both); none asked by default.
    limits: BudgetParams = field(default_factory=BudgetParams)
    # {reward name: checkpoint version} the request scores with (set by the server).
    reward_versions: dict[str, str] = field(default_factory=dict)
    # {"name", "arm", "unit"} when the request named an experiment (set by the server).
    experiment: dict[str, str] | None = None
    # `alignment.rail`: the answer's own check (`aligner.rail`), on whatever strategy runs.
    rail: RailParams | None = None

    def run(self, ctx: StrategyContext):
        """The strategy's result, through the rail when there is one (a coroutine)."""
        if self.rail is None:
            return self.strategy.run(ctx, self.params)
        return output_rail.run(self.strategy, self.params, self.rail, ctx)

    def stream(self, ctx: StrategyContext):
        """The strategy's stream, through the rail when there is one."""
        if self.rail is None:
            return self.strategy.stream(ctx, self.params)
        return output_rail.stream(self.strategy, self.params, self.rail, ctx)


def resolve_alignment(
    alignment: Mapping[str, Any] | None,
    header: str | None,
    alias: str | None,
    default_strategy: str | None,
    ctx: StrategyContext | None,
    profiles: ProfileStore | None = None,
    *,
    templates: Mapping[str, Any] | None = None,
) -> ResolvedAlignment:
    """Pick the strategy by precedence and validate its parameters; raises AlignmentError.

    Two passes: the structural one (names, parameters, pipeline shape and order, templates)
    runs whole before the server-dependent `Strategy.check` of each stage, so a request is
    refused for the same reason as a profile at load. `ctx` is the request; None (at load)
    skips the second pass. Template names are checked against `ctx.templates`, or
    `templates` when there is no ctx.
    """
    known_templates = ctx.templates if ctx is not None else templates or {}
    resolved = _parse(alignment, header, alias, default_strategy, profiles, known_templates)
    if ctx is not None:
        _check(resolved, ctx)
    return resolved


def check_profile_alignment(alignment: Mapping[str, Any], store: ProfileStore) -> str | None:
    """A profile's alignment at start, through the request path without a request: why it
    cannot run, or None. Rewards, limits and guides are checked per request, as they depend
    on the server the profile runs on."""
    try:
        resolve_alignment(alignment, None, None, None, None, templates=store.templates)
    except AlignmentError as exc:
        return str(exc)
    return None


def _parse(
    alignment: Mapping[str, Any] | None,
    header: str | None,
    alias: str | None,
    default_strategy: str | None,
    profiles: ProfileStore | None,
    templates: Mapping[str, Any],
) -> ResolvedAlignment:
    fields = dict(alignment or {})
    source_suffix = ""
    if "profile" in fields:
        reference = fields.pop("profile")
        fields = _merge_profile(fields, reference, profiles)
        source_suffix = f":profile {reference}"
    limits = _limits(fields)
    rail = _rail(fields)
    if "route" in fields:
        strategy, params = _parse_route(fields, templates)
        return ResolvedAlignment(strategy, params, "body" + source_suffix, limits, rail=rail)
    if "pipeline" in fields:
        strategy, params = _parse_pipeline(fields, templates)
        return ResolvedAlignment(strategy, params, "body" + source_suffix, limits, rail=rail)
    body_strategy = fields.pop("strategy", None)
    if body_strategy is not None and not isinstance(body_strategy, str):
        raise AlignmentError("alignment.strategy must be a string", ("alignment", "strategy"))
    for name, source, loc in (
        (body_strategy, "body", ("alignment", "strategy")),
        (header, "header", ()),
        (alias, "alias", ()),
        (default_strategy, "default", ()),
    ):
        if name:
            break
    if name is None:
        raise AlignmentError("name a strategy or a pipeline", ("alignment", "strategy"))
    strategy = get_strategy(name)
    if strategy is None:
        raise _unknown(name, loc, source)
    return ResolvedAlignment(strategy, _params(strategy, fields, ("alignment",), templates), source + source_suffix,
                             limits, rail=rail)


def _limits(fields: dict) -> BudgetParams:
    """Take the request-wide limits out of `fields` (they belong to no strategy) and check them."""
    asked = {name: fields.pop(name) for name in BudgetParams.model_fields if name in fields}
    try:
        return BudgetParams.model_validate(asked)
    except ValidationError as exc:
        raise AlignmentError.from_validation(exc, ("alignment",)) from None


def _rail(fields: dict) -> RailParams | None:
    """Take `rail` out of `fields` (it checks whatever strategy runs); null turns a profile's off."""
    spec = fields.pop("rail", None)
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise AlignmentError("alignment.rail must be an object, or null for none", ("alignment", "rail"))
    try:
        return RailParams.model_validate(spec)
    except ValidationError as exc:
        raise AlignmentError.from_validation(exc, ("alignment", "rail")) from None


def _merge_profile(fields: dict, reference: Any, profiles: ProfileStore | None) -> dict:
    if not isinstance(reference, str) or profiles is None:
        raise AlignmentError("alignment.profile must name a profile", ("alignment", "profile"))
    try:
        profile = profiles.resolve(reference)
    except KeyError as exc:
        raise AlignmentError(exc.args[0], ("alignment", "profile"), "unknown_profile") from None
    base = dict(profile.alignment)
    # A request naming a strategy, pipeline or route replaces the profile's own.
    for key in ("strategy", "pipeline", "route"):
        if key in fields:
            for other in {"strategy", "pipeline", "route"} - {key}:
                base.pop(other, None)
    return {**base, **fields}


def _unknown(name: Any, loc: tuple, origin: str = "body") -> AlignmentError:
    return AlignmentError(
        f"unknown alignment strategy {name!r}; available: {', '.join(strategy_names())}",
        loc,
        "unknown_strategy",
        origin=origin,
    )


def _params(strategy: Strategy, fields: dict, loc: tuple, templates: Mapping[str, Any]) -> StrategyParams:
    """Validate a stage's parameters; `loc` is where they sit, e.g. ("alignment", "pipeline", 1)."""
    try:
        params = strategy.Params.model_validate(fields)
    except ValidationError as exc:
        raise AlignmentError.from_validation(exc, loc) from None
    # A `template` parameter names an in-context template: built in, or from the profiles file.
    template = getattr(params, "template", None)
    if isinstance(template, str) and template not in templates and template not in BUILTIN_TEMPLATES:
        known = ", ".join(sorted({**BUILTIN_TEMPLATES, **templates}))
        raise AlignmentError(f"unknown template {template!r}; known: {known}", (*loc, "template"))
    return params


def _parse_pipeline(fields: dict, templates: Mapping[str, Any]) -> tuple[Pipeline, StrategyParams]:
    stages_spec = fields.pop("pipeline")
    loc = ("alignment", "pipeline")
    if fields.get("strategy") is not None:
        raise AlignmentError("give either alignment.strategy or alignment.pipeline, not both", loc)
    if not isinstance(stages_spec, list) or not stages_spec or len(stages_spec) > MAX_PIPELINE_STAGES:
        raise AlignmentError(f"alignment.pipeline must list 1 to {MAX_PIPELINE_STAGES} stages", loc)
    top = _params(Pipeline([]), fields, ("alignment",), templates)
    stages = []
    for i, spec in enumerate(stages_spec):
        where = (*loc, i)
        if not isinstance(spec, dict) or not isinstance(spec.get("strategy"), str):
            raise AlignmentError("each stage is an object with a 'strategy'", where)
        spec = dict(spec)
        name = spec.pop("strategy")
        strategy = get_strategy(name)
        if strategy is None:
            raise _unknown(name, (*where, "strategy"))
        # Pipeline-wide switches apply to every stage unless the stage sets its own.
        spec.setdefault("return_candidates", top.return_candidates)
        spec.setdefault("fallback", top.fallback)
        stages.append((strategy, _params(strategy, spec, where, templates)))
    if problem := order_error([s.phase for s, _ in stages]):
        raise AlignmentError(problem, loc, "invalid_pipeline")
    return Pipeline(stages), top


def _parse_route(fields: dict, templates: Mapping[str, Any]) -> tuple[Route, StrategyParams]:
    spec = fields.pop("route")
    loc = ("alignment", "route")
    if fields.get("strategy") is not None or "pipeline" in fields:
        raise AlignmentError("give alignment.route, alignment.strategy or alignment.pipeline, not two", loc)
    if not isinstance(spec, dict):
        raise AlignmentError("alignment.route must be an object with a classifier and two branches", loc)
    spec = dict(spec)
    branches = {}
    for name in BRANCHES:
        where = (*loc, name)
        branch = spec.pop(name, None)
        if isinstance(branch, dict) and (nested := {"route", "profile", *BudgetParams.model_fields} & set(branch)):
            raise AlignmentError(f"alignment.route.{name} cannot set {', '.join(sorted(nested))}: "
                                 "routes do not nest, and limits apply to the whole request", where)
        if not isinstance(branch, dict) or not (isinstance(branch.get("strategy"), str) or "pipeline" in branch):
            raise AlignmentError(f"alignment.route.{name} must be an alignment with a 'strategy' or a 'pipeline'", where)
        for key in ("return_candidates", "fallback"):
            if key in fields:
                branch.setdefault(key, fields[key])
        try:
            inner = _parse(branch, None, None, None, None, templates)
        except AlignmentError as exc:  # located inside this branch, not at the top
            raise _relocated(exc, where) from None
        branches[name] = (inner.strategy, inner.params)
    route = Route(branches)
    return route, _params(route, {**fields, **spec}, loc, templates)


def _relocated(exc: AlignmentError, where: tuple) -> AlignmentError:
    """`exc`, found by parsing a nested alignment, moved under `where` in the request body."""
    def move(loc: tuple) -> tuple:
        return (*where, *loc[1:]) if loc[:1] == ("alignment",) else loc

    errors = [dict(e, loc=move(tuple(e["loc"]))) for e in exc.errors] if exc.errors is not None else None
    return AlignmentError(exc.message, move(exc.loc), exc.code, origin=exc.origin, errors=errors)


def _check(resolved: ResolvedAlignment, ctx: StrategyContext, loc: tuple = ("alignment",)) -> None:
    """The server-dependent pass, in place: each strategy's `check` may resolve its params."""
    if resolved.rail is not None:
        try:
            resolved.rail = output_rail.check_rail(resolved.rail, ctx)
        except StrategyParamError as exc:
            raise AlignmentError(str(exc), (*loc, *exc.param.split("."))) from None
    resolved.params = _checked(resolved.strategy, resolved.params, loc, ctx)
    if isinstance(resolved.strategy, Pipeline):
        resolved.strategy = Pipeline([
            (strategy, _checked(strategy, params, (*loc, "pipeline", i), ctx))
            for i, (strategy, params) in enumerate(resolved.strategy.stages)
        ])
    elif isinstance(resolved.strategy, Route):
        branches = {}
        for name, (strategy, params) in resolved.strategy.branches.items():
            inner = ResolvedAlignment(strategy, params, resolved.source)
            _check(inner, ctx, (*loc, "route", name))
            branches[name] = (inner.strategy, inner.params)
        resolved.strategy = Route(branches)


def _checked(strategy: Strategy, params: StrategyParams, loc: tuple, ctx: StrategyContext) -> StrategyParams:
    for param, message in sampling_conflicts(strategy, ctx.sampling):
        # The request's own parameter is at fault (or the strategy chosen for it): name it.
        raise AlignmentError(message, (param,), "unsupported_combination")
    try:
        return strategy.check(params, ctx)
    except StrategyParamError as exc:
        raise AlignmentError(str(exc), (*loc, *exc.param.split("."))) from None
