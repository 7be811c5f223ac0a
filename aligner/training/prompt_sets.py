"""Labelled prompts for the request classifier (`aligner train-classifier`): reading them,
scoring them as the server does, and the threshold and rates the model card reports.

A prompt source is ``PATH[#SELECT]``. PATH is a prompt file (`.jsonl`, each row a `prompt`
string or MT-Bench `turns`, whose first turn is taken) or a preference file (TRL format: the
first user message of each row). SELECT keeps part of it:

- ``category=NAME`` / ``not-category=NAME``: the rows of (or not of) one `category`;
- ``train=F`` / ``val=F``: of a preference file, the side of `split_by_prompt(rows, F, cap, seed)`
  (the split `aligner train` makes with `--val-fraction F`), so a reward model's validation
  prompts can stay unseen or be the report set.

>>> PromptSource.parse("p.jsonl#not-category=malicious_uses")
PromptSource(path='p.jsonl', key='not-category', value='malicious_uses')
>>> PromptSource.parse("prefs.jsonl.gz#val=0.1").fraction
0.1
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SELECTORS = ("category", "not-category", "train", "val")
# A (request, response) item of a pair file (rows with `prompt` and `response`), kept as one
# string so that de-duplication, hashing and splits treat it like a request.
PAIR_SEP = "\u241e"


@dataclass(frozen=True)
class PromptSource:
    """One `--positive`/`--negative`/`--report-*` argument."""

    path: str
    key: str | None = None
    value: str | None = None

    @classmethod
    def parse(cls, text: str) -> PromptSource:
        path, sep, select = text.partition("#")
        if not sep:
            return cls(path)
        key, eq, value = select.partition("=")
        if not eq or key not in SELECTORS or not value:
            raise ValueError(f"{text!r}: select with #KEY=VALUE, KEY one of {', '.join(SELECTORS)}")
        source = cls(path, key, value)
        if key in ("train", "val") and not 0 < source.fraction < 1:
            raise ValueError(f"{text!r}: a split fraction must be in (0, 1)")
        return source

    @property
    def fraction(self) -> float:
        return float(self.value)

    @property
    def name(self) -> str:
        """A short key for reports: the file name without `.jsonl[.gz]`, plus the selection."""
        name = Path(self.path).name
        for suffix in (".gz", ".jsonl", ".json"):
            name = name.removesuffix(suffix)
        return name if self.key is None else f"{name}#{self.key}={self.value}"


def first_user_text(prompt: Any) -> str | None:
    """The text a request classifier sees: a prompt string, or a conversation's first user turn."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return next((m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"), None)
    return None


def _raw_rows(path: str) -> list[dict]:
    from aligner.training.data import iter_raw_rows

    return [row for row in iter_raw_rows(path) if isinstance(row, dict)]


def load_prompts(source: PromptSource, seed: int) -> list[str]:
    """The distinct, non-empty prompt texts a source selects, in file order."""
    rows = _raw_rows(source.path)
    if rows and "chosen" in rows[0]:  # a preference file: split like the reward trainer does
        from aligner.training.data import DataSpec, load_source, split_by_prompt

        rows, _ = load_source(DataSpec(source.path))
        if source.key in ("train", "val"):
            train, val = split_by_prompt(rows, source.fraction, 10**9, seed)
            rows = train if source.key == "train" else val
    elif source.key in ("train", "val"):
        raise ValueError(f"{source.path}: #train=/#val= select from preference files only")
    if source.key == "category":
        rows = [r for r in rows if r.get("category") == source.value]
    elif source.key == "not-category":
        rows = [r for r in rows if r.get("category") != source.value]
    if rows and "response" in rows[0]:  # (request, response) pairs: an output rail's items
        texts = [pair_item(first_user_text(r.get("prompt")), r.get("response")) for r in rows]
    else:
        texts = [first_user_text(r["prompt"]) if "prompt" in r else (r.get("turns") or [None])[0] for r in rows]
    kept = dict.fromkeys(t.strip() for t in texts if isinstance(t, str) and t.strip())
    if not kept:
        raise ValueError(f"{source.path}: no prompts selected by {source.key}={source.value}")
    return list(kept)


