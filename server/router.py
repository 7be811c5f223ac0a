"""HTTP routes: map a request to a serving call and its result to a response.

Beyond that mapping, only what every route shares lives here: cancelling a call when its
client disconnects, counting responses by status, and the health and readiness probes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from aligner.rewards.base import checkpoint_version
from aligner.strategies import describe_strategies
from server.alignment import STRATEGY_HEADER, model_aliases
from server.errors import engine_unavailable, make_error
from server.middleware import meter_of, principal_of
from server.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse, ModelCard, ModelList, ScoreRequest
from server.protocol_responses import ResponsesRequest
from server.protocol_store import FeedbackRequest
from server.reload import ReloadError
from server.serving_score import score_responses

logger = logging.getLogger(__name__)
router = APIRouter()


async def _wait_for_disconnect(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


async def run_cancelling_on_disconnect(raw: Request, coro):
    """Run a serving call; if the client goes away first, cancel it (which aborts the engine
    request) and return None."""
    handler = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_for_disconnect(raw))
    try:
        await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if handler.done():
        return handler.result()
    handler.cancel()
    await asyncio.gather(handler, return_exceptions=True)
    return None


def to_response(raw: Request, endpoint: str, result) -> Response:
    metrics = raw.app.state.metrics
    if result is None:  # client disconnected; nobody reads this
        metrics.requests.labels(endpoint, "499").inc()
        return Response(status_code=499)
    if isinstance(result, ErrorResponse):
        metrics.requests.labels(endpoint, str(result.status_code)).inc()
        metrics.errors.labels(result.error.type).inc()
        return JSONResponse(result.model_dump(), status_code=result.status_code, headers=result.headers or None)
    metrics.requests.labels(endpoint, "200").inc()
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream")
    return JSONResponse(result if isinstance(result, dict) else result.model_dump())


@router.post("/v1/chat/completions")
async def create_chat_completion(request: ChatCompletionRequest, raw: Request):
    serving = raw.app.state.chat
    header = raw.headers.get(STRATEGY_HEADER)
    tenant = principal_of(raw.scope).tenant
    result = await run_cancelling_on_disconnect(
        raw, serving.create_chat_completion(request, header, tenant=tenant, meter=meter_of(raw.scope)))
    return to_response(raw, "chat_completions", result)


@router.post("/v1/responses")
async def create_response(request: ResponsesRequest, raw: Request):
    serving = raw.app.state.responses
    header = raw.headers.get(STRATEGY_HEADER)
    tenant = principal_of(raw.scope).tenant
    result = await run_cancelling_on_disconnect(
        raw, serving.create_response(request, header, tenant=tenant, meter=meter_of(raw.scope)))
    return to_response(raw, "responses", result)


@router.post("/v1/completions")
async def create_completion(request: CompletionRequest, raw: Request):
    serving = raw.app.state.completion
    result = await run_cancelling_on_disconnect(
        raw, serving.create_completion(request, meter_of(raw.scope), principal_of(raw.scope).tenant))
    return to_response(raw, "completions", result)


@router.get("/v1/models")
async def list_models(raw: Request):
    engine, config = raw.app.state.engine, raw.app.state.config
    names = [config.served_model_name, *model_aliases(config)]
    cards = [ModelCard(id=name, max_model_len=engine.max_model_len) for name in names]
    return JSONResponse(ModelList(data=cards).model_dump())


@router.get("/v1/alignment/strategies")
async def list_strategies(raw: Request):
    config = raw.app.state.config
    return JSONResponse({"object": "list", "default": config.default_strategy, "data": describe_strategies()})


@router.post("/v1/alignment/score")
async def score(request: ScoreRequest, raw: Request):
    state = raw.app.state
    result = await run_cancelling_on_disconnect(
        raw, score_responses(request, state.rewards, state.config, state.admission, state.metrics,
                             principal_of(raw.scope).tenant))
    return to_response(raw, "score", result)


@router.post("/v1/alignment/reload")
async def reload(raw: Request):
    """Re-read the models directory, the reward models and the profiles file, as SIGHUP does:
    what changed swaps in; a bad file changes nothing and is the error (422)."""
    reloader = raw.app.state.reloader
    if reloader is None:
        return to_response(raw, "reload", make_error("this server has nothing to reload", 404))
    try:
        return to_response(raw, "reload", {"object": "reload", **await reloader.reload()})
    except ReloadError as exc:
        logger.error("reload failed, nothing changed: %s", exc)  # the detail: paths, lines, exception text
        return to_response(raw, "reload", make_error(
            f"reload failed, nothing changed: {exc.public} (the server log has the detail)", 422, code="reload_failed"))


@router.get("/v1/alignment/profiles")
async def list_profiles(raw: Request):
    profiles = raw.app.state.profiles
    # The file's name, not its path: where the server's files live is the operator's business.
    source = Path(profiles.source).name if profiles.source else profiles.source
    return JSONResponse({"object": "list", "source": source, "data": profiles.describe()})


@router.get("/v1/alignment/experiments")
async def list_experiments(raw: Request):
    return JSONResponse(raw.app.state.chat.experiments.describe(raw.app.state.profiles.experiments))


@router.get("/v1/alignment/experiments/{name}")
async def experiment_report(name: str, raw: Request, since: str | None = None):
    experiments = raw.app.state.chat.experiments
    return to_response(raw, "experiments", await experiments.report(name, since, raw.app.state.profiles.experiments))


@router.get("/v1/alignment/rewards")
async def list_rewards(raw: Request):
    guides = raw.app.state.guides
    listed = [describe_guide(n, spec) for n, spec in (guides.specs.items() if guides else ())]
    return JSONResponse({"object": "list", "data": raw.app.state.rewards.describe() + listed})


def describe_guide(name: str, spec: dict) -> dict:
    """A guide's listing row; like a reward model's, its checkpoint folder's name and
    fingerprint (not its path: the listing is public, the layout is not), so that a client
    can tell a guide's checkpoint from its own judge's."""
    path = Path(spec["path"])
    row = {"name": name, "kind": "guide", "mode": spec["mode"], "checkpoint": path.name}
    return {**row, "version": checkpoint_version(path)} if path.is_dir() else row


@router.get("/v1/alignment/traces/{trace_id}")
async def get_trace(trace_id: str, raw: Request):
    return to_response(raw, "traces", await raw.app.state.serving_store.get_trace(trace_id, principal_of(raw.scope)))


@router.delete("/v1/alignment/traces/{trace_id}")
async def delete_trace(trace_id: str, raw: Request):
    return to_response(raw, "traces", await raw.app.state.serving_store.delete_trace(trace_id, principal_of(raw.scope)))


@router.delete("/v1/alignment/users/{user:path}")
async def delete_user(user: str, raw: Request, tenant: str | None = None):
    """`tenant`: for an admin, the one tenant to delete the user from (default: every tenant)."""
    return to_response(raw, "users", await raw.app.state.serving_store.delete_user(user, principal_of(raw.scope), tenant))


@router.post("/v1/alignment/feedback")
async def feedback(request: FeedbackRequest, raw: Request):
    return to_response(raw, "feedback", await raw.app.state.serving_store.add_feedback(request, principal_of(raw.scope)))


@router.get("/health")
async def health(raw: Request):
    engine = raw.app.state.engine
    if engine.dead:
        error = engine_unavailable("the engine is dead")
        return JSONResponse(error.model_dump(), status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(raw: Request):
    """200 once the policy's engine, every helper model's engine and every reward model's
    in-process vLLM engine can serve. Remote reward servers are reported, not waited for: when
    one fails, requests fall back."""
    engine, helpers = raw.app.state.engine, raw.app.state.helpers
    status = engine.status()
    helper_status = {name: e.status() for name, e in helpers.items()}
    reward_status = {name: e.status() for name, e in raw.app.state.reward_engines.items()}
    problems = [f"the engine {why}" for why in [status.problem()] if why]
    problems += [f"helper model {name!r} {why}" for name, s in helper_status.items() if (why := s.problem())]
    problems += [f"reward model {name!r} {why}" for name, s in reward_status.items() if (why := s.problem())]
    numerics = {"policy": status.numerics, **{name: s.numerics for name, s in helper_status.items()}}
    served = {r.name: r.state() for r in raw.app.state.rewards.served()}
    writer = raw.app.state.serving_store.writer
    store = None if writer is None else {"pending": writer.pending, "pending_bytes": writer.pending_bytes,
                                         "full": writer.full}  # full: answers go out, their traces are dropped
    if not problems:
        return JSONResponse({"status": "ready", "model": engine.model_name, "helper_models": sorted(helpers),
                             "numerics": numerics, "served_rewards": served, "store": store})
    body = engine_unavailable("; ".join(problems)).model_dump()
    body["numerics"] = numerics  # what was built and checked so far, e.g. a failed self-check
    body["store"] = store
    return JSONResponse(body, status_code=503)


@router.get("/metrics")
async def metrics(raw: Request):
    return Response(raw.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
