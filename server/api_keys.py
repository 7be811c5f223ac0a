"""The API keys a server accepts: the `--api-key` one and those of an `--api-key-file`, which
SIGHUP re-reads so that keys rotate without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


class APIKeyFileError(ValueError):
    """The key file cannot be read or lists no key (the message never holds a key)."""


def read_key_file(path: str | Path) -> tuple[str, ...]:
    """The keys of a file, one per line; blank lines and lines starting with `#` are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise APIKeyFileError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:  # its own message would quote the file's bytes
        raise APIKeyFileError(f"{path} is not UTF-8 text") from None
    lines = (line.strip() for line in text.splitlines())
    keys = tuple(dict.fromkeys(line for line in lines if line and not line.startswith("#")))
    if not keys:
        raise APIKeyFileError(f"{path} lists no key (one per line; blank lines and '#' comments are skipped)")
    return keys


class APIKeys:
    """The accepted keys, read by the key middleware on every request, so a reload counts
    from the next request on. A reload that fails keeps the keys it would have replaced:
    a half-written or emptied file must not lock every client out."""

    def __init__(self, api_key: str | None = None, path: str | Path | None = None):
        self._fixed = (api_key,) if api_key else ()
        self.path = Path(path) if path is not None else None
        self._expected: tuple[bytes, ...] = ()
        self._set(read_key_file(self.path) if self.path is not None else ())

    def __len__(self) -> int:
        return len(self._expected)

    def _set(self, from_file: tuple[str, ...]) -> None:
        keys = dict.fromkeys((*self._fixed, *from_file))
        # One assignment: a request in flight sees the old tuple or the new one, never a mix.
        self._expected = tuple(f"Bearer {key}".encode() for key in keys)
        if self.path is not None:
            extra = " (and the --api-key one)" if self._fixed else ""
            logger.info("API keys: %d loaded from %s%s", len(from_file), self.path, extra)

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
        return True

    def accepts(self, authorization: bytes) -> bool:
        """Whether an `Authorization` header value is `Bearer <one of the keys>`.

        Every key is compared, in constant time, whatever matched before: the time taken
        tells neither how much of a key was right nor which key it was."""
        matched = False
        for expected in self._expected:
            matched |= hmac.compare_digest(authorization, expected)
        return matched


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
