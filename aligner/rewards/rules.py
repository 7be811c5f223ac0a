"""Built-in rule rewards: simple direct feedback usable by name, no checkpoint needed.

Requests may only pick rules by name (plus a literal keyword); patterns are registered by
the operator at start, so no client can send a regular expression (ReDoS) or code.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from aligner.rewards.base import Messages, Reward

# "I can't wait to share", "I can't stress enough": idioms, not refusals.
_NOT_IDIOM = r"\b(?!\s+(?:wait|stress|believe|imagine|help but|emphasi[sz]e|thank|recommend \w+ enough))"
# Phrases that open or carry a refusal in assistant answers; matched case-insensitively.
REFUSAL_PATTERNS = [
    r"\bI(?:'m| am) (?:sorry|afraid)\b",
    rf"\bI (?:cannot|can't|can not|won't|will not|must decline|refuse to){_NOT_IDIOM}",
    r"\bI(?:'m| am) (?:unable|not able|not comfortable|not going) to\b",
    r"\b(?:cannot|can't|won't) (?:help|assist|provide|comply)\b",
    r"\bas an AI\b",
    r"\b(?:illegal|unethical|harmful) (?:and|or) (?:illegal|unethical|harmful|dangerous)\b",
    r"\bI (?:strongly )?(?:advise|urge) (?:you )?against\b",
]
_REFUSAL_RE = re.compile("|".join(REFUSAL_PATTERNS), re.IGNORECASE)
# The ones that decline: an apology ("I'm sorry for any confusion"), "as an AI" or a warning
# alone is not a refusal when it opens an answer.
DECLINE_PATTERNS = [
    rf"\bI (?:cannot|can't|can not|won't|will not|must decline|refuse to){_NOT_IDIOM}",
    r"\bI(?:'m| am) (?:unable|not able|not comfortable|not going) to\b",
    r"\b(?:cannot|can't|won't) (?:help|assist|provide|comply)\b",
    r"\bI (?:must|have to) (?:decline|refuse)\b",
]
_DECLINE_RE = re.compile("|".join(DECLINE_PATTERNS), re.IGNORECASE)
MAX_KEYWORD_LEN = 64


# Words of an answer that count as its opening: a refusal stated later ("this is illegal, but
# here is how ... so I can't recommend it") does not decline the request.
OPENING_WORDS = 30


def normalise(text: str) -> str:
    """Curly apostrophes as straight ones: "I’m unable to" reads as "I'm unable to"."""
    return text.replace("\u2019", "'").replace("\u2018", "'")


def is_refusal(text: str) -> bool:
    """
    >>> is_refusal("I’m unable to share that."), is_refusal("I refuse to write it.")
    (True, True)
    >>> is_refusal("I can't wait to share this recipe!")
    False
    """
    return bool(_REFUSAL_RE.search(normalise(text)))


def opening(text: str, words: int = OPENING_WORDS) -> str:
    """The answer's first sentence, at most `words` words.

    >>> opening("I can't help with that. Here is why: it is illegal.")
    "I can't help with that."
    >>> opening("Sure! " + "word " * 50).count(" ")
    0
    """
    head = " ".join(text.split()[:words])
    match = re.search(r"[.!?](?=\s|$)", head)
    return head[: match.end()] if match else head


def refuses_in_opening(text: str) -> bool:
    """A strict refusal: the answer's opening sentence declines.

    >>> refuses_in_opening("I'm sorry, but I can't help with hacking.")
    True
    >>> refuses_in_opening("Step 1: get the tools. I can't stress enough how illegal this is.")
    False
    >>> refuses_in_opening("I'm sorry for any confusion. Here is the recipe.")
    False
    """
    return bool(_DECLINE_RE.search(opening(normalise(text))))


class RegexCountReward(Reward):
    """Number of matches of an operator-given pattern (capped), e.g. a house style check."""

    kind = "rule"

    def __init__(self, name: str, pattern: str, cap: int = 10, description: str | None = None):
        self.name = name
        self.pattern = re.compile(pattern, re.IGNORECASE)
        self.cap = cap
        self.description = description or f"count of matches of /{pattern}/ (capped at {cap})"

    def score(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        return [float(min(self.cap, len(self.pattern.findall(r)))) for r in responses]


class KeywordReward(RegexCountReward):
    """`keyword:<word>`: whole-word occurrences of a literal word, usable from a request."""

    def __init__(self, word: str):
        super().__init__(
            f"keyword:{word}",
            rf"(?<!\w){re.escape(word)}(?!\w)",
            description=f"occurrences of the word {word!r} (capped at 10)",
        )


class RefusalReward(Reward):
    kind = "rule"

    def __init__(self, name: str = "refusal", reward_refusal: bool = True, strict: bool = False):
        self.name = name
        self.reward_refusal = reward_refusal
        self.detect = refuses_in_opening if strict else is_refusal
        where = "in its opening sentence" if strict else ""
        self.description = (
            f"1 when the answer refuses{' ' + where if where else ''}, else 0" if reward_refusal
            else "1 when the answer does not refuse, else 0"
        )

    def score(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        return [float(self.detect(r) == self.reward_refusal) for r in responses]


class LengthPenaltyReward(Reward):
    kind = "rule"
    name = "length_penalty"
    description = "minus the answer's word count / 100 (prefers shorter answers)"

    def score(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        return [-len(r.split()) / 100.0 for r in responses]


def builtin_rules() -> list[Reward]:
    return [RefusalReward("refusal", True), RefusalReward("refusal_opening", True, strict=True),
            RefusalReward("compliance", False), LengthPenaltyReward()]


def keyword_reward(name: str) -> Reward | None:
    """`keyword:<word>` -> its reward, None if `name` is not a valid keyword reference."""
    if not name.startswith("keyword:"):
        return None
    word = name.removeprefix("keyword:")
    if not word or len(word) > MAX_KEYWORD_LEN or any(c.isspace() for c in word):
        return None
    return KeywordReward(word)
