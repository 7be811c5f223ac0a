"""Preference pairs from the store's feedback, for the next reward model (issue 25).

    aligner export-prefs --store URL --out prefs.jsonl.gz [--since 2025-06-01] [--min-margin 0.5]
    aligner train --kind bt --data prefs.jsonl.gz ...

Rows are TRL's conversational preference format, as `aligner.training.data` reads them:
``prompt`` (the stored conversation), ``chosen`` and ``rejected`` (one assistant turn each),
``preference_strength`` (the pair's margin, below) and provenance fields. Every answer is one
the policy wrote for that conversation (a stored candidate), so the pairs are on-policy.

What makes a pair (a *label*; each answer is its text, compared with surrounding whitespace
stripped, as the trainer compares them):

- preference (`preferred_index` i on a response with candidates c_0..c_k): c_i over every other
  candidate, each distinct text once; a candidate whose text equals c_i's makes no pair.
  Candidates the budget cut short (`cut`) are not rejected: they are not answers the policy
  finished. Margin 1.
- pairwise (response T preferred over response U to the same conversation): T's answer over
  U's. Margin 1.
- rating: answers to one conversation rated on the same scale; each answer's rating is the mean
  of its ratings normalised onto [0, 1] (thumbs -1 -> 0, 1 -> 1; stars 1..5 -> 0..1), a user's
  latest rating of an answer replacing their earlier ones (anonymous ratings all count). Two
  answers whose means differ make a pair, the better chosen, margin the difference. Scales
  are not mixed: a thumbs-up says less than five stars.
- comment: no pair.

The answer of a response (for ratings and pairwise) is the candidate it returned (`selected`),
or the returned choice's text (`extra.choices`) when an output stage revised it; a response
that returned several choices, or stored neither, has none, and its labels are dropped
("no single answer").

Combining: labels about the same two answers to the same conversation (from any kinds, users
or responses) make one row. Its margin is the mean of the labels' signed margins, so agreeing
labels keep their mean and opposite ones cancel: the majority direction wins, weakened, and a
pair whose labels cancel exactly is dropped ("conflict"). Rows whose margin is below
`--min-margin` are dropped after that; explicit preferences (margin 1) pass any min-margin up to 1.

`--since` keeps feedback given at or after that time (ISO date or datetime, UTC unless it
names a zone, or Unix seconds), so rating pairs only compare ratings given since then.

The file is written aside and renamed into place (a reader never sees half of it, and an
export that fails leaves the previous file as it was); gzip when the name ends in `.gz`. A
store without any pair to export still gets its (empty) file and exit status 0: nothing to
export is not an error, though `aligner train` refuses an empty file.

Users: feedback user ids go into the rows (``users``) only with `--with-user`.
Everything is held in memory while the pairs are grouped: fine for millions of rows, not for
far more.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

EXPLICIT_MARGIN = 1.0
LABEL_KINDS = ("preference", "pairwise", "rating")
RATING_SCALES = {"thumbs": (-1.0, 1.0), "stars": (1.0, 5.0)}  # (lowest, highest)

# Why a label or a pair was left out (the summary's words).
NO_TRACE = "response deleted"
NO_ANSWER = "no single answer"
EMPTY = "empty answer"
SAME = "identical answers"
CUT = "cut candidate"
BAD_PROMPT = "prompt not text"
OTHER_MODEL = "other model"
CONFLICT = "conflict"
BELOW_MARGIN = "below --min-margin"


def parse_since(text: str) -> float:
    """Unix seconds from `--since`: a number of seconds, or an ISO date or datetime (UTC
    unless it names a zone).

    >>> parse_since("1750000000")
    1750000000.0
    >>> parse_since("2025-06-15")
    1749945600.0
    >>> parse_since("2025-06-15T12:00:00+02:00")
    1749981600.0
    """
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since takes an ISO date or datetime or Unix seconds, got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def prompt_messages(conversation: Any) -> list[dict[str, str]] | None:
    """The conversation as the trainer's `prompt`: role and text only, text parts joined and
    `developer` as `system` (as the server renders them); None if a turn has no text form."""
    if isinstance(conversation, str):
        return [{"role": "user", "content": conversation}]
    if not isinstance(conversation, list) or not conversation:
        return None
    messages = []
    for message in conversation:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            return None
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, Mapping) and isinstance(p.get("text"), str) for p in content):
                return None
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            return None
        role = "system" if message["role"] == "developer" else message["role"]
        messages.append({"role": role, "content": content})
    return messages


def candidate_texts(trace: Mapping[str, Any]) -> list[str | None]:
    return [c.get("text") if isinstance(c, Mapping) and isinstance(c.get("text"), str) else None
            for c in trace.get("candidates") or ()]


def returned_answer(trace: Mapping[str, Any]) -> str | None:
    """The one answer the response returned: the candidate `selected` names, else (an output
    stage's revision is no candidate) the returned choice's text in `extra.choices`, else a
    lone candidate; None for a response of several choices or none stored."""
    texts = candidate_texts(trace)
    selected = trace.get("selected") or []
    if len(selected) > 1:
        return None
    if selected and isinstance(selected[0], int) and 0 <= selected[0] < len(texts):
        return texts[selected[0]]
    choices = (trace.get("extra") or {}).get("choices") if isinstance(trace.get("extra"), Mapping) else None
    if isinstance(choices, list) and len(choices) == 1 and isinstance(choices[0], Mapping):
        content = (choices[0].get("message") or {}).get("content")
        return content if isinstance(content, str) else None
    if not selected and len(texts) == 1:
        return texts[0]
    return None


def normalised_rating(rating: float, scale: str) -> float:
    """A rating on [0, 1]: thumbs down 0, up 1; stars 1..5 as 0, 0.25, .., 1.

    >>> normalised_rating(-1, "thumbs"), normalised_rating(4, "stars")
    (0.0, 0.75)
    """
    low, high = RATING_SCALES[scale]
    return (float(rating) - low) / (high - low)


@dataclass
class Label:
    """One piece of evidence that `chosen` beats `rejected` (texts) on one conversation."""

    conversation: str  # the conversation hash
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    margin: float
    kind: str
    feedback: list[dict[str, Any]]  # the feedback rows behind it
    chosen_traces: list[dict[str, Any]]
    rejected_traces: list[dict[str, Any]]


@dataclass
class ExportSummary:
    feedback_read: Counter = field(default_factory=Counter)  # kind -> rows
    pairs_by_kind: Counter = field(default_factory=Counter)  # kind -> written rows with such a label
    dropped: Counter = field(default_factory=Counter)  # reason -> labels (or pairs, for the last two)
    pairs: int = 0

    def line(self, out: str | Path) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.pairs_by_kind.items()))
        dropped = ", ".join(f"{r} {n}" for r, n in self.dropped.most_common()) or "none"
        read = sum(self.feedback_read.values())
        text = (f"wrote {self.pairs} preference pairs to {out}{f' (per feedback kind: {kinds})' if kinds else ''} "
                f"from {read} feedback rows; dropped: {dropped}")
        return text if self.pairs else text + "; nothing to export"


def _key(text: str) -> str:
    return text.strip()


def labels_from_feedback(records: Iterable[Mapping[str, Any]], summary: ExportSummary,
                         model: str | None = None) -> list[Label]:
    """Labels from `Store.iter_feedback` records ({"feedback", "trace", "other_trace"}); what
    cannot make one is counted in `summary.dropped`. `model`: only answers that model wrote."""
    labels: list[Label] = []
    # (conversation, scale) -> answer key -> rater -> (normalised rating, feedback row, trace)
    ratings: dict[tuple[str, str], dict[str, dict[Any, tuple]]] = defaultdict(lambda: defaultdict(dict))
    prompts: dict[str, list[dict[str, str]]] = {}
    texts: dict[tuple[str, str], str] = {}
    for record in records:
        row, trace, other = record["feedback"], record["trace"], record.get("other_trace")
        summary.feedback_read[row["kind"]] += 1
        if row["kind"] not in LABEL_KINDS:  # a comment says nothing about a pair
            continue
        traces = [trace] + ([other] if row["kind"] == "pairwise" else [])
        if any(t is None for t in traces):
            summary.dropped[NO_TRACE] += 1
            continue
        if model is not None and any(t.get("model") != model for t in traces):
            summary.dropped[OTHER_MODEL] += 1
            continue
        prompt = prompt_messages(trace["conversation"])
        if prompt is None:
            summary.dropped[BAD_PROMPT] += 1
            continue
        conversation = trace["conversation_hash"]
        prompts[conversation] = prompt
        if row["kind"] == "preference":
            candidates = candidate_texts(trace)
            chosen = candidates[row["preferred_index"]] if 0 <= row["preferred_index"] < len(candidates) else None
            if chosen is None or not chosen.strip():
                summary.dropped[EMPTY] += 1
                continue
            others: dict[str, str] = {}
            for text, candidate in zip(candidates, trace["candidates"]):
                if text is None or not text.strip() or _key(text) == _key(chosen):
                    continue
                if candidate.get("cut"):  # unfinished when the budget ran out: not an answer of the policy's
                    summary.dropped[CUT] += 1
                    continue
                others.setdefault(_key(text), text)
            if not others:
                summary.dropped[SAME] += 1
            for text in others.values():
                labels.append(Label(conversation, prompt, chosen, text, EXPLICIT_MARGIN, "preference",
                                    [row], [trace], [trace]))
            continue
        answers = [returned_answer(t) for t in traces]
        if any(a is None for a in answers):
            summary.dropped[NO_ANSWER] += 1
        elif any(not a.strip() for a in answers):
            summary.dropped[EMPTY] += 1
        elif row["kind"] == "pairwise":
            if _key(answers[0]) == _key(answers[1]):
                summary.dropped[SAME] += 1
            else:
                labels.append(Label(conversation, prompt, answers[0], answers[1], EXPLICIT_MARGIN, "pairwise",
                                    [row], [trace], [other]))
        else:  # rating
            scale = row["rating_scale"]
            texts.setdefault((conversation, _key(answers[0])), answers[0])
            rater = row["user"] if row["user"] is not None else ("anonymous", row["id"])
            # Rows come oldest first: a user's later rating of the same answer replaces theirs.
            ratings[conversation, scale][_key(answers[0])][rater] = (
                normalised_rating(row["rating"], scale), row, trace)
    for (conversation, _scale), answers in ratings.items():
        means = {key: sum(v[0] for v in by.values()) / len(by) for key, by in answers.items()}
        ordered = sorted(means)
        for i, a in enumerate(ordered):
            for b in ordered[i + 1:]:
                if means[a] == means[b]:
                    continue
                better, worse = (a, b) if means[a] > means[b] else (b, a)
                labels.append(Label(
                    conversation, prompts[conversation], texts[conversation, better], texts[conversation, worse],
                    abs(means[a] - means[b]), "rating",
                    [v[1] for v in answers[better].values()] + [v[1] for v in answers[worse].values()],
                    [v[2] for v in answers[better].values()], [v[2] for v in answers[worse].values()]))
    return labels


def _distinct(values: Iterable[Any]) -> list:
    return sorted({v for v in values if v is not None})


def _generator(traces: list[dict[str, Any]]) -> str | None:
    models = _distinct(t.get("model") for t in traces)
    return models[0] if len(models) == 1 else None


def _profile(trace: Mapping[str, Any]) -> str | None:
    """`name@version`, or the name alone when the trace has no version."""
    if trace.get("profile") is None:
        return None
    return f"{trace['profile']}@{trace['profile_version']}" if trace.get("profile_version") else trace["profile"]


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat().replace("+00:00", "Z")


def combine(labels: list[Label], summary: ExportSummary, min_margin: float = 0.0,
            with_user: bool = False) -> list[dict[str, Any]]:
    """One training row per conversation and pair of answers, oldest feedback first."""
    groups: dict[tuple[str, str, str], list[Label]] = defaultdict(list)
    for label in labels:
        low, high = sorted((_key(label.chosen), _key(label.rejected)))
        groups[label.conversation, low, high].append(label)
    rows = []
    for (_conversation, low, _high), group in groups.items():
        signed = sum(x.margin if _key(x.chosen) == low else -x.margin for x in group) / len(group)
        if abs(signed) < 1e-9:  # exactly cancelled, up to the float sums
            summary.dropped[CONFLICT] += 1
            continue
        if abs(signed) < min_margin:
            summary.dropped[BELOW_MARGIN] += 1
            continue
        winner = next(x for x in group if (_key(x.chosen) == low) == (signed > 0))
        agrees = [_key(x.chosen) == _key(winner.chosen) for x in group]
        chosen_traces = [t for x, a in zip(group, agrees) for t in (x.chosen_traces if a else x.rejected_traces)]
        rejected_traces = [t for x, a in zip(group, agrees) for t in (x.rejected_traces if a else x.chosen_traces)]
        feedback = {r["id"]: r for x in group for r in x.feedback}
        traces = chosen_traces + rejected_traces
        row = {
            "prompt": winner.prompt,
            "chosen": [{"role": "assistant", "content": winner.chosen}],
            "rejected": [{"role": "assistant", "content": winner.rejected}],
            "preference_strength": round(abs(signed), 6),
            "source": "feedback",
            "feedback_kinds": _distinct(x.kind for x in group),
            "feedback_ids": sorted(feedback),
            "trace_ids": _distinct(t["id"] for t in traces),
            "created_at": _iso(max(r["created_at"] for r in feedback.values())),
            "chosen_generator": _generator(chosen_traces),
            "rejected_generator": _generator(rejected_traces),
            "models": _distinct(t.get("model") for t in traces),
            "strategies": _distinct(t.get("strategy") for t in traces),
            "profiles": _distinct(_profile(t) for t in traces),
            "conversation_hash": winner.conversation,
        }
        if with_user:
            row["users"] = _distinct(r["user"] for r in feedback.values())
        rows.append(row)
        summary.pairs_by_kind.update(row["feedback_kinds"])
    rows.sort(key=lambda r: r["feedback_ids"][0])
    summary.pairs = len(rows)
    return rows


def write_jsonl_atomically(rows: Iterable[Mapping[str, Any]], out: str | Path) -> int:
    """Write `rows` as JSON lines (gzip when `out` ends in .gz) beside `out`, then rename the
    file into place; on any error the partial file is removed and `out` stays as it was.
    Returns the number of rows. The gzip header holds no time, so equal rows give equal bytes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    aside = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 leaves the permissions to the umask, as a plain open would.
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    count = 0
    try:
        with os.fdopen(fd, "wb") as raw:
            sink = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if out.name.endswith(".gz") else raw
            try:
                for row in rows:
                    sink.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
                    count += 1
            finally:
                if sink is not raw:
                    sink.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(aside, out)
    except BaseException:
        aside.unlink(missing_ok=True)
        raise
    return count


def export_preferences(store, out: str | Path, *, since: float | None = None, min_margin: float = 0.0,
                       with_user: bool = False, model: str | None = None) -> ExportSummary:
    """Read the store's feedback (`store`: an open `aligner.store.Store`), write the pairs to `out`."""
    summary = ExportSummary()
    labels = labels_from_feedback(store.iter_feedback(since=since), summary, model=model)
    write_jsonl_atomically(combine(labels, summary, min_margin, with_user), out)
    return summary

