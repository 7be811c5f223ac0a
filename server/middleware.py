"""Pure ASGI middlewares (no BaseHTTPMiddleware: it breaks disconnect detection)."""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import re
import socket
import time
import uuid

from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException

from server.api_keys import ADMIN, APIKeys, Principal
from server.errors import make_error
from server.quotas import Quotas

access_log = logging.getLogger("aligner.access")

# Liveness stays open so that orchestrators can probe a key-protected server; the UI's static
# files hold no secrets (the page asks for the key and sends it with each call).
UNAUTHENTICATED_PATHS = frozenset({"/health", "/ui"})
UNAUTHENTICATED_PREFIXES = ("/ui/",)
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# What a non-admin role may call (an admin may call everything): (method, path) pairs, and
# (method, prefix) pairs for the routes with an id in their path. HEAD goes where GET goes.
PROBES = {("GET", "/health"), ("GET", "/ready")}
ROLE_PATHS = {
    "metrics": PROBES | {("GET", "/metrics")},
    "client": PROBES | {
        ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/responses"),
        ("GET", "/v1/models"), ("GET", "/v1/alignment/strategies"), ("GET", "/v1/alignment/profiles"),
        ("GET", "/v1/alignment/rewards"), ("POST", "/v1/alignment/score"), ("POST", "/v1/alignment/feedback"),
    },
}
ROLE_PREFIXES = {
    "metrics": (),
    # Their own tenant's traces and users: the store endpoints check the tenant.
    "client": (("GET", "/v1/alignment/traces/"), ("DELETE", "/v1/alignment/traces/"),
               ("DELETE", "/v1/alignment/users/")),
}


def role_allows(role: str, method: str, path: str) -> bool:
    """Whether a key of `role` may call `method path`.

    >>> role_allows("client", "GET", "/v1/alignment/traces/abc"), role_allows("client", "POST", "/v1/alignment/reload")
    (True, False)
    >>> role_allows("metrics", "HEAD", "/metrics"), role_allows("metrics", "POST", "/v1/chat/completions")
    (True, False)
    """
    if role == "admin":
        return True
    method = "GET" if method == "HEAD" else method
    if (method, path) in ROLE_PATHS.get(role, ()):
        return True
    return any(method == m and path.startswith(prefix) and len(path) > len(prefix)
               for m, prefix in ROLE_PREFIXES.get(role, ()))


GENERATION = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/responses")}
PROBE_PATHS = {"/health", "/ready", "/metrics"}


def principal_of(scope) -> Principal:
    """Who sent the request (`server.api_keys.Principal`), as the key middleware found it; a
    server without keys serves one person, who may do everything (`ADMIN`)."""
    return (scope.get("state") or {}).get("principal", ADMIN)


def meter_of(scope):
    """What counts the tokens generated for the request's key (`Callable[[int], None]`), or
    None on a keyless server."""
    return (scope.get("state") or {}).get("meter")


