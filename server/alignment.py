"""The HTTP side of alignment: model aliases, the strategy header, error envelopes for
`aligner.alignment`'s errors, and a strategy result as the response's `alignment` object.

Which strategy runs, by precedence: `alignment.strategy` in the body, then the
`X-Alignment-Strategy` header, then a `<model>@<strategy>` model alias, then the server's
default; `aligner.alignment` holds the rules.
"""

from __future__ import annotations

from typing import Any

from aligner.alignment import AlignmentError, ResolvedAlignment
from aligner.plan import ExperimentArms, Planner, RequestOrigin, ServerCaps, TraceStore
from aligner.profiles import ProfileStore
from aligner.strategies import strategy_names
from aligner.strategies.base import StrategyResult
from server.config import ServerConfig
from server.errors import from_validation_errors, invalid_request, param_name
from server.protocol import ALIAS_SEPARATOR, ErrorResponse, split_model

__all__ = [
    "ALIAS_SEPARATOR",
    "STRATEGY_HEADER",
    "ResolvedAlignment",
    "alignment_error",
    "alignment_report",
    "model_aliases",
    "origin_of",
    "planner_for",
    "split_model",
]

STRATEGY_HEADER = "X-Alignment-Strategy"
# Where a strategy name that did not come from the body sits in the HTTP request.
_ORIGIN_PARAM = {"header": STRATEGY_HEADER, "alias": "model", "default": None}


def model_aliases(config: ServerConfig) -> list[str]:
    return [f"{config.served_model_name}{ALIAS_SEPARATOR}{name}" for name in strategy_names()]


def planner_for(config: ServerConfig, profiles: ProfileStore | None = None, arms: ExperimentArms | None = None,
                traces: TraceStore | None = None) -> Planner:
    """This server's planner (`aligner.plan`): its caps, and the profiles a request keeps."""
    caps = ServerCaps(config.default_strategy, config.max_request_seconds, config.max_request_tokens)
    return Planner(caps, profiles, arms, traces)


def origin_of(endpoint: str, *, user: str | None = None, header: str | None = None, model: str | None = None,
              arrived: float | None = None, tenant: str | None = None, meter=None) -> RequestOrigin:
    """`header`: the X-Alignment-Strategy header; `model`: the request's model, whose
    `@strategy` alias names a strategy; `tenant`: the tenant of the key that sent it; `meter`:
    counts the tokens generated for that key."""
    return RequestOrigin(endpoint, user or None, header, split_model(model)[1] if model else None, arrived, tenant,
                         meter)


def alignment_error(exc: AlignmentError) -> ErrorResponse:
    """An alignment error as a 400: parameter errors like any validation error, a bad
    strategy name from outside the body naming the header or `model` it came from."""
    if exc.errors is not None:
        return from_validation_errors(exc.errors)
    param = param_name(exc.loc) if exc.origin == "body" else _ORIGIN_PARAM[exc.origin]
    return invalid_request(exc.message, param, exc.code)


def alignment_report(resolved: ResolvedAlignment, result: StrategyResult) -> dict[str, Any]:
    report: dict[str, Any] = {
        "strategy": resolved.strategy.name,
        "source": resolved.source,
        "params": resolved.strategy.describe(resolved.params),
        **result.info,
        "stages": [stage.public() for stage in result.stages],
    }
    if resolved.reward_versions:
        report["reward_versions"] = resolved.reward_versions
    if resolved.experiment is not None:
        report["experiment"] = resolved.experiment
    if resolved.params.return_candidates and result.candidates:
        report["candidates"] = [c.public() for c in result.candidates]
    return report
