"""Admission control and reward time-outs, without a model."""

from __future__ import annotations

import asyncio
import time

import pytest

from aligner.rewards import RewardError, RewardRegistry
from aligner.rewards.base import Reward
from server.admission import AdmissionConfig, AdmissionController, Overloaded


def controller(**kw) -> AdmissionController:
    return AdmissionController(AdmissionConfig(**kw))


def test_admits_until_full_then_queues_then_refuses():
    async def go():
        c = controller(max_running_requests=2, max_running_sequences=100, max_queued_requests=1)
        a = await c.acquire(1)
        b = await c.acquire(1)
        waiting = asyncio.create_task(c.acquire(1))
        await asyncio.sleep(0)
        assert c.queued_requests == 1 and not waiting.done()
        with pytest.raises(Overloaded):
            await c.acquire(1)
        a.release()
        third = await waiting
        assert c.running_requests == 2 and c.queued_requests == 0
        for t in (b, third, third):  # release is idempotent
            t.release()
        assert c.running_requests == 0 and c.running_sequences == 0

    asyncio.run(go())


def test_sequence_budget_counts_candidates_and_is_fifo():
    async def go():
        c = controller(max_running_requests=10, max_running_sequences=8, max_queued_requests=5)
        big = await c.acquire(8)
        heavy = asyncio.create_task(c.acquire(6))
        await asyncio.sleep(0)
        light = asyncio.create_task(c.acquire(1))
        await asyncio.sleep(0)
        assert not heavy.done() and not light.done()  # light must not overtake heavy
        big.release()
        await asyncio.sleep(0.01)
        assert heavy.done() and light.done()
        assert c.running_sequences == 7

    asyncio.run(go())


def test_freed_slots_go_to_the_tenants_in_turn():
    async def go():
        c = controller(max_running_requests=1, max_running_sequences=100, max_queued_requests=10)
        running = await c.acquire(1, tenant="a")
        order: list[str] = []

        async def wait(tenant: str, label: str):
            ticket = await c.acquire(1, tenant=tenant)
            order.append(label)
            await asyncio.sleep(0)
            ticket.release()

        tasks = [asyncio.create_task(wait("a", f"a{i}")) for i in range(4)]  # a's burst first
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(wait("b", f"b{i}")) for i in range(2)]
        await asyncio.sleep(0)
        running.release()
        await asyncio.gather(*tasks)
        assert order == ["a0", "b0", "a1", "b1", "a2", "a3"]  # b is not stuck behind a's burst

    asyncio.run(go())


def test_a_full_queue_makes_room_for_another_tenant_at_the_expense_of_the_fullest():
    async def go():
        c = controller(max_running_requests=1, max_running_sequences=100, max_queued_requests=4)
        running = await c.acquire(1, tenant="a")
        burst = [asyncio.create_task(c.acquire(1, tenant="a")) for _ in range(4)]
        await asyncio.sleep(0.01)
        assert c.queued_requests == 4
        with pytest.raises(Overloaded):  # a alone at a full queue: refused, as before tenants
            await c.acquire(1, tenant="a")
        b = asyncio.create_task(c.acquire(1, tenant="b"))
        await asyncio.sleep(0.01)
        assert not b.done() and c.queued_requests == 4
        assert burst[-1].done() and isinstance(burst[-1].exception(), Overloaded)  # a's newest gave way
        assert "another tenant" in str(burst[-1].exception())
        c2 = asyncio.create_task(c.acquire(1, tenant="c"))
        await asyncio.sleep(0.01)
        assert burst[-2].done() and not c2.done()  # a still held more than an even share (4/3)
        b2 = asyncio.create_task(c.acquire(1, tenant="b"))  # a still holds 2 > 4/3: it gives way again
        await asyncio.sleep(0.01)
        assert burst[1].done() and not b2.done()
        with pytest.raises(Overloaded):  # now b holds the most: its newcomer takes no one's place
            await asyncio.wait_for(c.acquire(1, tenant="b"), 1)
        granted: list[str] = []

        async def release_when_granted(task, label: str):
            ticket = await task
            granted.append(label)
            ticket.release()

        running.release()
        await asyncio.gather(*(release_when_granted(t, label) for t, label in
                               ((b, "b"), (burst[0], "a"), (c2, "c"), (b2, "b2"))))
        assert granted == ["a", "b", "c", "b2"]  # the tenants in turn
        assert c.running_requests == 0 and c.queued_requests == 0

    asyncio.run(go())


def test_a_request_heavier_than_the_budget_runs_alone():
    async def go():
        c = controller(max_running_sequences=4)
        t = await c.acquire(16)
        assert c.running_sequences == 16
        t.release()

    asyncio.run(go())


def test_queue_wait_is_bounded_and_cancellation_frees_the_place():
    async def go():
        c = controller(max_running_requests=1, max_queued_requests=2, max_queue_wait_s=0.05)
        held = await c.acquire(1)
        started = time.monotonic()
        with pytest.raises(Overloaded, match="waited"):
            await c.acquire(1)
        assert time.monotonic() - started < 1
        cancelled = asyncio.create_task(c.acquire(1))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert c.queued_requests == 0
        held.release()
        assert c.running_requests == 0

    asyncio.run(go())


def test_a_deadline_shorter_than_the_queue_wait_ends_the_wait_saying_so():
    async def go():
        c = controller(max_running_requests=1, max_queued_requests=2, max_queue_wait_s=30)
        held = await c.acquire(1)
        started = time.monotonic()
        with pytest.raises(Overloaded, match="deadline passed while it waited"):
            await c.acquire(1, max_wait_s=0.05)
        assert time.monotonic() - started < 1 and c.queued_requests == 0
        with pytest.raises(Overloaded, match="deadline"):
            await c.acquire(1, max_wait_s=-1.0)  # already past: no wait at all
        held.release()
        (await c.acquire(1, max_wait_s=0.0)).release()  # a free slot is taken whatever is left

    asyncio.run(go())


class SlowReward(Reward):
    name, kind = "slow", "model"

    def score(self, prompts, responses):
        time.sleep(0.5)
        return [0.0] * len(responses)


class NanReward(Reward):
    name, kind = "nan", "model"

    def score(self, prompts, responses):
        return [float("nan")] * len(responses)


@pytest.mark.parametrize("reward, message", [(SlowReward(), "timed out"), (NanReward(), "non-finite")])
def test_reward_timeouts_and_bad_scores_become_reward_errors(reward, message):
    registry = RewardRegistry.with_builtins()
    registry.add(reward)
    registry.timeout_s = 0.05
    calls = []
    registry.observer = lambda name, seconds, ok: calls.append((name, ok))
    with pytest.raises(RewardError, match=message):
        asyncio.run(registry.score({reward.name: 1.0}, [], ["a"]))
    assert calls == [(reward.name, False)]
    registry.close()


def test_rewards_a_request_builds_are_one_metric_label_per_kind():
    registry = RewardRegistry.with_builtins()
    calls = []
    registry.observer = lambda name, seconds, ok: calls.append(name)
    for word in ("alpha", "beta", "gamma"):
        asyncio.run(registry.score({f"keyword:{word}": 1.0, "length_penalty": 1.0}, [], ["alpha beta"]))
    # Client words never become series; the operator's registered names stay as they are.
    assert calls == ["keyword", "length_penalty"] * 3
    registry.close()
