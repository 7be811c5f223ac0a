"""`decline`: a refusal that is a behaviour, not a phrase: the answer declines and stops.

A 135M model asked to open with "I'm sorry, but I can't help with that" often goes on to do
what it was asked ("...: To make a pipe bomb, just fill ..."). Selecting by the opening alone
rewards the phrase. This stage reads each candidate *whole*: it keeps the clause that declines
(it must come first) and at most one later sentence that only suggests something safe, and
cuts everything else, whatever follows. A candidate that does not open by declining is
rejected; with no candidate left, the answer is `fallback_text`. So the client gets a decline,
an optional safe suggestion, and nothing that serves the request.

Meant as the last stage of a safety branch (`route.flagged`), after a template (`urial
safety`) that asks for a refusal. The checks here steer answers: a bench must judge them with
another function (`bench.refusal_judge`).
"""

from __future__ import annotations

import re

from pydantic import Field

from aligner.strategies.base import Candidate, Strategy, StrategyContext, StrategyParams, StrategyResult, register
from aligner.strategies.common import check_n, generate_candidates

FALLBACK = "I'm sorry, but I can't help with that."
# The opening words a decline must sit in.
DECLINE_WITHIN_WORDS = 12
_DECLINE = re.compile(
    r"\bI(?:'m| am)?\s*(?:not able to|unable to|can(?:not|'t| not)|won't|will not|must (?:decline|refuse)|"
    r"refuse to|(?:do not|don't) feel comfortable)\b"
    r"(?!\s+(?:wait|stress|believe|imagine|help but|emphasi[sz]e|thank|recommend \w+ enough))",
    re.IGNORECASE,
)
# What may come before the decline in its own sentence: "Sorry! I can't ...".
_APOLOGY = re.compile(r"\b(?:I'm |I am )?(?:so |very |really |truly )?(?:sorry|apologies|unfortunately)\b[,.!]*",
                      re.IGNORECASE)
# A later sentence that only points elsewhere: it may stay, if it carries none of `_CONTENT`.
_SUGGESTION = re.compile(
    r"^(?:instead|if you|please|you (?:can|could|might|may)|consider|i(?:'d| would) be (?:happy|glad)|"
    r"i can help|perhaps|it(?:'s| is) (?:best|better|important|always)|for (?:help|support)|"
    r"if you(?:'re| are))\b",
    re.IGNORECASE,
)
_CONTENT = re.compile(
    r"(?:\bhere(?:'s| is| are)\b|\bstep\s*\d|\bfirst,|\bto (?:make|build|create|get|obtain|hack|steal)\b|"
    r"\byou(?:'ll| will) need\b|\bingredients\b|\bfollow these\b|:\s*\S|\d\.\s)",
    re.IGNORECASE,
)
_CLAUSE_END = re.compile(r"[.!?:;\n]|\s[-\u2013\u2014]\s")
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")
MAX_SUGGESTION_WORDS = 40


def normalise(text: str) -> str:
    """Curly apostrophes as straight ones, so one pattern reads both."""
    return text.replace("\u2019", "'").replace("\u2018", "'")


def declined(text: str) -> str | None:
    """The answer cut to its declining clause and at most one safe suggestion; None when the
    answer does not open by declining.

    >>> declined("I'm sorry, but I can't help with that: To make a pipe bomb, fill the barrel")
    "I'm sorry, but I can't help with that."
    >>> declined("I can't help with that. If you are in danger, please call 911. Step 1: buy")
    "I can't help with that. If you are in danger, please call 911."
    >>> declined("Sure! Here is how. I can't help with the rest.") is None
    True
    >>> declined("I\u2019m unable to help with this request.")
    "I'm unable to help with this request."
    """
    text = normalise(text).strip()
    match = _DECLINE.search(text)
    if match is None:
        return None
    before = _APOLOGY.sub("", text[:match.start()])
    if len(before.split()) > DECLINE_WITHIN_WORDS or re.search(r"[.!?:\n]", before):
        return None  # something came before the decline
    end = _CLAUSE_END.search(text, match.end())
    clause = text[:end.start() if end else len(text)].rstrip(" ,") + "."
    rest = text[end.end():] if end and text[end.start()] in ".!?\n" else ""
    for sentence in _SENTENCE.findall(rest)[:2]:
        sentence = sentence.strip()
        if (_SUGGESTION.match(sentence) and not _CONTENT.search(sentence)
                and len(sentence.split()) <= MAX_SUGGESTION_WORDS and sentence.endswith((".", "!"))):
            return f"{clause} {sentence}"
    return clause


class DeclineParams(StrategyParams):
    n: int = Field(default=4, ge=1, description="candidates to sample; the first that declines is kept")
    max_tokens: int = Field(default=64, ge=8, le=256, description="tokens each candidate may take at most")
    fallback_text: str = Field(default=FALLBACK, min_length=1, max_length=300,
                               description="the answer when no candidate declines")


@register
class DeclineStrategy(Strategy):
    name = "decline"
    description = ("Decline and stop: sample n candidates, keep the first that opens by declining, cut to the "
                   "decline and at most one safe suggestion; a fixed refusal when none declines.")
    Params = DeclineParams
    refuses = {"logprobs": "cuts answers or replaces them with a fixed refusal, which carries no logprobs",
               "structured": "answers with a refusal in plain text, which no requested format can hold"}

    def check(self, params: DeclineParams, ctx: StrategyContext) -> DeclineParams:
        check_n(params.n, ctx)
        return params

    def sequences(self, params, ctx: StrategyContext) -> int:
        return params.n

    async def run(self, ctx: StrategyContext, params: DeclineParams) -> StrategyResult:
        candidates, report = await generate_candidates(
            ctx, params.n, max_tokens=min(ctx.sampling.max_tokens, params.max_tokens))
        kept = [(c, cut) for c in candidates if (cut := declined(c.text)) is not None]
        choices = []
        for i in range(ctx.num_choices):
            # A cut answer or the fixed one is not the engine's token sequence: no token ids.
            if i < len(kept):
                candidate, text = kept[i]
                whole = text == candidate.text
                choices.append(Candidate(i, text, candidate.token_ids if whole else [], candidate.finish_reason
                                         if whole else "stop"))
            else:
                choices.append(Candidate(i, params.fallback_text, [], "stop"))
        info = {"decline": {"candidates": len(candidates), "declined": len(kept),
                            "fallback": max(0, ctx.num_choices - len(kept))}}
        return StrategyResult(choices=choices, stages=[report], candidates=candidates if params.return_candidates
                              else [], info=info)
