"""Map a chat request to a strategy and its parameters, and a strategy result to the
response's `alignment` object.

Which strategy runs, by precedence: `alignment.strategy` in the body, then the
`X-Alignment-Strategy` header, then a `<model>@<strategy>` model alias, then the server's
default. Parameters always come from the body's `alignment` object (defaults otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from aligner.profiles import ProfileStore
from aligner.strategies import Strategy, StrategyContext, StrategyParamError, StrategyParams, get_strategy, strategy_names
from aligner.strategies.base import StrategyResult
from aligner.strategies.pipeline import Pipeline, order_error
from aligner.strategies.templates import BUILTIN_TEMPLATES
from server.config import ServerConfig
from server.errors import from_validation_errors, invalid_request, param_name
from server.protocol import ErrorResponse

ALIAS_SEPARATOR = "@"
STRATEGY_HEADER = "X-Alignment-Strategy"


@dataclass
class ResolvedAlignment:
    strategy: Strategy
    params: StrategyParams
    source: str  # body, header, alias or default


def split_model(model: str) -> tuple[str, str | None]:
    """"SmolLM2@best_of_n" -> ("SmolLM2", "best_of_n"); no alias -> (model, None)."""
    base, sep, strategy = model.rpartition(ALIAS_SEPARATOR)
    return (base, strategy) if sep else (model, None)


def model_aliases(config: ServerConfig) -> list[str]:
    return [f"{config.served_model_name}{ALIAS_SEPARATOR}{name}" for name in strategy_names()]


def _unknown(name: str, param: str) -> ErrorResponse:
    return invalid_request(
        f"unknown alignment strategy {name!r}; available: {', '.join(strategy_names())}",
        param,
        "unknown_strategy",
    )


MAX_PIPELINE_STAGES = 6


def resolve_alignment(
    alignment: dict[str, Any] | None,
    header: str | None,
    alias: str | None,
    config: ServerConfig,
    ctx: StrategyContext,
    profiles: ProfileStore | None = None,
) -> ResolvedAlignment | ErrorResponse:
    fields = dict(alignment or {})
    source_suffix = ""
    if "profile" in fields:
        reference = fields.pop("profile")
        if not isinstance(reference, str) or profiles is None:
            return invalid_request("alignment.profile must name a profile", "alignment.profile")
        try:
            profile = profiles.resolve(reference)
        except KeyError as exc:
            return invalid_request(exc.args[0], "alignment.profile", "unknown_profile")
        base = dict(profile.alignment)
        # A request naming a strategy replaces the profile's pipeline, and vice versa.
        if "strategy" in fields:
            base.pop("pipeline", None)
        if "pipeline" in fields:
            base.pop("strategy", None)
        fields = {**base, **fields}
        source_suffix = f":profile {reference}"
    if "pipeline" in fields:
        resolved = _resolve_pipeline(fields, ctx)
        if isinstance(resolved, ResolvedAlignment):
            resolved.source = "body" + source_suffix
        return resolved
    body_strategy = fields.pop("strategy", None)
    if body_strategy is not None and not isinstance(body_strategy, str):
        return invalid_request("alignment.strategy must be a string", "alignment.strategy")
    for name, source, param in (
        (body_strategy, "body", "alignment.strategy"),
        (header, "header", STRATEGY_HEADER),
        (alias, "alias", "model"),
        (config.default_strategy, "default", None),
    ):
        if name:
            break
    strategy = get_strategy(name)
    if strategy is None:
        return _unknown(name, param)
    params = _params(strategy, fields, ctx, ("alignment",))
    if isinstance(params, ErrorResponse):
        return params
    return ResolvedAlignment(strategy, params, source + source_suffix)


def _params(strategy: Strategy, fields: dict, ctx: StrategyContext, loc: tuple) -> StrategyParams | ErrorResponse:
    """Validate a stage's parameters; `loc` is where they sit, e.g. ("alignment", "pipeline", 1)."""
    try:
        params = strategy.Params.model_validate(fields)
    except ValidationError as exc:
        return from_validation_errors([dict(e, loc=(*loc, *e["loc"])) for e in exc.errors()])
    try:
        return strategy.check(params, ctx)
    except StrategyParamError as exc:
        return invalid_request(str(exc), param_name((*loc, *exc.param.split("."))))


def _resolve_pipeline(fields: dict, ctx: StrategyContext) -> ResolvedAlignment | ErrorResponse:
    stages_spec = fields.pop("pipeline")
    if fields.get("strategy") is not None:
        return invalid_request("give either alignment.strategy or alignment.pipeline, not both", "alignment.pipeline")
    if not isinstance(stages_spec, list) or not stages_spec or len(stages_spec) > MAX_PIPELINE_STAGES:
        return invalid_request(f"alignment.pipeline must list 1 to {MAX_PIPELINE_STAGES} stages", "alignment.pipeline")
    top = _params(Pipeline([]), fields, ctx, ("alignment",))
    if isinstance(top, ErrorResponse):
        return top
    stages = []
    for i, spec in enumerate(stages_spec):
        where = f"alignment.pipeline[{i}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("strategy"), str):
            return invalid_request("each stage is an object with a 'strategy'", where)
        spec = dict(spec)
        strategy = get_strategy(spec.pop("strategy"))
        if strategy is None:
            return _unknown(stages_spec[i]["strategy"], f"{where}.strategy")
        # Pipeline-wide switches apply to every stage unless the stage sets its own.
        spec.setdefault("return_candidates", top.return_candidates)
        spec.setdefault("fallback", top.fallback)
        params = _params(strategy, spec, ctx, ("alignment", "pipeline", i))
        if isinstance(params, ErrorResponse):
            return params
        stages.append((strategy, params))
    if problem := order_error([s.kind for s, _ in stages]):
        return invalid_request(problem, "alignment.pipeline", "invalid_pipeline")
    return ResolvedAlignment(Pipeline(stages), top, "body")


def check_profile_alignment(alignment: dict[str, Any], store: ProfileStore) -> str | None:
    """Structural check of a profile's alignment at start (names, parameters, stage order);
    rewards are checked per request, as the set of reward models may differ."""
    stages = alignment.get("pipeline") or [alignment]
    kinds = []
    for i, spec in enumerate(stages):
        if not isinstance(spec, dict):
            return f"stage {i} is not a mapping"
        spec = {k: v for k, v in spec.items() if k not in ("pipeline", "return_candidates", "fallback")}
        name = spec.pop("strategy", None) or "none"
        strategy = get_strategy(name)
        if strategy is None:
            return f"unknown strategy {name!r}"
        try:
            params = strategy.Params.model_validate(spec)
        except ValidationError as exc:
            err = exc.errors()[0]
            return f"{name}: {'.'.join(map(str, err['loc']))}: {err['msg']}"
        template = getattr(params, "template", None)
        if template is not None and template not in store.templates and template not in BUILTIN_TEMPLATES:
            return f"{name}: unknown template {template!r}"
        kinds.append(strategy.kind)
    if "pipeline" in alignment:
        return order_error(kinds)
    return None


def alignment_report(resolved: ResolvedAlignment, result: StrategyResult) -> dict[str, Any]:
    params = resolved.params.model_dump(by_alias=True)
    if isinstance(resolved.strategy, Pipeline):
        params["pipeline"] = resolved.strategy.describe()
    report: dict[str, Any] = {
        "strategy": resolved.strategy.name,
        "source": resolved.source,
        "params": params,
        **result.info,
        "stages": [stage.public() for stage in result.stages],
    }
    if resolved.params.return_candidates and result.candidates:
        report["candidates"] = [c.public() for c in result.candidates]
    return report
