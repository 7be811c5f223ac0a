"""The speculative-rejection replay used to tune the strategy (bench/search_replay.py)."""

from __future__ import annotations

from bench.search_replay import Sample, replay, spearman


def sample(length, score, prefix):
    return Sample(length, score, {t: prefix for t in range(8, length, 8)})


def test_replay_rejects_by_prefix_score_and_keeps_early_finishers():
    samples = [
        sample(40, 5.0, prefix=0.0),  # best answer, weak start: rejected at the first round
        sample(8, 3.0, prefix=9.0),   # finishes in the first chunk: stays in the running
        sample(40, 1.0, prefix=2.0),
        sample(40, 2.0, prefix=1.0),
    ]
    reward, tokens = replay(samples, chunk=8, rate=0.5, survivors=1, budget=40)
    # Round 1 (8 tokens): #1 finished; of #0, #2, #3 one is stopped (floor(1.5) = 1), the
    # lowest prefix (#0). Round 2 (16): #2, #3 -> #2 kept; it runs to the end alone.
    assert tokens == 8 * 4 + 8 * 2 + (40 - 16)
    assert reward == 3.0  # the early finisher beats the survivor


def test_replay_with_no_rejection_is_best_of_n():
    samples = [sample(24, s, prefix=-s) for s in (1.0, 4.0, 2.0)]
    assert replay(samples, chunk=8, rate=0.0, survivors=1, budget=24) == (4.0, 72)


def test_spearman():
    assert spearman([1, 2, 3], [10, 20, 30]) == 1.0
    assert spearman([1, 2, 3], [3, 2, 1]) == -1.0
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert spearman([1, 1, 2], [1, 1, 2]) == 1.0  # ties share their average rank
