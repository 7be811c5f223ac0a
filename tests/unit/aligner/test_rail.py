"""The output rail (`aligner.rail`) over the in-memory engine: what it checks, where it stops an
answer, what a stream sends, and how a request configures it. The real rail model through the
real server is in tests/integration/test_rail_integration.py."""

from __future__ import annotations

import pytest

from aligner.alignment import AlignmentError, resolve_alignment
from aligner.rail import CONTENT_FILTER, REFUSAL, boundaries
from aligner.rewards import Reward, RewardError, RewardRegistry
from aligner.strategies import KeepAlive, StrategyContext, StrategyLimits, StrategyResult
from decoding.engine import SamplingConfig, SequenceDelta
from tests.fakes import FakeEngine

MESSAGES = [{"role": "user", "content": "tell me things"}]
BAD_WORD = "w0_20"  # the 21st word of choice 0; choice 1 never says it


class WordRail(Reward):
    """A rail model that scores 1 for a window holding BAD_WORD, else 0; threshold 0.5."""

    name = "word-rail"
    kind = "classifier"
    description = "flags one word"
    threshold = 0.5

    def __init__(self):
        self.windows: list[str] = []
        self.prompts: list = []

    def score(self, prompts, responses):
        self.prompts.extend(prompts)
        self.windows.extend(responses)
        return [1.0 if BAD_WORD in r.split() else 0.0 for r in responses]


class FailingRail(WordRail):
    name = "failing-rail"

    def score(self, prompts, responses):
        raise RewardError(self.name, "down")


def context(n: int = 2, max_tokens: int = 40) -> tuple[StrategyContext, WordRail, FakeEngine]:
    engine = FakeEngine(max_model_len=4096)
    rewards = RewardRegistry.with_builtins()
    rail = WordRail()
    rewards.add(rail)
    rewards.add(FailingRail())
    ctx = StrategyContext(engine=engine, rewards=rewards, request_id="chatcmpl-rail", messages=list(MESSAGES),
                          prompt_ids=engine.tokenizer.encode_chat(MESSAGES),
                          sampling=SamplingConfig(max_tokens=max_tokens, n=n, temperature=1.0, seed=1),
                          limits=StrategyLimits(), keepalive_s=0.001)
    return ctx, rail, engine


def resolved(ctx, rail: dict | None, strategy: str = "none"):
    alignment = {"strategy": strategy, **({"rail": rail} if rail is not None else {})}
    return resolve_alignment(alignment, None, None, "none", ctx)


def words(i: int, count: int) -> str:
    return "".join(f"w{i}_{k} " for k in range(count))


async def test_a_whole_answer_that_fails_a_window_is_replaced_whole():
    ctx, rail, _ = context()
    result = await resolved(ctx, {"model": "word-rail", "every_words": 16}).run(ctx)
    stopped, clean = result.choices
    # Checked at 16, 32 and 40 words; the window ending at 32 holds w0_20. Nothing was sent, so
    # the words before it (which passed their own check) go too: no "complies, then refuses".
    assert stopped.text == REFUSAL and stopped.finish_reason == CONTENT_FILTER
    assert clean.text == words(1, 40) and clean.finish_reason == "length"
    assert result.info["rail"] == {"model": "word-rail", "threshold": 0.5, "checks": 6, "max_score": 1.0,
                                   "stopped": [0]}
    assert [s.stage for s in result.stages][-1] == "rail"
    # The rail reads the request's last user turn and at most window_words (48) words.
    assert rail.prompts[0] == MESSAGES and all(len(w.split()) <= 48 for w in rail.windows)


async def test_a_stream_never_sends_a_window_that_fails_and_stops_the_decoding():
    ctx, _, engine = context(n=1)
    events = [e async for e in resolved(ctx, {"model": "word-rail", "every_words": 16}).stream(ctx)]
    *deltas, result = [e for e in events if not isinstance(e, KeepAlive)]
    assert isinstance(result, StrategyResult) and all(isinstance(d, SequenceDelta) for d in deltas)
    sent = "".join(d.text for d in deltas)
    assert BAD_WORD not in sent.split()
    assert sent == words(0, 16) + REFUSAL and deltas[-1].finish_reason == CONTENT_FILTER
    assert result.choices[0].text == sent and result.info["rail"]["stopped"] == [0]
    # Every choice stopped: the decoding was aborted before its 40 tokens.
    (request,) = engine.requests
    assert request.aborted and request.completion_tokens < 40


async def test_a_clean_stream_is_sent_unchanged():
    ctx, _, _ = context(n=2)
    railed = [e async for e in resolved(ctx, {"model": "word-rail", "every_words": 16}).stream(ctx)]
    ctx2, _, _ = context(n=2)
    plain = [e async for e in resolved(ctx2, None).stream(ctx2)]

    def text(events, i):
        return "".join(e.text for e in events if isinstance(e, SequenceDelta) and e.index == i)

    assert text(railed, 1) == text(plain, 1) == words(1, 40)
    assert railed[-1].info["rail"]["stopped"] == [0]


async def test_a_failing_rail_model_lets_the_answer_through_and_says_so():
    ctx, _, _ = context(n=1)
    result = await resolved(ctx, {"model": "failing-rail"}).run(ctx)
    assert result.choices[0].text == words(0, 40) and result.info["rail"]["stopped"] == []
    assert "failed" in result.info["rail"]["error"]


@pytest.mark.parametrize(("rail", "param"), [
    ({"model": "nope"}, "alignment.rail.model"),
    ({"model": "refusal"}, "alignment.rail.threshold"),  # a rule records no threshold
    ({"model": "word-rail", "every_words": 1}, "alignment.rail.every_words"),
    ({"model": "word-rail", "first_words": 64}, "alignment.rail.first_words"),  # past window_words (48)
    ({"model": "word-rail", "every_words": 64}, "alignment.rail.window_words"),  # words 49-64 unread
    ({"model": "word-rail", "every_words": 32, "window_words": 24}, "alignment.rail.window_words"),
    ({"model": "word-rail", "surprise": 1}, "alignment.rail.surprise"),
    ("word-rail", "alignment.rail"),
])
def test_a_bad_rail_names_its_parameter(rail, param):
    ctx, _, _ = context()
    with pytest.raises(AlignmentError) as caught:
        resolved(ctx, rail)
    assert caught.value.param == param, str(caught.value)


def test_boundaries_end_at_the_answer():
    assert boundaries("a " * 16, 16) == [16] and boundaries("a b c", 16) == [3]


async def test_first_words_holds_the_opening_back_until_a_longer_first_check():
    # every_words 16 alone sends words 1-16 before the window holding w0_20 fails (test above);
    # first_words 32 holds them back: the first check reads words 1-32, fails, nothing was sent.
    ctx, rail, _ = context(n=1)
    events = [e async for e in resolved(ctx, {"model": "word-rail", "every_words": 16, "first_words": 32}).stream(ctx)]
    deltas = [e for e in events if isinstance(e, SequenceDelta)]
    assert "".join(d.text for d in deltas) == REFUSAL and deltas[-1].finish_reason == CONTENT_FILTER
    assert len(rail.windows[0].split()) == 32


async def test_first_words_leaves_a_clean_stream_unchanged():
    ctx, _, _ = context(n=2)
    railed = [e async for e in resolved(ctx, {"model": "word-rail", "first_words": 48}).stream(ctx)]
    assert "".join(e.text for e in railed if isinstance(e, SequenceDelta) and e.index == 1) == words(1, 40)