def split_prompts(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val): a seeded `fraction` of `texts` (by a hash of each text, so independent of order).

    >>> train, val = split_prompts([f"p{i}" for i in range(20)], 0.1, 0)
    >>> len(train), len(val), set(train) & set(val)
    (18, 2, set())
    """
    from aligner.training.data import _key

    ordered = sorted(texts, key=lambda t: _key(seed, "classifier", t))
    n_val = round(fraction * len(ordered)) if fraction > 0 else 0
    val = set(ordered[:n_val])
    return [t for t in texts if t not in val], [t for t in texts if t in val]


WRAPPER_SLOT = "{request}"


def load_wrappers(path: str) -> list[str]:
    """The templates of a wrapper file (JSONL, `template` holding `{request}` once), in file order."""
    templates = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        template = json.loads(line).get("template")
        if not isinstance(template, str) or template.count(WRAPPER_SLOT) != 1:
            raise ValueError(f"{path}:{n}: a wrapper's template must hold {WRAPPER_SLOT} exactly once")
        templates.append(template)
    if not templates:
        raise ValueError(f"{path}: no wrappers")
    return templates


def with_wrapped_copies(texts: list[str], templates: list[str], seed: int, exclude: set[str] = frozenset()) -> list[str]:
    """`texts`, then each text wrapped in one template chosen by a seeded hash of the text; a wrapped
    copy already among `texts` or in `exclude` (e.g. a report set) is left out.

    >>> with_wrapped_copies(["Do X."], ["Please: {request}"], 0)
    ['Do X.', 'Please: Do X.']
    """
    from aligner.training.data import _key

    kept = dict.fromkeys(texts)
    for t in texts:
        template = templates[int(_key(seed, "wrapper", t), 16) % len(templates)]
        wrapped = template.replace(WRAPPER_SLOT, t)
        if wrapped not in kept and wrapped not in exclude:
            kept[wrapped] = None
    return list(kept)


def as_messages(text: str) -> list[dict]:
    """A prompt as the one-user-turn request the server's route stage scores."""
    return [{"role": "user", "content": text}]


def pair_item(prompt: str | None, response: str | None) -> str | None:
    """One (request, response) pair as an item.

    >>> split_item(pair_item("q", "a")), split_item("q")
    (('q', 'a'), ('q', ''))
    """
    if not isinstance(prompt, str) or not isinstance(response, str) or not prompt.strip() or not response.strip():
        return None
    return f"{prompt.strip()}{PAIR_SEP}{response.strip()}"


def split_item(item: str) -> tuple[str, str]:
    """(request, response) of an item; a plain request has the empty response."""
    prompt, _, response = item.partition(PAIR_SEP)
    return prompt, response


def encode_prompt(encoder, text: str) -> list[int]:
    """Token ids of an item: a request with an EMPTY response (what the server scores with
    response ""), or a (request, response) pair as the server scores a reward's pair."""
    prompt, response = split_item(text)
    prompt_ids, response_ids = encoder.encode(as_messages(prompt), response)
    return prompt_ids + response_ids


def score_prompts(model, tokenizer, encoder, texts: list[str], batch_size: int = 32) -> list[float]:
    """Raw logits ("harmful") of prompts, each scored as (prompt, "") like a served reward."""
    import torch

    from aligner.rewards.hf import classifier_scores
    from aligner.training.encoding import pad_sequences

    encoded = [encode_prompt(encoder, t) for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    scores = [0.0] * len(encoded)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            padded = pad_sequences([(encoded[i], len(encoded[i])) for i in batch], tokenizer.pad_token_id)
            out = classifier_scores(model, padded["input_ids"], padded["attention_mask"])
            for i, value in zip(batch, out.tolist()):
                scores[i] = value
    return scores


def auc(positive: list[float], negative: list[float]) -> float | None:
    """Probability that a positive outscores a negative (ties count half).

    >>> auc([2.0, 3.0], [1.0, 2.0])
    0.875
    """
    if not positive or not negative:
        return None
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def threshold_for_fpr(positive: list[float], negative: list[float], max_fpr: float) -> float:
    """The lowest score t among the given ones with at most `max_fpr` of `negative` at >= t.

    >>> threshold_for_fpr([5.0, 1.0], [0.0, 2.0, 3.0, -1.0], 0.2)
    5.0
    >>> threshold_for_fpr([5.0, 1.0], [0.0, 2.0, 3.0, -1.0], 0.3)
    3.0
    """
    allowed = math.floor(max_fpr * len(negative) + 1e-9)
    for t in sorted(set(positive) | set(negative)):
        if sum(n >= t for n in negative) <= allowed:
            return t
    return max(positive + negative) + 1.0


def flagged(scores: list[float], threshold: float) -> dict[str, Any]:
    """How many of `scores` are at or above `threshold` (flagged harmful), and the rate."""
    n = sum(s >= threshold for s in scores)
    return {"n": len(scores), "flagged": n, "rate": n / len(scores) if scores else None}


def validation_report(pos: list[float], neg: list[float], threshold: float) -> dict[str, Any]:
    """Accuracy, AUC, recall and false-positive rate of validation scores at `threshold`."""
    tp, fp = sum(s >= threshold for s in pos), sum(s >= threshold for s in neg)
    n = len(pos) + len(neg)
    return {
        "n_harmful": len(pos), "n_benign": len(neg), "auc": auc(pos, neg),
        "accuracy": (tp + len(neg) - fp) / n if n else None,
        "recall": flagged(pos, threshold), "false_positives": flagged(neg, threshold),
    }
