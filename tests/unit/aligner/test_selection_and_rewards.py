"""Selection functions, reward resolution and combination, truncation: fast, no engine."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from aligner.rewards import RewardRegistry, RewardSpecError
from aligner.rewards.rules import KeywordReward, is_refusal, keyword_reward
from aligner.strategies.selection import rank, soft_sample, softmax, top_distinct


def test_rank_breaks_ties_by_lowest_index():
    assert rank([1.0, 3.0, 3.0, 2.0]) == [1, 2, 3, 0]
    assert rank([0.0, 0.0, 0.0]) == [0, 1, 2]


def test_top_distinct_skips_duplicates_then_fills():
    assert top_distinct([5, 5, 4, 1], ["a", "a", "b", "c"], 2) == [0, 2]
    assert top_distinct([5, 5, 4, 1], ["a", "a", "b", "c"], 3) == [0, 2, 3]
    assert top_distinct([5, 4], ["a", "a"], 2) == [0, 1]


def test_softmax_is_stable_and_normalised():
    probs = softmax([1000.0, 1000.0, 0.0], 1.0)
    assert probs[0] == pytest.approx(0.5) and probs[2] == pytest.approx(0.0)
    assert sum(softmax([0.3, -2.0, 4.0], 0.7)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        softmax([1.0], 0.0)


def test_soft_sample_follows_exp_reward_over_lambda():
    scores = [0.0, 1.0, 2.0]
    rng = random.Random(0)
    counts = Counter(soft_sample(scores, 1.0, 1, rng)[0] for _ in range(20000))
    expected = softmax(scores, 1.0)
    for i in range(3):
        assert counts[i] / 20000 == pytest.approx(expected[i], abs=0.015)


def test_soft_sample_is_seeded_distinct_and_sharp_at_small_lambda():
    scores = [0.1, 0.9, 0.5, 0.2]
    assert soft_sample(scores, 0.3, 2, random.Random(7)) == soft_sample(scores, 0.3, 2, random.Random(7))
    picked = soft_sample(scores, 0.3, 4, random.Random(1))
    assert sorted(picked) == [0, 1, 2, 3]
    assert all(soft_sample(scores, 1e-6, 1, random.Random(s)) == [1] for s in range(20))


def test_refusal_detector():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I cannot provide instructions for making weapons.")
    assert not is_refusal("Sure! Here are three tips for staying focused.")


def test_keyword_reward_counts_whole_words_literally():
    reward = keyword_reward("keyword:c++")
    assert isinstance(reward, KeywordReward)
    assert reward.score([[]] * 2, ["I like c++ and C++.", "abc++ is not it"]) == [2.0, 0.0]
    assert keyword_reward("keyword:two words") is None and keyword_reward("keyword:") is None
    assert keyword_reward("keyword:" + "x" * 65) is None and keyword_reward("c++") is None


def registry() -> RewardRegistry:
    reg = RewardRegistry.with_builtins()
    reg.add_from_spec("bang=regex:!")
    return reg


def test_resolve_reward_specs():
    reg = registry()
    assert reg.resolve("bang") == {"bang": 1.0}
    assert reg.resolve({"bang": 2, "length_penalty": 0.5}) == {"bang": 2.0, "length_penalty": 0.5}
    assert reg.resolve({"keyword:Paris": 1}) == {"keyword:Paris": 1.0}


@pytest.mark.parametrize(
    "spec, param",
    [
        ("nope", "alignment.reward.nope"),
        ({"bang": -1}, "alignment.reward.bang"),
        ({"bang": 1e9}, "alignment.reward.bang"),
        ({"bang": True}, "alignment.reward.bang"),
        ({"bang": 0}, "alignment.reward"),
        ({}, "alignment.reward"),
        (None, "alignment.reward"),  # no model registered, so no default
        ({f"keyword:w{i}": 1 for i in range(9)}, "alignment.reward"),
    ],
)
def test_invalid_reward_specs_name_the_parameter(spec, param):
    with pytest.raises(RewardSpecError) as info:
        registry().resolve(spec)
    assert info.value.param == param


def test_duplicate_and_malformed_registration_fail():
    reg = registry()
    with pytest.raises(ValueError):
        reg.add_from_spec("bang=regex:x")
    with pytest.raises(ValueError):
        reg.add_from_spec("just-a-name")


def test_scores_combine_with_weights():
    reg = registry()
    report = asyncio.run(reg.score({"bang": 2.0, "length_penalty": 1.0}, [{"role": "user", "content": "hi"}],
                                   ["wow!!", "a b c d"]))
    assert report.per_reward["bang"] == [2.0, 0.0]
    assert report.per_reward["length_penalty"] == [-0.01, -0.04]
    assert report.total == pytest.approx([4.0 - 0.01, -0.04])
    reg.close()


def test_reward_model_truncates_the_prompt_from_the_left_and_keeps_the_response(tiny_reward_dir):
    """The training encoder's rule (`PairEncoder`), which the server shares."""
    from aligner.rewards.hf import SequenceClassifierReward

    reward = SequenceClassifierReward("tiny", tiny_reward_dir, max_length=64)
    long_prompt = [{"role": "user", "content": "blah " * 200 + "QUESTION"}]
    response = "the final answer"
    ids = reward.encode(long_prompt, response)
    text = reward.tokenizer.decode(ids)
    assert len(ids) == 64 and reward.truncated == 1
    assert text.rstrip().endswith("the final answer<|im_end|>")
    assert "QUESTION" in text and "blah " * 10 in text and "blah " * 200 not in text
    # Short pairs are untouched, and batching (with padding) does not change a score.
    short = [{"role": "user", "content": "hi"}]
    alone = reward.score([short], ["hello there"])[0]
    batched = reward.score([short, long_prompt, short], ["hello there", response, "a much longer answer " * 5])
    assert batched[0] == pytest.approx(alone, abs=1e-4)


def test_reward_stats_normalise_scores(tiny_reward_dir, tmp_path):
    import json
    import shutil

    from aligner.rewards.hf import STATS_FILE, SequenceClassifierReward

    raw = SequenceClassifierReward("a", tiny_reward_dir).score([[{"role": "user", "content": "q"}]], ["r"])[0]
    copy = tmp_path / "rm"
    shutil.copytree(tiny_reward_dir, copy)
    (copy / STATS_FILE).write_text(json.dumps({"mean": 1.5, "std": 2.0}))
    normed = SequenceClassifierReward("b", copy).score([[{"role": "user", "content": "q"}]], ["r"])[0]
    assert normed == pytest.approx((raw - 1.5) / 2.0, abs=1e-5)
