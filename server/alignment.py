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

from aligner.strategies import Strategy, StrategyContext, StrategyParamError, StrategyParams, get_strategy, strategy_names
from aligner.strategies.base import StrategyResult
from server.config import ServerConfig
from server.errors import from_validation_errors, invalid_request
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


def resolve_alignment(
    alignment: dict[str, Any] | None,
    header: str | None,
    alias: str | None,
    config: ServerConfig,
    ctx: StrategyContext,
) -> ResolvedAlignment | ErrorResponse:
    fields = dict(alignment or {})
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
    try:
        params = strategy.Params.model_validate(fields)
    except ValidationError as exc:
        errors = [dict(e, loc=("alignment", *e["loc"])) for e in exc.errors()]
        return from_validation_errors(errors)
    try:
        params = strategy.check(params, ctx)
    except StrategyParamError as exc:
        return invalid_request(str(exc), f"alignment.{exc.param}")
    return ResolvedAlignment(strategy, params, source)


def alignment_report(resolved: ResolvedAlignment, result: StrategyResult) -> dict[str, Any]:
    params = resolved.params.model_dump(by_alias=True)
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
