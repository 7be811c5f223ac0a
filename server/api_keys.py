"""The API keys a server accepts: the `--api-key` one and those of an `--api-key-file`, which
SIGHUP re-reads so that keys rotate without a restart.

Each key names who calls (`Principal`): a role, a tenant and its limits. A line of the key
file is a key, then optional fields: `KEY tenant=NAME role=client|admin|metrics rpm=N
tokens_per_day=N`. A bare key is an admin key of the default tenant without limits (files
written before roles keep working), and so is `--api-key`.

- admin: everything, across tenants (reload, reports, metrics, any tenant's traces and users);
- client: generation and scoring, and its own tenant's traces, feedback and users;
- metrics: `/metrics`, `/health` and `/ready` only (probes and Prometheus).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import re
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from server.quotas import KeyLimits

logger = logging.getLogger(__name__)


class APIKeyFileError(ValueError):
    """The key file cannot be read or lists no key (the message never holds a key)."""


ROLES = ("admin", "client", "metrics")
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Principal:
    """Who a request comes from. `tenant` None is the default tenant: keys without a tenant,
    a keyless server, and every trace stored before tenants existed."""

    role: str = "admin"
    tenant: str | None = None
    limits: KeyLimits = KeyLimits()
    key_id: str | None = field(default=None, compare=False)  # a digest of the key, for its counters

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def owns(self, tenant: str | None) -> bool:
        """Whether data of `tenant` is this caller's to read, rate or delete."""
        return self.admin or tenant == self.tenant


ADMIN = Principal()  # `--api-key`, a bare key, and the one person of a keyless server


FIELDS = ("tenant", "role", "rpm", "tokens_per_day")


def key_id(key: str) -> str:
    """A key's name in counters and logs: a digest, never the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _limit(given: dict[str, str], name: str, where: str) -> int | None:
    value = given.get(name)
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise APIKeyFileError(f"{where}: {name} must be a whole number of at least 1")
    return int(value)


def _principal(words: list[str], where: str) -> Principal:
    """The `name=value` fields after a key (`where` names the line, never the key)."""
    given: dict[str, str] = {}
    for word in words:
        name, sep, value = word.partition("=")
        if not sep or name not in FIELDS or name in given:
            raise APIKeyFileError(f"{where}: after the key come only tenant=NAME, role={'|'.join(ROLES)}, "
                                  "rpm=N and tokens_per_day=N, each at most once")
        given[name] = value
    role = given.get("role", "admin")
    if role not in ROLES:
        raise APIKeyFileError(f"{where}: role must be one of {', '.join(ROLES)}")
    tenant = given.get("tenant")
    if tenant is not None and not TENANT_RE.match(tenant):
        raise APIKeyFileError(f"{where}: a tenant is 1 to 64 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit")
    return Principal(role, tenant, KeyLimits(_limit(given, "rpm", where), _limit(given, "tokens_per_day", where)))


def read_key_file(path: str | Path) -> dict[str, Principal]:
    """The keys of a file and who each names, one key per line (`KEY [tenant=NAME]
    [role=ROLE]`); blank lines and lines starting with `#` are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise APIKeyFileError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:  # its own message would quote the file's bytes
        raise APIKeyFileError(f"{path} is not UTF-8 text") from None
    keys: dict[str, Principal] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        where = f"{path} line {number}"
        principal = _principal(words[1:], where)
        if keys.setdefault(words[0], principal) != principal:
            raise APIKeyFileError(f"{where}: this key is listed before with another tenant or role")
    if not keys:
        raise APIKeyFileError(f"{path} lists no key (one per line; blank lines and '#' comments are skipped)")
    return keys


class APIKeys:
    """The accepted keys, read by the key middleware on every request, so a reload counts
    from the next request on. A reload that fails keeps the keys it would have replaced:
    a half-written or emptied file must not lock every client out."""

    def __init__(self, api_key: str | None = None, path: str | Path | None = None, metrics_key: str | None = None):
        self._fixed = {**({metrics_key: Principal("metrics")} if metrics_key else {}),
                       **({api_key: ADMIN} if api_key else {})}
        self.path = Path(path) if path is not None else None
        self.on_reload: Callable[[], None] | None = None  # after a reload that took (the quotas forget old keys)
        self._expected: tuple[tuple[bytes, Principal], ...] = ()
        self._set(read_key_file(self.path) if self.path is not None else {})

    def __len__(self) -> int:
        return len(self._expected)

    def _set(self, from_file: dict[str, Principal]) -> None:
        keys = {**from_file, **self._fixed}  # `--api-key` stays an admin key whatever the file says
        # One assignment: a request in flight sees the old tuple or the new one, never a mix.
        self._expected = tuple((f"Bearer {key}".encode(), dataclasses.replace(who, key_id=key_id(key)))
                               for key, who in keys.items())
        if self.path is not None:
            extra = f" (and {len(self._fixed)} from the command line)" if self._fixed else ""
            roles = {role: sum(who.role == role for who in from_file.values()) for role in ROLES}
            logger.info("API keys: %d loaded from %s%s (%s)", len(from_file), self.path, extra,
                        ", ".join(f"{n} {role}" for role, n in roles.items() if n))

    def reload(self) -> bool:
        """Re-read the key file; on failure log why and keep the current keys."""
        if self.path is None:
            return False
        try:
            from_file = read_key_file(self.path)
        except APIKeyFileError as exc:
            logger.error("API key file not reloaded, the %d keys in use stay: %s", len(self), exc)
            return False
        self._set(from_file)
        if self.on_reload is not None:
            self.on_reload()
        return True

    def principal(self, authorization: bytes) -> Principal | None:
        """Who an `Authorization` header value `Bearer <key>` names; None for no key of ours.

        Every key is compared, in constant time, whatever matched before: the time taken
        tells neither how much of a key was right nor which key it was."""
        found = None
        for expected, who in self._expected:
            if hmac.compare_digest(authorization, expected):
                found = who
        return found

    def accepts(self, authorization: bytes) -> bool:
        return self.principal(authorization) is not None

    def key_ids(self) -> set[str]:
        return {who.key_id for _, who in self._expected}


@contextlib.contextmanager
def reload_on_sighup(keys: APIKeys, also: Callable[[], None] | None = None) -> Iterator[None]:
    """While inside, SIGHUP re-reads the key file (when there is one) and calls `also` (the
    models and profiles reload). Call it on the running loop in the main thread; elsewhere (a
    test client's thread) it logs and goes on."""
    if keys.path is None and also is None:
        yield
        return

    def on_sighup() -> None:
        if keys.path is not None:
            keys.reload()
        if also is not None:
            also()

    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    except (AttributeError, NotImplementedError, RuntimeError, ValueError) as exc:
        logger.warning("SIGHUP will not reload %s here: %s", keys.path or "models and profiles", exc)
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
