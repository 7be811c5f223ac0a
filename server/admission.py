"""Bounded admission: a request runs, waits in a bounded queue, or is refused at once (429).

Each request weighs the number of sequences it will decode (n x candidates), so a few
best-of-16 requests cannot crowd the engine out any more than many plain ones. Guided requests
also hold token-level guide slots, a second budget counted here and nowhere else: the engine's
guide pool has exactly that many slots, so a request admitted here always gets one.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass


@dataclass(frozen=True)
class AdmissionConfig:
    max_running_requests: int = 16
    max_running_sequences: int = 64
    max_queued_requests: int = 64
    # How long a queued request may wait for a slot before it is refused with 429.
    max_queue_wait_s: float = 60.0
    # Guided sequences decoded at once (the engine's guide slot pool).
    max_guide_slots: int = 16


class Overloaded(Exception):
    def __init__(self, reason: str, retry_after_s: int = 1):
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class Ticket:
    """Held while a request runs; `release()` is idempotent."""

    def __init__(self, controller: AdmissionController, weight: int, guide_slots: int = 0):
        self._controller = controller
        self.weight = weight
        self.guide_slots = guide_slots
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._controller._release(self.weight, self.guide_slots)

    def __del__(self):
        # Safety net: a streaming response that never started still frees its slot.
        self.release()


class AdmissionController:
    def __init__(self, config: AdmissionConfig | None = None):
        self.config = config or AdmissionConfig()
        self.running_requests = 0
        self.running_sequences = 0
        self.guide_slots_in_use = 0
        self._waiters: collections.deque[tuple[int, int, asyncio.Future]] = collections.deque()

    @property
    def queued_requests(self) -> int:
        return len(self._waiters)

    def _fits(self, weight: int, guide_slots: int) -> bool:
        c = self.config
        if self.running_requests >= c.max_running_requests:
            return False
        if self.guide_slots_in_use + guide_slots > c.max_guide_slots:
            return False  # never oversubscribed: the engine has no more slots than this
        # A single request heavier than the whole budget still runs, alone.
        return self.running_sequences + weight <= c.max_running_sequences or self.running_sequences == 0

    def _take(self, weight: int, guide_slots: int) -> Ticket:
        self.running_requests += 1
        self.running_sequences += weight
        self.guide_slots_in_use += guide_slots
        return Ticket(self, weight, guide_slots)

    async def acquire(self, weight: int, guide_slots: int = 0, max_wait_s: float | None = None) -> Ticket:
        """A ticket, or `Overloaded` at once when the queue is full (or after the wait cap, or
        `max_wait_s` if shorter: the request's own deadline). `guide_slots` above
        `max_guide_slots` is the caller's bug (requests are checked first)."""
        if guide_slots > self.config.max_guide_slots:
            raise ValueError(f"{guide_slots} guide slots asked, the server has {self.config.max_guide_slots}")
        if not self._waiters and self._fits(weight, guide_slots):
            return self._take(weight, guide_slots)
        if len(self._waiters) >= self.config.max_queued_requests:
            raise Overloaded(
                f"server is at capacity ({self.running_requests} running, "
                f"{len(self._waiters)} queued); retry later"
            )
        wait = self.config.max_queue_wait_s
        deadline_first = max_wait_s is not None and max_wait_s < wait
        if deadline_first:
            wait = max(0.0, max_wait_s)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        entry = (weight, guide_slots, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(future), wait)
        except BaseException as exc:
            if future.done() and not future.cancelled():
                future.result().release()  # granted just as we gave up: hand it back
            else:
                future.cancel()
            if isinstance(exc, asyncio.TimeoutError):
                raise Overloaded(
                    "the request's deadline passed while it waited in the queue" if deadline_first
                    else f"waited {wait:g}s in the queue; retry later"
                ) from None
            raise
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
        return future.result()

    def _release(self, weight: int, guide_slots: int) -> None:
        self.running_requests -= 1
        self.running_sequences -= weight
        self.guide_slots_in_use -= guide_slots
        # First come, first served: the head of the queue goes first, nobody overtakes it.
        while self._waiters:
            weight, guide_slots, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if not self._fits(weight, guide_slots):
                break
            self._waiters.popleft()
            future.set_result(self._take(weight, guide_slots))
