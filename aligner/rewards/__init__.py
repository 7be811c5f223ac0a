"""Reward models and rule rewards that strategies score candidates with."""

from aligner.rewards.base import Reward
from aligner.rewards.registry import RewardError, RewardRegistry, RewardSpecError, ScoreReport

__all__ = ["Reward", "RewardError", "RewardRegistry", "RewardSpecError", "ScoreReport"]
