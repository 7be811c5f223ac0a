"""Bounded admission: a request runs, waits in a bounded queue, or is refused at once (429).

Each request weighs the number of sequences it will decode (n x candidates), so a few
best-of-16 requests cannot crowd the engine out any more than many plain ones. Guided requests
also hold token-level guide slots, a second budget counted here and nowhere else: the engine's
guide pool has exactly that many slots, so a request admitted here always gets one.

The queue is shared fairly between tenants (the tenant of each request's key): each tenant
waits in its own first-come-first-served line, freed slots go to the tenants in turn, and a
tenant arriving at a full queue takes the place of the newest request of the tenant holding
the most places (that one gets the 429), as long as that tenant holds more than its share. So
one tenant's burst cannot hold every place in the queue nor every slot freed after it.
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
        # Per tenant, its waiters in arrival order; `_turns`: the tenants with waiters, the one
        # whose head goes next first.
        self._lines: dict[str | None, collections.deque[tuple[int, int, asyncio.Future]]] = {}
        self._turns: collections.deque[str | None] = collections.deque()

    @property
    def queued_requests(self) -> int:
        return sum(len(line) for line in self._lines.values())

    def _make_room(self, tenant: str | None) -> bool:
        """At a full queue: refuse the newest waiter of the tenant holding the most places, when
        that is another tenant holding more than an even share; True when a place was freed."""
        if not self._lines:
            return False
        fullest = max(self._lines, key=lambda t: len(self._lines[t]))
        share = self.config.max_queued_requests / (len(self._lines) + (tenant not in self._lines))
        if fullest == tenant or len(self._lines[fullest]) <= share:
            return False
        _, _, future = self._lines[fullest].pop()
        if not future.done():
            future.set_exception(Overloaded("the queue is full and shared between tenants: this request gave its "
                                            "place to another tenant's; retry later"))
        if not self._lines[fullest]:
            del self._lines[fullest]
            self._turns.remove(fullest)
        return True

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

    async def acquire(self, weight: int, guide_slots: int = 0, max_wait_s: float | None = None,
                      tenant: str | None = None) -> Ticket:
        """A ticket, or `Overloaded` at once when the queue is full (or after the wait cap, or
        `max_wait_s` if shorter: the request's own deadline, or when another tenant takes its
        place). `tenant`: whose line it waits in. `guide_slots` above `max_guide_slots` is the
        caller's bug (requests are checked first)."""
        if guide_slots > self.config.max_guide_slots:
            raise ValueError(f"{guide_slots} guide slots asked, the server has {self.config.max_guide_slots}")
        if not self._lines and self._fits(weight, guide_slots):
            return self._take(weight, guide_slots)
        if self.queued_requests >= self.config.max_queued_requests and not self._make_room(tenant):
            raise Overloaded(
                f"server is at capacity ({self.running_requests} running, "
                f"{self.queued_requests} queued); retry later"
            )
        wait = self.config.max_queue_wait_s
        deadline_first = max_wait_s is not None and max_wait_s < wait
        if deadline_first:
            wait = max(0.0, max_wait_s)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        entry = (weight, guide_slots, future)
        if tenant not in self._lines:
            self._lines[tenant] = collections.deque()
            self._turns.append(tenant)
        self._lines[tenant].append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(future), wait)
        except Overloaded:
            raise  # its place went to another tenant (already out of the line)
        except BaseException as exc:
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().release()  # granted just as we gave up: hand it back
            elif not future.done():
                future.cancel()
            if isinstance(exc, asyncio.TimeoutError):
                raise Overloaded(
                    "the request's deadline passed while it waited in the queue" if deadline_first
                    else f"waited {wait:g}s in the queue; retry later"
                ) from None
            raise
        finally:
            self._leave(tenant, entry)
        return future.result()

    def _leave(self, tenant: str | None, entry) -> None:
        line = self._lines.get(tenant)
        if line is not None and entry in line:
            line.remove(entry)
            if not line:
                del self._lines[tenant]
                self._turns.remove(tenant)

    def _release(self, weight: int, guide_slots: int) -> None:
        self.running_requests -= 1
        self.running_sequences -= weight
        self.guide_slots_in_use -= guide_slots
        # The tenants take turns; within one, first come, first served. The head whose turn it
        # is goes first and nobody overtakes it (a heavy request is not starved by light ones).
        while self._turns:
            tenant = self._turns[0]
            line = self._lines[tenant]
            weight, guide_slots, future = line[0]
            if future.done():
                self._leave(tenant, line[0])
                continue
            if not self._fits(weight, guide_slots):
                break
            self._leave(tenant, line[0])
            future.set_result(self._take(weight, guide_slots))
            if tenant in self._lines:  # the next turn is another tenant's
                self._turns.rotate(-1)
