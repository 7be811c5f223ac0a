"""Build the FastAPI application from its parts: `build_app(engine, config, rewards)`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from aligner.alignment import check_profile_alignment
from aligner.profiles import DEFAULT_PROFILES, ProfileStore
from aligner.rewards import RewardRegistry
from aligner.store import Store
from decoding.engine import Engine
from server.admission import AdmissionController
from server.api_keys import APIKeys, reload_on_sighup
from server.quotas import Quotas
from server.config import ServerConfig
from server.errors import from_validation_errors, make_error
from server.metrics import ServerMetrics
from server.middleware import APIKeyMiddleware, BodySizeLimitMiddleware, LocalOriginMiddleware, RequestIdMiddleware
from server.protocol import ErrorResponse
from server.reload import Reloader, ReloadError, ReloadSources
from server.router import router
from server.serving_chat import ServingChat
from server.serving_completion import ServingCompletion
from server.serving_responses import ServingResponses
from server.serving_store import ServingStore
from server.ui import mount_ui

logger = logging.getLogger(__name__)


def error_json(app: FastAPI, error: ErrorResponse) -> JSONResponse:
    app.state.metrics.errors.labels(error.error.type).inc()
    return JSONResponse(error.model_dump(), status_code=error.status_code, headers=error.headers or None)


def build_app(
    engine: Engine,
    config: ServerConfig,
    rewards: RewardRegistry | None = None,
    profiles: ProfileStore | None = None,
    guides=None,
    helpers: dict[str, Engine] | None = None,
    *,
    start_engine: bool = True,
    tool_parser=None,
    store: Store | None = None,
    reload_sources: ReloadSources | None = None,
    guides_at_start: dict[str, str] | None = None,
    routers: dict | None = None,
) -> FastAPI:
    """Wire engine, rewards, serving objects and routes; the engines load in the background.

    `/health` answers as soon as the process listens; `/ready` turns 200 once the engine
    (and every helper model's engine) has loaded, so a slow model load never blocks the
    port. A supervisor restarts an engine that dies. `store` (opened by the caller, who
    closes it) keeps traces and feedback; its background writer stops with the app.
    """
    if store is None and (config.store.traces or config.store.allow_request_traces):
        raise ValueError("storing traces needs a store: pass one to build_app")
    helpers = dict(helpers or {})
    rewards = rewards if rewards is not None else RewardRegistry.with_builtins()
    profiles = profiles if profiles is not None else load_profiles(DEFAULT_PROFILES)
    # The guide slot budget is the engine's pool size, counted by admission only.
    admission = AdmissionController(
        dataclasses.replace(config.admission, max_guide_slots=guides.max_slots) if guides else config.admission
    )
    metrics = ServerMetrics(engine, admission, rewards)
    rewards.observer = metrics.observe_reward

    # Reward models served by vLLM in this process have engines like the helpers'.
    reward_engines = {r.name: r.engine for r in rewards.served() if r.engine is not None}
    app = FastAPI(title="aligner", version="0.1.0",
                  lifespan=engines_lifespan(engine, {**helpers, **{f"reward {n}": e for n, e in reward_engines.items()}},
                                            rewards, config, metrics, start_engine))
    app.state.engine = engine
    app.state.config = config
    app.state.rewards = rewards
    app.state.admission = admission
    app.state.metrics = metrics
    app.state.profiles = profiles
    app.state.guides = guides
    app.state.helpers = helpers
    app.state.reward_engines = reward_engines
    app.state.store = store
    app.state.serving_store = ServingStore(store, config.store, metrics,
                                           keyed=bool(config.api_key or config.api_key_file))
    app.state.chat = ServingChat(engine, config, admission, metrics, rewards, profiles, guides, helpers, tool_parser,
                                 store=app.state.serving_store)
    app.state.completion = ServingCompletion(engine, config, admission, metrics)
    app.state.responses = ServingResponses(app.state.chat)
    _apply_routers(app, dict(routers or {}))
    app.state.reloader = Reloader(rewards, reload_sources, apply_profiles=lambda new: _apply_profiles(app, new),
                                  guides_at_start=dict(guides_at_start or {}),
                                  apply_routers=lambda new: _apply_routers(app, new)) if reload_sources else None
    app.include_router(router)
    mount_ui(app)
    add_error_handlers(app)
    # Outermost first: ids and access logs see everything, the key check runs before any
    # body is read, and the body limit applies to what routes read.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_body_bytes)
    app.state.api_keys = APIKeys(config.api_key, config.api_key_file, config.metrics_key)
    if app.state.api_keys:
        app.state.quotas = quotas = Quotas()
        app.state.api_keys.on_reload = lambda: quotas.keep_only(app.state.api_keys.key_ids())
        app.add_middleware(APIKeyMiddleware, keys=app.state.api_keys, quotas=app.state.quotas, metrics=metrics)
    else:  # keyless: for the one person on this machine, not for the web pages they open
        app.add_middleware(LocalOriginMiddleware)
    app.add_middleware(RequestIdMiddleware)
    return app


def _apply_routers(app: FastAPI, routers: dict) -> None:
    if app.state.chat.experiments is not None:
        app.state.chat.experiments.routers = routers


def engines_lifespan(engine: Engine, helpers: dict[str, Engine], rewards: RewardRegistry, config: ServerConfig,
                     metrics: ServerMetrics, start_engine: bool):
    """Start the engines (and their supervisors) with the app, stop them with it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = [asyncio.create_task(rewards.start()),
                 asyncio.create_task(app.state.serving_store.prune_periodically())]
        if start_engine:
            engines = (engine, *helpers.values())
            if config.start_engines_in_turn:
                tasks.append(asyncio.create_task(_start_in_turn(engines)))
            else:
                tasks += [asyncio.create_task(_start_engine(each)) for each in engines]
            tasks += [asyncio.create_task(supervise(each, config, metrics)) for each in engines]
        try:
            with reload_on_sighup(app.state.api_keys, also=_reload_in_background(app)):
                yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            if start_engine:  # whoever started the engines stops them
                for each in (engine, *helpers.values()):
                    await each.shutdown()
            await rewards.aclose()
            rewards.close()
            await app.state.serving_store.aclose()

    return lifespan


def add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI error envelope, counted by type."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_json(request.app, from_validation_errors(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_json(request.app, make_error(str(exc.detail), exc.status_code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error")
        return error_json(request.app, make_error(f"internal error: {type(exc).__name__}", 500))


