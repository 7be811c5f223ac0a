"""Build the FastAPI application from its parts: `build_app(engine, config)`."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from aligner.rewards import RewardRegistry
from decoding.engine import Engine
from server.config import ServerConfig
from server.errors import from_validation_errors, make_error
from server.metrics import ServerMetrics
from server.router import router
from server.serving_chat import ServingChat
from server.serving_completion import ServingCompletion

logger = logging.getLogger(__name__)

# Liveness stays open so that orchestrators can probe a key-protected server.
UNAUTHENTICATED_PATHS = frozenset({"/health"})


class APIKeyMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it breaks disconnect detection)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in UNAUTHENTICATED_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        given = headers.get(b"authorization", b"")
        if not hmac.compare_digest(given, self._expected):
            message = "missing API key" if not given else "invalid API key"
            error = make_error(
                f"{message}: send it as 'Authorization: Bearer <key>'", 401, code="invalid_api_key"
            )
            response = JSONResponse(
                error.model_dump(), status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def error_json(error) -> JSONResponse:
    return JSONResponse(error.model_dump(), status_code=error.status_code)


def build_app(
    engine: Engine,
    config: ServerConfig,
    rewards: RewardRegistry | None = None,
    *,
    start_engine: bool = True,
) -> FastAPI:
    """Wire engine, serving objects and routes; the engine loads in the background.

    `/health` answers as soon as the process listens; `/ready` turns 200 once the engine
    has loaded, so a slow model load never blocks the port.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = None
        if start_engine:
            task = asyncio.create_task(_start_engine(engine))
        try:
            yield
        finally:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await engine.shutdown()
            rewards.close()

    rewards = rewards if rewards is not None else RewardRegistry.with_builtins()
    app = FastAPI(title="aligner", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    app.state.config = config
    app.state.rewards = rewards
    app.state.chat = ServingChat(engine, config, rewards)
    app.state.completion = ServingCompletion(engine, config)
    app.state.metrics = ServerMetrics(engine)
    app.include_router(router)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return error_json(from_validation_errors(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return error_json(make_error(str(exc.detail), exc.status_code))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        logger.exception("unhandled error")
        return error_json(make_error(f"internal error: {type(exc).__name__}", 500))

    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    return app


async def _start_engine(engine: Engine) -> None:
    try:
        await engine.start()
        logger.info("engine ready: %s", engine.model_name)
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("engine failed to start")
