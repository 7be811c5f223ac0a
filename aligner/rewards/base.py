"""What every reward looks like to a strategy: score (conversation, response) pairs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

Messages = Sequence[dict[str, str]]


class Reward(ABC):
    """A scalar reward over (prompt messages, assistant response) pairs.

    `score` is synchronous and may be CPU/GPU heavy: the scorer calls it off the event loop.
    """

    name: str
    kind: str  # "model" or "rule"
    description: str = ""

    @abstractmethod
    def score(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        """Raw scores, one per pair, already normalised where the reward knows its statistics."""

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "description": self.description}
