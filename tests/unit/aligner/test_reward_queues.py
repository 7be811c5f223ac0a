"""Each reward model scores on its own thread behind its own bounded queue."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from aligner.rewards import RewardRegistry
from aligner.rewards.base import Reward
from aligner.rewards.registry import RewardError


class GatedReward(Reward):
    """A model reward that blocks until `gate` is set; scores every response `value`."""

    kind = "model"

    def __init__(self, name: str, value: float = 1.0):
        self.name, self.value = name, value
        self.gate = threading.Event()
        self.gate.set()
        self.started = 0

    def score(self, prompts, responses):
        self.started += 1
        assert self.gate.wait(10), "test gate never opened"
        return [self.value] * len(responses)


@pytest.fixture
def registry():
    reg = RewardRegistry()
    reg.add(GatedReward("slow", 1.0))
    reg.add(GatedReward("fast", 2.0))
    reg.timeout_s = 5.0
    reg.max_pending_per_reward = 2
    yield reg
    reg.rewards["slow"].gate.set()
    reg.close()


async def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def test_a_slow_reward_does_not_delay_another(registry):
    registry.rewards["slow"].gate.clear()
    stuck = asyncio.ensure_future(registry.score({"slow": 1.0}, [], ["a"]))
    await wait_until(lambda: registry.rewards["slow"].started == 1)

    began = time.perf_counter()
    report = await registry.score({"fast": 1.0}, [], ["a", "b"])
    assert report.total == [2.0, 2.0]
    assert time.perf_counter() - began < 1.0
    assert not stuck.done()

    registry.rewards["slow"].gate.set()
    assert (await stuck).total == [1.0]


async def test_a_full_queue_fails_fast_as_busy_and_frees_when_the_thread_finishes(registry):
    slow = registry.rewards["slow"]
    slow.gate.clear()
    outcomes = []
    registry.observer = lambda name, seconds, ok: outcomes.append((name, ok))
    held = [asyncio.ensure_future(registry.score({"slow": 1.0}, [], ["a"])) for _ in range(2)]
    await wait_until(lambda: registry.pending() == {"slow": 2})

    began = time.perf_counter()
    with pytest.raises(RewardError, match=r"busy: 2 calls waiting") as error:
        await registry.score({"slow": 1.0}, [], ["a"])
    assert error.value.name == "slow"
    assert time.perf_counter() - began < 1.0
    assert outcomes == [("slow", False)]

    slow.gate.set()
    assert [r.total for r in await asyncio.gather(*held)] == [[1.0], [1.0]]
    await wait_until(lambda: registry.pending() == {"slow": 0})
    assert (await registry.score({"slow": 1.0}, [], ["a"])).total == [1.0]


async def test_a_timed_out_call_holds_its_slot_until_its_thread_finishes(registry):
    slow = registry.rewards["slow"]
    slow.gate.clear()
    registry.timeout_s = 0.05
    registry.max_pending_per_reward = 1
    with pytest.raises(RewardError, match="timed out"):
        await registry.score({"slow": 1.0}, [], ["a"])
    # The request gave up, but its forward still runs and still holds the model.
    assert slow.started == 1 and registry.pending() == {"slow": 1}
    with pytest.raises(RewardError, match="busy: 1 calls waiting"):
        await registry.score({"slow": 1.0}, [], ["a"])

    slow.gate.set()
    await wait_until(lambda: registry.pending() == {"slow": 0})
    registry.timeout_s = 5.0
    assert (await registry.score({"slow": 1.0}, [], ["a"])).total == [1.0]


async def test_a_call_that_times_out_before_its_turn_gives_its_slot_back(registry):
    slow = registry.rewards["slow"]
    slow.gate.clear()
    running = asyncio.ensure_future(registry.score({"slow": 1.0}, [], ["a"]))
    await wait_until(lambda: slow.started == 1)
    registry.timeout_s = 0.05
    with pytest.raises(RewardError, match="timed out"):
        await registry.score({"slow": 1.0}, [], ["a"])
    # The queued call never reached the model: it is dropped, not run for nobody.
    assert registry.pending() == {"slow": 1}
    registry.timeout_s = 5.0
    slow.gate.set()
    await running
    assert slow.started == 1
    assert (await registry.score({"slow": 1.0}, [], ["a"])).total == [1.0]


async def test_two_models_score_one_request_concurrently(registry):
    slow, fast = registry.rewards["slow"], registry.rewards["fast"]
    slow.gate.clear()
    fast.gate.clear()
    both = asyncio.ensure_future(registry.score({"slow": 1.0, "fast": 0.5}, [], ["a"]))
    # Each model's forward has started before either finished: they run side by side.
    await wait_until(lambda: slow.started == 1 and fast.started == 1)
    slow.gate.set()
    fast.gate.set()
    report = await both
    assert report.per_reward == {"slow": [1.0], "fast": [2.0]}
    assert report.total == [2.0]


async def test_the_failing_reward_is_named_when_another_succeeds(registry):
    registry.rewards["slow"].gate.clear()
    registry.max_pending_per_reward = 1
    stuck = asyncio.ensure_future(registry.score({"slow": 1.0}, [], ["a"]))
    await wait_until(lambda: registry.pending().get("slow") == 1)
    with pytest.raises(RewardError) as error:
        await registry.score({"fast": 1.0, "slow": 1.0}, [], ["a"])
    assert error.value.name == "slow" and error.value.reason == "busy: 1 calls waiting"
    registry.rewards["slow"].gate.set()
    await stuck


def test_close_shuts_every_reward_thread(registry):
    for name in ("slow", "fast"):
        asyncio.run(registry.score({name: 1.0}, [], ["a"]))
    registry.close()
    with pytest.raises(RewardError, match="shutting down"):
        asyncio.run(registry.score({"fast": 1.0}, [], ["a"]))
    assert _threads_exit()


def _threads_exit(timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(t.name.startswith(("reward-slow", "reward-fast")) and t.is_alive() for t in threading.enumerate()):
            return True
        time.sleep(0.01)
    return False