def _apply_profiles(app: FastAPI, profiles: ProfileStore) -> None:
    """A reload's profiles: new requests resolve against them (running ones hold the old)."""
    app.state.profiles = app.state.chat.profiles = profiles


def _reload_in_background(app: FastAPI):
    """SIGHUP's reload of models and profiles (None without a reloader): run as a task, logged."""
    reloader = app.state.reloader
    if reloader is None:
        return None

    def start() -> None:
        async def run() -> None:
            try:
                await reloader.reload()
            except ReloadError as exc:
                logger.error("reload on SIGHUP failed, nothing changed: %s", exc)

        app.state.reload_task = asyncio.get_running_loop().create_task(run())

    return start


def load_profiles(path) -> ProfileStore:
    """Load and check a profiles file; raises ProfileError naming the file and line."""
    return ProfileStore.load(path, check_profile_alignment)


async def _start_in_turn(engines) -> None:
    """One engine after another: on a GPU each vLLM engine profiles the device's free memory as
    it starts, and engines starting together each see the others' memory as free."""
    for each in engines:
        await _start_engine(each)


async def _start_engine(engine: Engine) -> None:
    try:
        await engine.start()
        logger.info("engine ready: %s", engine.model_name)
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("engine failed to start")


async def supervise(engine: Engine, config: ServerConfig, metrics: ServerMetrics) -> None:
    """Restart a dead engine, with exponential back-off and a bounded number of tries."""
    restarts = 0
    while True:
        await asyncio.sleep(config.engine_poll_s)
        if not engine.dead:
            continue
        if restarts >= config.max_engine_restarts:
            logger.critical("engine %s is dead and %d restarts are used up", engine.model_name, restarts)
            return
        logger.error("engine %s died (restart %d of %d)", engine.model_name, restarts + 1, config.max_engine_restarts)
        await asyncio.sleep(min(2**restarts - 1, 30))
        restarts += 1
        try:
            await engine.restart()
            metrics.engine_restarts.inc()
            logger.warning("engine %s restarted", engine.model_name)
        except Exception:
            logger.exception("engine restart failed")