class APIKeyMiddleware:
    """401 unless `Authorization: Bearer <key>` names one of `keys`, asked afresh on every
    request so that a reloaded key file counts from the next request on; 403 when the key's
    role may not call the route; 429 with `Retry-After` past the key's `rpm` or, for a
    generation, its `tokens_per_day`. Who the key names goes on to the routes
    (`principal_of`), with what counts its tokens (`meter_of`)."""

    def __init__(self, app, keys: APIKeys, quotas: Quotas | None = None, metrics=None):
        self.app = app
        self.keys = keys
        self.quotas = quotas if quotas is not None else Quotas()
        self.metrics = metrics  # server.metrics.ServerMetrics: per-tenant counters

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or path in UNAUTHENTICATED_PATHS or path.startswith(UNAUTHENTICATED_PREFIXES):
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or ()).get(b"authorization", b"")
        who = self.keys.principal(given)
        if who is None:
            message = "missing API key" if not given else "invalid API key"
            error = make_error(f"{message}: send it as 'Authorization: Bearer <key>'", 401, code="invalid_api_key")
            response = JSONResponse(error.model_dump(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        if not role_allows(who.role, scope.get("method", "GET"), path):
            error = make_error(f"a {who.role} key may not call {scope.get('method')} {path[:200]}", 403,
                               code="permission_denied")
            return await JSONResponse(error.model_dump(), status_code=403)(scope, receive, send)
        method = scope.get("method", "GET")
        tenant = who.tenant or "default"
        quota = self.quotas.for_key(who.key_id, who.limits) if who.key_id else None
        if path not in PROBE_PATHS:
            if self.metrics is not None:
                self.metrics.tenant_requests.labels(tenant).inc()
            if quota is not None and (refused := quota.admit((method, path) in GENERATION)) is not None:
                limit, wait_s = refused
                if self.metrics is not None:
                    self.metrics.rate_limited.labels(tenant, limit).inc()
                what = ("requests per minute" if limit == "rpm" else "generated tokens for today (UTC)")
                error = make_error(f"this key has used its {what}; retry after {math.ceil(wait_s)} s", 429,
                                   code="rate_limit_exceeded")
                return await JSONResponse(error.model_dump(), status_code=429,
                                          headers={"Retry-After": str(max(1, math.ceil(wait_s)))})(scope, receive, send)

        def meter(tokens: int) -> None:
            if quota is not None:
                quota.charge(tokens)
            if self.metrics is not None:
                self.metrics.tenant_tokens.labels(tenant).inc(tokens)

        state = scope.setdefault("state", {})
        state["principal"], state["meter"] = who, meter
        return await self.app(scope, receive, send)


def _hostname(netloc: str) -> str:
    """`host:port` -> host, lower case, without an IPv6 address's brackets or a trailing dot."""
    if netloc.startswith("["):
        host = netloc[1:netloc.find("]")] if "]" in netloc else netloc
    else:
        host = netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc
    return host.lower().rstrip(".")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _local_name(host: str, own: str) -> bool:
    """A name a rebinding page cannot take: an IP address (any: the page's name is a domain),
    `localhost`, or this machine's own name `own`."""
    if not host or _is_ip(host):
        return True  # no Host (HTTP/1.0: not a browser), or an address
    return host in ("localhost", own, f"{own}.local") or host.endswith(".localhost")


class LocalOriginMiddleware:
    """A server without API keys answers its own origin only. Any web page the user opens can
    send requests to `http://127.0.0.1:8000`; without a key nothing else stops it. So a request
    whose `Origin` is not the server's own (`Origin` is what browsers add to cross-site
    requests; SDKs and curl send none) is a 403, and so is one whose `Host` is a domain name
    other than `localhost` or this machine's name (a DNS-rebinding page reaches the socket
    under its own domain, and its requests are then same-origin), on any interface."""

    def __init__(self, app):
        self.app = app
        self.own_name = socket.gethostname().lower()  # once, not per request

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        host = headers.get(b"host", b"").decode("latin-1").lower()
        origin = headers.get(b"origin", b"").decode("latin-1").lower()
        why = None
        # On a real socket (an IP address; in-process test clients name none) the Host must
        # be a local name, whichever interface the request came in on.
        if _is_ip(str((scope.get("server") or ("",))[0])) and not _local_name(_hostname(host), self.own_name):
            why = "this server has no API key and answers only under an IP address, localhost or its own name (Host)"
        elif origin and origin.split("://", 1)[-1] != host:
            why = "this server has no API key and answers only its own origin (Origin)"
        if why is not None:
            error = make_error(f"{why}; start it with --api-key or --api-key-file to serve others", 403,
                               code="cross_origin_refused")
            return await JSONResponse(error.model_dump(), status_code=403)(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the {limit}-byte limit")


class BodySizeLimitMiddleware:
    """413 for bodies over the limit, whether announced by Content-Length or streamed."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            error = make_error(f"request body exceeds the {self.max_bytes}-byte limit", 413, code="request_too_large")
            return await JSONResponse(error.model_dump(), status_code=413)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)  # FastAPI turns it into our 413 envelope
            return message

        return await self.app(scope, limited_receive, send)


class RequestIdMiddleware:
    """Tags every request with an id (the client's `x-request-id` if sane), returns it as a
    header, and writes one structured access-log line per request. Headers (keys) are never
    logged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID_RE.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        state = {"status": None, "logged": False}

        def log(outcome: str) -> None:
            if state["logged"]:
                return
            state["logged"] = True
            access_log.info(json.dumps({
                "request_id": request_id,
                "method": scope.get("method"),
                "path": scope.get("path"),
                "status": state["status"],
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                "outcome": outcome,
            }))

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                MutableHeaders(scope=message).append("x-request-id", request_id)
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                log("complete")

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log("client_disconnected" if state["status"] is not None else "no_response")
