"""Rewards registered at start, the weighted combinations requests ask for, and scoring
off the event loop: each reward model on its own thread behind its own bounded queue."""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from aligner.rewards.base import Messages, Reward
from aligner.rewards.rules import RegexCountReward, builtin_rules, keyword_reward

MAX_REWARDS_PER_REQUEST = 8
MAX_WEIGHT = 100.0


class RewardSpecError(ValueError):
    """A request's reward selection is invalid; `param` names the offending field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param

logger = logging.getLogger(__name__)


class RewardError(RuntimeError):
    """A reward failed or timed out while scoring; strategies may fall back on it."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"reward {name!r} failed: {reason}")
        self.name = name
        self.reason = reason


@dataclass
class ScoreReport:
    """Weighted total per response, each reward's own scores, and the time it took."""

    total: list[float]
    per_reward: dict[str, list[float]]
    weights: dict[str, float]
    seconds: float = 0.0


@dataclass
class RewardRegistry:
    rewards: dict[str, Reward] = field(default_factory=dict)
    default: str | None = None
    timeout_s: float = 30.0
    # Score calls one reward model may hold (running or waiting) before the next fails at once
    # as "busy", so a slow model makes its own requests fall back instead of piling up.
    max_pending_per_reward: int = 32
    # Called after each reward call with (name, seconds, ok); the server feeds metrics from it.
    observer: Callable[[str, float, bool], None] | None = None
    # What this registry's scoring used: {name: {"sequences": n, "tokens": n}}. A request's
    # `snapshot` starts its own, so it counts every forward the request caused (strategy,
    # router, output rail) for its compute report.
    usage: dict[str, dict[str, int]] = field(default_factory=dict, init=False, repr=False)
    _executors: dict[str, ThreadPoolExecutor] = field(default_factory=dict, init=False, repr=False)
    _pending: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    # Pending counts drop on worker threads (a done callback), so they are guarded by a lock.
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)

    @classmethod
    def with_builtins(cls) -> RewardRegistry:
        registry = cls()
        for rule in builtin_rules():
            registry.add(rule)
        return registry

    def add(self, reward: Reward, *, default: bool = False) -> None:
        if reward.name in self.rewards:
            raise ValueError(f"reward {reward.name!r} is registered twice")
        self.rewards[reward.name] = reward
        if default or (self.default is None and reward.kind == "model"):
            self.default = reward.name

    def add_from_spec(self, spec: str, *, served: Callable[[str, str, str | None, str | None], Reward] | None = None,
                      **model_kwargs) -> Reward:
        """`NAME=PATH` (a checkpoint scored in this process by Hugging Face), `NAME=regex:PATTERN`
        (a rule), or a model served by vLLM (`NAME=vllm:PATH`, `NAME=http://HOST:PORT`,
        `NAME=PATH@http://HOST:PORT`), which `served(name, backend, checkpoint, url)` builds."""
        reward = self.build_from_spec(spec, served=served, **model_kwargs)
        self.add(reward)
        return reward

    @staticmethod
    def build_from_spec(spec: str, *, served: Callable[[str, str, str | None, str | None], Reward] | None = None,
                        **model_kwargs) -> Reward:
        """The reward a `--reward-model` spec names, loaded but not registered."""
        from aligner.rewards.served import parse_served_spec

        name, sep, target = spec.partition("=")
        if not sep or not name or not target:
            raise ValueError(f"--reward-model expects NAME=PATH, NAME=vllm:PATH, NAME=http://HOST:PORT or "
                             f"NAME=regex:PATTERN, got {spec!r}")
        backend, checkpoint, url = parse_served_spec(target)
        if target.startswith("regex:"):
            reward: Reward = RegexCountReward(name, target.removeprefix("regex:"))
        elif backend:
            if served is None:
                raise ValueError(f"--reward-model {name}: rewards served by vLLM need the server")
            reward = served(name, backend, checkpoint, url)
        else:
            from aligner.rewards.hf import SequenceClassifierReward

            reward = SequenceClassifierReward(name, target, **model_kwargs)
        reward.spec = spec
        return reward

    def snapshot(self) -> RewardRegistry:
        """This registry as it is now, for one request: a reload swaps in new reward objects,
        and a request already running keeps scoring with the versions it started with. The
        view shares the worker threads, queue bounds and observer."""
        view = copy.copy(self)
        view.rewards = dict(self.rewards)
        view.usage = {}
        return view

    def swap(self, rewards: dict[str, Reward], default: str | None) -> None:
        """Replace the registered rewards at once (a reload); running requests keep their snapshots."""
        self.rewards, self.default = dict(rewards), default

    def versions(self, names) -> dict[str, str]:
        """{name: version} of the named rewards that have one (models: their checkpoint's)."""
        return {n: v for n in names if (r := self.get(n)) is not None and (v := getattr(r, "version", None))}

    def get(self, name: str) -> Reward | None:
        return self.rewards.get(name) or keyword_reward(name)

    def describe(self) -> list[dict]:
        return [dict(r.describe(), default=(r.name == self.default)) for r in self.rewards.values()]

    def resolve(self, spec: str | Mapping[str, float] | None, param: str = "alignment.reward") -> dict[str, float]:
        """A request's `reward` field -> {name: weight}; raises RewardSpecError."""
        if spec is None:
            if self.default is None:
                raise RewardSpecError(
                    "this strategy needs a reward: name one in alignment.reward (built-in rules: "
                    f"{', '.join(n for n, r in self.rewards.items() if r.kind == 'rule')}, keyword:<word>)",
                    param,
                )
            return {self.default: 1.0}
        weights = {spec: 1.0} if isinstance(spec, str) else dict(spec)
        if not weights:
            raise RewardSpecError("reward must name at least one reward", param)
        if len(weights) > MAX_REWARDS_PER_REQUEST:
            raise RewardSpecError(f"at most {MAX_REWARDS_PER_REQUEST} rewards per request", param)
        for name, weight in weights.items():
            if self.get(name) is None:
                known = ", ".join(sorted(self.rewards)) or "none"
                raise RewardSpecError(f"unknown reward {name!r} (registered: {known}; or keyword:<word>)", f"{param}.{name}")
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 <= weight <= MAX_WEIGHT:
                raise RewardSpecError(f"reward weight must be a number in [0, {MAX_WEIGHT:g}]", f"{param}.{name}")
        if not any(weights.values()):
            raise RewardSpecError("at least one reward weight must be positive", param)
        return {name: float(w) for name, w in weights.items()}

    async def score(
        self, weights: Mapping[str, float], prompt: Messages, responses: Sequence[str]
    ) -> ScoreReport:
        """Score responses to one prompt with every named reward, the models concurrently,
        each on its own thread; the first reward to fail raises its RewardError."""
        start = time.perf_counter()
        prompts = [prompt] * len(responses)
        calls = [asyncio.ensure_future(self._score_one(name, prompts, responses)) for name in weights]
        try:
            scores = await asyncio.gather(*calls)
        except BaseException:
            # The answer is lost anyway: give queued calls of the other rewards their slots back.
            for call in calls:
                call.cancel()
            raise
        per_reward = dict(zip(weights, scores))
        total = [sum(weights[n] * per_reward[n][i] for n in weights) for i in range(len(responses))]
        return ScoreReport(total, per_reward, dict(weights), time.perf_counter() - start)

    async def score_requests(self, name: str, prompts: Sequence[Messages]) -> list[float]:
        """One reward's scores of several requests, each with an empty response: what a request
        classifier scores. Raises RewardError like `score`."""
        return await self._score_one(name, prompts, [""] * len(prompts))

    async def _score_one(self, name: str, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        reward = self.get(name)
        began = time.perf_counter()
        try:
            if reward.kind == "rule":
                scores, tokens = reward.score_counted(prompts, responses)
            elif reward.served:
                scores, tokens = await asyncio.wait_for(self._score_served(name, reward, prompts, responses),
                                                        self.timeout_s)
            else:
                call = asyncio.wrap_future(self._submit(name, reward, prompts, responses))
                scores, tokens = await asyncio.wait_for(call, self.timeout_s)
            if len(scores) != len(responses) or not all(math.isfinite(x) for x in scores):
                raise RewardError(name, "returned a wrong number of scores or a non-finite score")
        except RewardError:
            self._observe(name, began, False)
            raise
        except asyncio.TimeoutError:
            self._observe(name, began, False)
            raise RewardError(name, f"timed out after {self.timeout_s:g}s") from None
        except Exception as exc:
            self._observe(name, began, False)
            # The detail (an exception's text may hold paths or a remote's answer) goes to the
            # log; the error, which reaches answers and traces, says only what kind it was.
            logger.warning("reward %r failed while scoring", name, exc_info=True)
            raise RewardError(name, f"{type(exc).__name__} while scoring") from exc
        self._observe(name, began, True)
        used = self.usage.setdefault(name, {"sequences": 0, "tokens": 0})
        used["sequences"] += len(responses)
        used["tokens"] += tokens
        return [float(x) for x in scores]

    async def _score_served(self, name: str, reward, prompts: Sequence[Messages], responses: Sequence[str]):
        """A reward served by vLLM batches concurrent calls itself: no thread, the same bound
        on calls held at once; a call stops (and frees its slot) when its request gives up."""
        with self._lock:
            self._pending[name] = self._pending_if_room(name) + 1
        try:
            return await reward.score_async_counted(prompts, responses)
        finally:
            self._release(name)

    def served(self) -> list[Reward]:
        """The rewards scored by vLLM (their engines and clients have a lifecycle)."""
        return [r for r in self.rewards.values() if r.served]

    async def start(self) -> None:
        """Find the checkpoint files of rewards given only a server URL (retrying until it answers)."""
        await asyncio.gather(*(r.start() for r in self.served()))

    async def aclose(self) -> None:
        for reward in self.served():
            await reward.aclose()

    def _submit(self, name: str, reward: Reward, prompts: Sequence[Messages], responses: Sequence[str]) -> Future:
        """Queue one call on the reward's own thread, or raise RewardError at once when its
        queue is full. A call counts until its thread finishes it: a timed-out request stops
        waiting, but the forward it started still occupies the model."""
        with self._lock:
            pending = self._pending_if_room(name)
            executor = self._executors.get(name)
            if executor is None:
                # One worker per model: its forwards run one at a time, never on the event loop.
                executor = self._executors[name] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"reward-{name}")
            future = executor.submit(reward.score_counted, prompts, responses)
            self._pending[name] = pending + 1
        future.add_done_callback(lambda _: self._release(name))
        return future

    def _pending_if_room(self, name: str) -> int:
        """The calls `name` holds, when it may take one more; else RewardError. Under the lock."""
        if self._closed:
            raise RewardError(name, "the server is shutting down")
        pending = self._pending.get(name, 0)
        if pending >= self.max_pending_per_reward:
            raise RewardError(name, f"busy: {pending} calls waiting")
        return pending

    def _release(self, name: str) -> None:
        with self._lock:
            self._pending[name] -= 1

    def pending(self) -> dict[str, int]:
        """Score calls each reward model holds now, running or waiting."""
        with self._lock:
            return dict(self._pending)

    def _observe(self, name: str, began: float, ok: bool) -> None:
        if self.observer is not None:
            self.observer(self.metric_label(name), time.perf_counter() - began, ok)

    def metric_label(self, name: str) -> str:
        """A registered reward by its name (the operator's, a bounded set); a reward a request
        builds (`keyword:<word>`) by its kind, so client words never become new series."""
        return name if name in self.rewards else name.split(":", 1)[0]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            executors = list(self._executors.values())
        for executor in executors:
            executor.shutdown(wait=False, cancel_futures=True)
