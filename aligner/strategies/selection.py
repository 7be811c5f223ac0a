"""Pure selection functions over candidate scores (no engine, no rewards)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def rank(scores: Sequence[float]) -> list[int]:
    """Indices from best to worst; ties go to the lower index, so results are reproducible.

    >>> rank([0.5, 2.0, 2.0, -1.0])
    [1, 2, 0, 3]
    """
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def top_distinct(scores: Sequence[float], texts: Sequence[str], k: int) -> list[int]:
    """The k best candidates with distinct texts; repeats fill up only if too few are distinct.

    >>> top_distinct([3.0, 3.0, 1.0], ["a", "a", "b"], 2)
    [0, 2]
    >>> top_distinct([3.0, 3.0], ["a", "a"], 2)
    [0, 1]
    """
    order = rank(scores)
    seen: set[str] = set()
    picked = []
    for i in order:
        if texts[i] not in seen:
            seen.add(texts[i])
            picked.append(i)
    picked += [i for i in order if i not in picked]
    return picked[:k]


def softmax(scores: Sequence[float], temperature: float) -> list[float]:
    """exp(r / temperature), normalised; stable for large rewards.

    >>> [round(p, 3) for p in softmax([0.0, math.log(3.0)], 1.0)]
    [0.25, 0.75]
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    top = max(scores)
    weights = [math.exp((s - top) / temperature) for s in scores]
    total = sum(weights)
    return [w / total for w in weights]


def soft_sample(scores: Sequence[float], temperature: float, k: int, rng: random.Random) -> list[int]:
    """Draw k distinct indices, each draw with probability proportional to exp(r/temperature)
    among those not drawn yet."""
    remaining = list(range(len(scores)))
    picked = []
    for _ in range(min(k, len(scores))):
        probs = softmax([scores[i] for i in remaining], temperature)
        x, acc = rng.random(), 0.0
        choice = remaining[-1]
        for i, p in zip(remaining, probs):
            acc += p
            if x < acc:
                choice = i
                break
        picked.append(choice)
        remaining.remove(choice)
    return picked


def clear_lead(scores: Sequence[float], k: int, margin: float) -> bool:
    """Whether the k best scores lead every other by at least `margin` (adaptive best-of-N's
    stopping rule: another candidate would have to beat the k-th best by that much).

    >>> clear_lead([0.1, 2.5, 0.9], 1, 1.5)
    True
    >>> clear_lead([0.1, 2.5, 1.2], 1, 1.5)
    False
    >>> clear_lead([3.0], 1, 1.5)  # nothing to lead yet
    False
    """
    if len(scores) <= k:
        return False
    ordered = sorted(scores, reverse=True)
    return ordered[k - 1] - ordered[k] >= margin
