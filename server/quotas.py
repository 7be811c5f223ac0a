"""Per-key rate limits and quotas (issue 38): requests per minute and generated tokens per UTC
day, from the key file's `rpm=N` and `tokens_per_day=N` fields (a key may have neither).

Counted in this process: with several replicas each admits up to the limits, so divide them
by the replica count (or route a key to one replica). A key's counters survive a reload of the
key file while the key stays in it; the key itself is never kept, only a digest of it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

DAY_S = 86_400.0


@dataclass(frozen=True)
class KeyLimits:
    """`rpm`: requests per minute (a bucket of `rpm` requests refilled evenly over a minute,
    so a key may burst up to its minute's worth); `tokens_per_day`: tokens the policy may
    generate for the key per UTC day, candidates included (a best-of-4 answer costs its four)."""

    rpm: int | None = None
    tokens_per_day: int | None = None

    def __bool__(self) -> bool:
        return self.rpm is not None or self.tokens_per_day is not None


class KeyQuota:
    """One key's counters. Thread-safe: streams end on the event loop, non-streamed answers
    too, but the lock costs nothing and keeps `charge` safe from any thread."""

    def __init__(self, limits: KeyLimits, clock: Callable[[], float] = time.time):
        self.limits, self.clock = limits, clock
        self._lock = threading.Lock()
        self._tokens = float(limits.rpm or 0)
        self._refilled = clock()
        self._day = math.floor(self._refilled / DAY_S)
        self.used_today = 0

    def _roll(self, now: float) -> None:
        if self.limits.rpm is not None:
            self._tokens = min(float(self.limits.rpm), self._tokens + (now - self._refilled) * self.limits.rpm / 60)
        self._refilled = now
        if (day := math.floor(now / DAY_S)) != self._day:
            self._day, self.used_today = day, 0

    def admit(self, generates: bool) -> tuple[str, float] | None:
        """Take one request from the minute's bucket; None when admitted, else (which limit,
        seconds until it would be). `generates`: the request generates tokens, so the day's
        tokens must not be used up. A refused request takes nothing."""
        with self._lock:
            now = self.clock()
            self._roll(now)
            limits = self.limits
            if generates and limits.tokens_per_day is not None and self.used_today >= limits.tokens_per_day:
                return "tokens_per_day", (self._day + 1) * DAY_S - now
            if limits.rpm is not None:
                if self._tokens < 1:
                    return "rpm", (1 - self._tokens) * 60 / limits.rpm
                self._tokens -= 1
            return None

    def charge(self, tokens: int) -> None:
        """Count tokens generated for the key (after the answer: the request that crosses the
        day's limit finishes; the next is refused)."""
        with self._lock:
            self._roll(self.clock())
            self.used_today += max(0, int(tokens))


class Quotas:
    """The counters of every limited key, by key digest; `limits_changed` on a reload keeps a
    key's counters when its limits are unchanged and starts afresh when they change."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._by_key: dict[str, KeyQuota] = {}
        self._lock = threading.Lock()

    def for_key(self, key_id: str, limits: KeyLimits) -> KeyQuota | None:
        if not limits:
            return None
        with self._lock:
            quota = self._by_key.get(key_id)
            if quota is None or quota.limits != limits:
                quota = self._by_key[key_id] = KeyQuota(limits, self.clock)
            return quota

    def keep_only(self, key_ids: set[str]) -> None:
        """Forget the counters of keys no longer accepted (a rotated key's memory)."""
        with self._lock:
            for key_id in set(self._by_key) - key_ids:
                del self._by_key[key_id]
