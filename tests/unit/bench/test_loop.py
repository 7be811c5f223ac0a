"""The pure parts of `bench.loop`: the simulated user's rule, the prompt pool and its split, the
bootstrap interval. No server."""

from __future__ import annotations

import numpy as np
import pytest

from bench.loop import ConciseUser, bootstrap_ci, judge, prompt_pool, split_prompts


def answer(n_words: int) -> str:
    return " ".join(f"w{i}" for i in range(n_words))


@pytest.mark.parametrize(("n_words", "stars"), [
    (0, 1), (2, 1),  # not an answer
    (3, 5), (30, 5),  # short enough
    (31, 5), (41, 5), (42, 4), (75, 3), (97, 2), (108, 2), (109, 1), (120, 1), (400, 1),  # linear, rounded
])
def test_the_rating_falls_from_5_at_30_words_to_1_at_120(n_words, stars):
    assert ConciseUser().rating(answer(n_words)) == stars


def test_the_rating_never_rises_with_length_past_the_floor():
    user = ConciseUser()
    utilities = [user.utility(answer(n)) for n in range(3, 200)]
    assert all(a >= b for a, b in zip(utilities, utilities[1:]))
    assert utilities[0] == 5.0 and utilities[-1] == 1.0


def test_the_favourite_is_the_best_rated_then_the_shorter_then_the_lower_index():
    user = ConciseUser()
    candidates = [{"index": 0, "text": answer(80)}, {"index": 1, "text": answer(25)},
                  {"index": 2, "text": answer(20)}, {"index": 3, "text": answer(20)}, {"index": 4, "text": "ok"}]
    assert user.favourite(candidates) == 2  # 20 words ties 25 on stars, wins on length; index 2 before 3
    # The index field counts, not the position in the list.
    assert user.favourite([{"index": 7, "text": answer(90)}, {"index": 5, "text": answer(60)}]) == 5
    # Among long answers it still prefers the shorter one (utility, not rounded stars).
    assert user.favourite([{"index": 0, "text": answer(100)}, {"index": 1, "text": answer(95)}]) == 1


def test_the_pool_is_a_few_hundred_distinct_instructions():
    pool = prompt_pool()
    assert 200 <= len(pool) == len(set(pool))
    assert all(p.strip() and "{" not in p for p in pool)


def test_the_split_is_disjoint_deterministic_and_independent_of_the_pools_order():
    pool = prompt_pool()
    feedback, held_out = split_prompts(pool, 200)
    assert len(feedback) == len(held_out) == 100
    assert not set(feedback) & set(held_out) and set(feedback) | set(held_out) <= set(pool)
    assert split_prompts(list(reversed(pool)), 200) == (feedback, held_out)
    assert split_prompts(pool, 200, seed=1) != (feedback, held_out)
    # Fewer requests take a prefix of the same order: a smaller run is a subset of a bigger one.
    small_feedback, small_held_out = split_prompts(pool, 40)
    assert small_feedback == feedback[:20] and small_held_out == held_out[:20]


def test_the_split_refuses_more_prompts_than_the_pool_has_and_drops_duplicates():
    with pytest.raises(ValueError, match="3 distinct"):
        split_prompts(["a", "b", "a", "c"], 4)
    feedback, held_out = split_prompts(["a", "a", "b", "b"], 2)
    assert sorted(feedback + held_out) == ["a", "b"]


def test_bootstrap_interval_by_hand():
    assert bootstrap_ci([4.0] * 10) == (4.0, 4.0, 4.0)
    assert bootstrap_ci([0.0, 1.0, 1.0, 2.0]) == (1.0, 0.25, 1.75)  # seed 0, 2000 resamples
    mean, low, high = bootstrap_ci(np.r_[np.ones(50), np.zeros(50)])
    assert mean == 0.5 and low == pytest.approx(0.5 - 1.96 * 0.05, abs=0.02) and high == pytest.approx(0.6, abs=0.02)
    assert bootstrap_ci([1.0, 2.0, 3.0], seed=0) == bootstrap_ci([1.0, 2.0, 3.0], seed=0)
    assert np.isnan(bootstrap_ci([])[0])


def test_judge_reads_answers_and_candidates():
    user = ConciseUser()
    best_of_n = {"choices": [{"message": {"content": answer(10)}}],
                 "alignment": {"candidates": [{"index": 0, "text": answer(10)}, {"index": 1, "text": answer(120)}]}}
    plain = {"choices": [{"message": {"content": answer(75)}}]}
    fallback = {**best_of_n, "alignment": {**best_of_n["alignment"], "fallback": {"reason": "timeout"}}}
    rows = judge(user, [best_of_n, plain, fallback])
    assert rows["rating"] == [5, 3, 5] and rows["words"] == [10, 75, 10]
    assert rows["candidate_words"] == [65.0, 75.0, 65.0] and rows["candidate_rating"] == [3.0, 3.0, 3.0]
    assert rows["favourite_rating"] == [5, 3, 5] and rows["fallbacks"] == 1
