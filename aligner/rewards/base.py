"""What every reward looks like to a strategy: score (conversation, response) pairs."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

Messages = Sequence[dict[str, str]]


class Reward(ABC):
    """A scalar reward over (prompt messages, assistant response) pairs.

    `score` is synchronous and may be CPU/GPU heavy: the scorer calls it off the event loop.
    """

    name: str
    kind: str  # "model" or "rule"
    description: str = ""
    version: str | None = None  # a model's checkpoint fingerprint (`checkpoint_version`); rules have none
    spec: str | None = None  # the `--reward-model` spec it was built from, if any
    # Scored by a vLLM engine or server (`aligner.rewards.served.ServedReward`): `score_async`,
    # and a lifecycle (`start`, `state`, `aclose`) that lives with the server.
    served: bool = False
    checkpoint: Path | None = None  # a model's checkpoint folder (what `version` fingerprints)
    threshold: float | None = None  # a classifier's decision threshold, recorded with its model
    # Parameters a forward multiplies each token by (`decoding.model_refs.matmul_parameters`):
    # about 2x this many FLOPs per scored token. None for rules, or where it is not known.
    matmul_parameters: int | None = None

    @abstractmethod
    def score(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        """Raw scores, one per pair, already normalised where the reward knows its statistics."""

    def score_counted(self, prompts: Sequence[Messages], responses: Sequence[str]) -> tuple[list[float], int]:
        """`score`, and the tokens its forwards read (0 for a reward without a model)."""
        return self.score(prompts, responses), 0

    def describe(self) -> dict:
        described = {"name": self.name, "kind": self.kind, "description": self.description}
        return {**described, "version": self.version} if self.version else described


UNVERSIONED = ("README.md", "eval.json")  # the card and its report: rewriting them changes no score


def checkpoint_version(path: str | Path) -> str:
    """A short fingerprint of a checkpoint directory: its files' names, sizes and modification
    times (not their bytes: a multi-gigabyte checkpoint is fingerprinted at once). Replacing or
    rewriting any file that scoring reads gives a new version; the model card does not."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in UNVERSIONED):
        stat = file.stat()
        digest.update(f"{file.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]
