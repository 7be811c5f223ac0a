"""Preference pairs: load, clean, split by prompt, balance by length, mix with weights.

Rows follow TRL's conversational preference format::

    {"prompt": [{"role": "user", "content": "..."}, ...],
     "chosen": [{"role": "assistant", "content": "..."}],
     "rejected": [{"role": "assistant", "content": "..."}],
     "preference_strength": 0.9}        # optional, 0 = tie, 1 = certain

Plain strings are accepted too (a prompt string becomes one user turn, a response string one
assistant turn). Each clean row becomes ``{"prompt", "chosen", "rejected", "source",
"strength"}`` where ``source`` names the file it came from.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

BAD_JSON = "unparseable line"
MISSING = "missing or malformed field"
EMPTY = "empty response"
IDENTICAL = "identical chosen and rejected"


@dataclass(frozen=True)
class DataSpec:
    """One `--data FILE[:WEIGHT]` argument."""

    path: str
    weight: float | None = None

    @classmethod
    def parse(cls, text: str) -> "DataSpec":
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
            except ValueError:
                return cls(text)
            if not weight > 0 or math.isinf(weight):
                raise ValueError(f"data weight must be a positive number: {text!r}")
            return cls(head, weight)
        return cls(text)

    @property
    def name(self) -> str:
        """The file name without `.jsonl` / `.jsonl.gz`: the per-source key in reports."""
        name = Path(self.path.rstrip("/")).name
        for suffix in (".gz", ".jsonl", ".json"):
            name = name.removesuffix(suffix)
        return name


@dataclass
class SourceStats:
    name: str
    path: str
    rows: int = 0
    usable: int = 0
    bad: Counter = field(default_factory=Counter)
    train: int = 0
    val: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "rows": self.rows,
            "usable": self.usable,
            "bad": dict(self.bad),
            "train": self.train,
            "val": self.val,
        }


@dataclass
class PreferenceData:
    """Clean, split pairs. `train` is a shuffled `datasets.Dataset`; `val` maps source -> rows."""

    train: Any
    val: dict[str, list[dict]]
    stats: dict[str, SourceStats]


def iter_raw_rows(path: str | Path) -> Iterator[dict | None]:
    """Yield each row of a JSONL(.gz) file or a saved `datasets` dataset; None for bad JSON."""
    path = Path(path)
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        dataset = load_from_disk(str(path))
        if isinstance(dataset, DatasetDict):
            if "train" not in dataset:
                raise ValueError(f"{path}: a DatasetDict needs a 'train' split, has {list(dataset)}")
            dataset = dataset["train"]
        yield from dataset
        return
    if not path.is_file():
        raise FileNotFoundError(f"preference data {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                yield None
                continue
            yield row if isinstance(row, dict) else None


def _messages(value: Any, role: str) -> list[dict] | None:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        return None
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return None
        if not isinstance(message.get("role"), str):
            return None
    return [{"role": m["role"], "content": m["content"]} for m in value]


def response_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


def clean_row(row: dict | None, source: str) -> tuple[dict | None, str | None]:
    """(clean row, None) or (None, reason it was skipped)."""
    if row is None:
        return None, BAD_JSON
    prompt = _messages(row.get("prompt"), "user")
    chosen = _messages(row.get("chosen"), "assistant")
    rejected = _messages(row.get("rejected"), "assistant")
    if prompt is None or chosen is None or rejected is None:
        return None, MISSING
    chosen_text, rejected_text = response_text(chosen), response_text(rejected)
    if not chosen_text.strip() or not rejected_text.strip():
        return None, EMPTY
    if chosen_text.strip() == rejected_text.strip():
        return None, IDENTICAL
    strength = row.get("preference_strength")
    strength = float(strength) if isinstance(strength, (int, float)) else None
    clean = {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "source": source,
        "strength": strength,
    }
    for side in ("chosen_generator", "rejected_generator"):  # AlpacaEval-style: who wrote each answer
        if isinstance(row.get(side), str):
            clean[side] = row[side]
    return clean, None


def load_source(spec: DataSpec) -> tuple[list[dict], SourceStats]:
    """Clean rows of one file; bad rows are counted and skipped, an unusable file is an error."""
    stats = SourceStats(spec.name, spec.path)
    rows = []
    for raw in iter_raw_rows(spec.path):
        stats.rows += 1
        row, reason = clean_row(raw, spec.name)
        if row is None:
            stats.bad[reason] += 1
        else:
            rows.append(row)
    stats.usable = len(rows)
    if stats.bad:
        detail = ", ".join(f"{n} {reason}" for reason, n in stats.bad.most_common())
        logger.warning("%s: skipped %d of %d rows (%s)", spec.path, sum(stats.bad.values()), stats.rows, detail)
    if not rows:
        raise ValueError(f"{spec.path}: no usable preference pairs in {stats.rows} rows")
    return rows, stats


def _key(seed: int, *parts: Any) -> str:
    text = json.dumps([seed, *parts], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_by_prompt(
    rows: list[dict], val_fraction: float, max_val_pairs: int, seed: int
) -> tuple[list[dict], list[dict]]:
    """Deterministic (train, val) split over distinct prompts.

    Prompts are ordered by a seeded hash, so the split depends on neither the row order nor the
    other files; all pairs of one prompt go to the same side (AlpacaEval repeats each
    instruction for dozens of generators). Val pairs over `max_val_pairs` are dropped, not
    moved to train, so that train never sees a validation prompt.
    """
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(_key(seed, row["prompt"]), []).append(row)
    if val_fraction <= 0 or len(groups) < 2:
        return list(rows), []
    ordered = sorted(groups)
    n_val = min(len(ordered) - 1, max(1, round(val_fraction * len(ordered))))
    val = [row for key in ordered[:n_val] for row in groups[key]]
    train = [row for key in ordered[n_val:] for row in groups[key]]
    if len(val) > max_val_pairs:
        val = sorted(val, key=lambda r: _key(seed, r["prompt"], r["chosen"], r["rejected"]))
        val = val[:max_val_pairs]
    return train, val


def chosen_is_longer(row: dict) -> bool:
    return len(response_text(row["chosen"])) > len(response_text(row["rejected"]))


def balance_by_length(rows: list[dict], seed: int, generator: str | None = None) -> list[dict]:
    """Keep as many pairs whose chosen answer is the longer one as pairs where it is not.

    `generator` (rows carrying `chosen_generator`/`rejected_generator`): among the pairs that
    include that generator's answer, also as many where it is chosen as where it is rejected,
    in four equal cells with the length. AlpacaEval compares every model with one reference
    whose answers the judge prefers in most pairs, so a model can score well by recognising the
    reference's style; balancing takes that shortcut away too. Other pairs: length only.
    """
    if generator is None:
        return _balance(rows, chosen_is_longer, 2, seed)
    includes = lambda r: generator in (r.get("chosen_generator"), r.get("rejected_generator"))  # noqa: E731
    involved, others = [r for r in rows if includes(r)], [r for r in rows if not includes(r)]
    if not involved and rows:
        logger.warning("%s: no pair includes an answer by %r: balancing by length only", rows[0]["source"], generator)
    cell = lambda r: (chosen_is_longer(r), r.get("chosen_generator") == generator)  # noqa: E731
    return _balance(others, chosen_is_longer, 2, seed) + _balance(involved, cell, 4, seed)


def pairs_via_anchor(rows: list[dict], anchor: str, margin: float) -> list[dict]:
    """Replace the pairs that include `anchor`'s answer by pairs of the answers compared with it.

    AlpacaEval-style data compares every model's answer to one prompt with the same anchor
    answer. Each of those answers gets a score against the anchor (+strength when it was
    chosen, -strength when the anchor was; a pair without a strength counts 1), and two answers
    to the same prompt whose scores differ by more than `margin` make a pair, the higher chosen,
    with strength half the difference. The anchor's own answers leave training: a model then
    cannot score by recognising the anchor's style, and one prompt with n compared answers
    yields up to n(n-1)/2 pairs instead of n. Rows without the anchor pass through unchanged.
    """
    scored: dict[str, list[tuple[float, list[dict], str, str | None, dict]]] = {}
    others = []
    for row in rows:
        if anchor == row.get("chosen_generator"):
            side, sign = "rejected", -1.0
        elif anchor == row.get("rejected_generator"):
            side, sign = "chosen", 1.0
        else:
            others.append(row)
            continue
        strength = 1.0 if row["strength"] is None else row["strength"]
        answer = (sign * strength, row[side], response_text(row[side]).strip(), row.get(f"{side}_generator"), row)
        scored.setdefault(_key(0, row["prompt"]), []).append(answer)
    if not scored and rows:
        logger.warning("%s: no pair includes an answer by %r: its pairs train as they are", rows[0]["source"], anchor)
    derived = []
    for answers in scored.values():
        for high, chosen, chosen_text, chosen_by, row in answers:
            for low, rejected, rejected_text, rejected_by, _ in answers:
                if high - low > margin and chosen_text != rejected_text:
                    derived.append({
                        "prompt": row["prompt"], "chosen": chosen, "rejected": rejected,
                        "source": row["source"], "strength": (high - low) / 2,
                        "chosen_generator": chosen_by, "rejected_generator": rejected_by,
                    })
    return others + derived


def _balance(rows: list[dict], cell, kinds: int, seed: int) -> list[dict]:
    """As many rows of each of the `kinds` values of `cell(row)` (a seeded choice)."""
    cells: dict[Any, list[dict]] = {}
    for r in rows:
        cells.setdefault(cell(r), []).append(r)
    if len(cells) < kinds:
        if rows:
            logger.warning("cannot balance %d pairs: only %d of the %d kinds of pair occur", len(rows), len(cells), kinds)
        return rows
    keep = min(len(part) for part in cells.values())
    key = lambda r: _key(seed, "balance", r["prompt"], r["chosen"], r["rejected"])  # noqa: E731
    return [r for kind in sorted(cells, reverse=True) for r in sorted(cells[kind], key=key)[:keep]]


def _features():
    # Explicit, so that files with and without `preference_strength` share one schema.
    from datasets import Features, List, Value

    messages = List({"role": Value("string"), "content": Value("string")})
    return Features(
        {
            "prompt": messages,
            "chosen": messages,
            "rejected": messages,
            "source": Value("string"),
            "strength": Value("float64"),
        }
    )


def mix(sources: list[list[dict]], weights: list[float | None], max_pairs: int | None, seed: int):
    """A shuffled `datasets.Dataset` of training rows.

    Without weights the files are concatenated. With weights they are sampling probabilities
    (`datasets.interleave_datasets`); sampling stops when the first file runs out, so no pair
    repeats and the proportions hold.
    """
    from datasets import Dataset, concatenate_datasets, interleave_datasets

    features = _features()
    parts = [Dataset.from_list([{k: r.get(k) for k in features} for r in rows], features=features).shuffle(seed=seed)
             for rows in sources if rows]
    part_weights = [w for rows, w in zip(sources, weights) if rows]
    if not parts:
        raise ValueError("no training pairs left after the split and filters")
    if len(parts) > 1 and any(w is not None for w in part_weights):
        probs = [1.0 if w is None else w for w in part_weights]
        total = sum(probs)
        mixed = interleave_datasets(parts, [p / total for p in probs], seed=seed)
    else:
        mixed = concatenate_datasets(parts).shuffle(seed=seed)
    if max_pairs is not None and len(mixed) > max_pairs:
        mixed = mixed.select(range(max_pairs))
    return mixed


def load_preference_data(
    data: list[str],
    *,
    seed: int = 0,
    val_fraction: float = 0.05,
    max_val_pairs: int = 500,
    max_pairs: int | None = None,
    balance_length: bool = False,
    balance_generator: str | None = None,
    min_strength: float = 0.0,
    anchor_generator: str | None = None,
    anchor_margin: float = 0.5,
) -> PreferenceData:
    """Load every `FILE[:WEIGHT]`, split each file, filter and balance train, then mix."""
    specs = [DataSpec.parse(item) for item in data]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"data files need distinct names, got {names}")
    train_parts, val, stats = [], {}, {}
    for spec in specs:
        rows, source_stats = load_source(spec)
        train, val_rows = split_by_prompt(rows, val_fraction, max_val_pairs, seed)
        if min_strength > 0:
            train = [r for r in train if r["strength"] is None or r["strength"] >= min_strength]
        if anchor_generator:
            train = pairs_via_anchor(train, anchor_generator, anchor_margin)
        if balance_length or balance_generator:
            train = balance_by_length(train, seed, balance_generator)
        train_parts.append(train)
        val[spec.name] = val_rows
        stats[spec.name] = source_stats
    mixed = mix(train_parts, [s.weight for s in specs], max_pairs, seed)
    for name, count in Counter(mixed["source"]).items():
        stats[name].train = count
    for name, rows in val.items():
        stats[name].val = len(rows)
    return PreferenceData(mixed, val, stats)
