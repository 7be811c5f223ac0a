"""Rewards registered at start, the weighted combinations requests ask for, and scoring
off the event loop."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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
    # Called after each reward call with (name, seconds, ok); the server feeds metrics from it.
    observer: Callable[[str, float, bool], None] | None = None
    _executor: ThreadPoolExecutor | None = None

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

    def add_from_spec(self, spec: str, **model_kwargs) -> Reward:
        """`NAME=PATH` (a checkpoint directory) or `NAME=regex:PATTERN` (a rule)."""
        name, sep, target = spec.partition("=")
        if not sep or not name or not target:
            raise ValueError(f"--reward-model expects NAME=PATH or NAME=regex:PATTERN, got {spec!r}")
        if target.startswith("regex:"):
            reward: Reward = RegexCountReward(name, target.removeprefix("regex:"))
        else:
            from aligner.rewards.hf import SequenceClassifierReward

            reward = SequenceClassifierReward(name, target, **model_kwargs)
        self.add(reward)
        return reward

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
        """Score responses to one prompt with every named reward, off the event loop."""
        if self._executor is None:
            # One worker: reward forwards run one at a time, never on the event loop.
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        per_reward: dict[str, list[float]] = {}
        prompts = [prompt] * len(responses)
        for name in weights:
            reward = self.get(name)
            began = time.perf_counter()
            try:
                if reward.kind == "rule":
                    scores = reward.score(prompts, responses)
                else:
                    call = loop.run_in_executor(self._executor, reward.score, prompts, responses)
                    scores = await asyncio.wait_for(call, self.timeout_s)
                if len(scores) != len(responses) or not all(math.isfinite(x) for x in scores):
                    raise ValueError("returned a wrong number of scores or a non-finite score")
            except asyncio.TimeoutError:
                self._observe(name, began, False)
                raise RewardError(name, f"timed out after {self.timeout_s:g}s") from None
            except Exception as exc:
                self._observe(name, began, False)
                raise RewardError(name, f"{type(exc).__name__}: {exc}") from exc
            self._observe(name, began, True)
            per_reward[name] = [float(x) for x in scores]
        total = [sum(weights[n] * per_reward[n][i] for n in weights) for i in range(len(responses))]
        return ScoreReport(total, per_reward, dict(weights), time.perf_counter() - start)

    def _observe(self, name: str, began: float, ok: bool) -> None:
        if self.observer is not None:
            self.observer(self.metric_label(name), time.perf_counter() - began, ok)

    def metric_label(self, name: str) -> str:
        """A registered reward by its name (the operator's, a bounded set); a reward a request
        builds (`keyword:<word>`) by its kind, so client words never become new series."""
        return name if name in self.rewards else name.split(":", 1)[0]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
