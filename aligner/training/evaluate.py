"""Pairwise evaluation of a saved reward model, loaded the way the server loads it.

For every source file: accuracy (chosen scored above rejected, ties count half), the
length-only baseline (prefer the longer answer, in characters) on the same pairs, the
length-controlled accuracy (accuracy on the pairs whose chosen answer is not the longer
one: a pure length detector scores 0 there) and the mean score gap chosen - rejected.

An `arm` model trained as an adapter is scored twice: by its own summed log-probability
(the reward GenARM decoding adds) and by the summed log-probability *ratio* against its base
(``beta * sum_t (log pi_r - log pi_base)``, under `log_ratio`), which cancels how likely the
base finds an answer, its length above all, and shows what training added.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from aligner.rewards.encoding import read_reward_meta
from aligner.training.data import chosen_is_longer, response_text

logger = logging.getLogger(__name__)

REWARD_META = "aligner_reward.json"
EVAL_FILE = "eval.json"


def read_meta(path: str | Path) -> dict[str, Any]:
    """Training metadata (kind, beta, max_length, ...) of a model directory; {} if absent."""
    return read_reward_meta(path)


def guess_kind(path: str | Path) -> str:
    """'bt' or 'arm' from the metadata, else from the adapter task or the architecture."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("kind"):
        return meta["kind"]
    for name, key in (("adapter_config.json", "task_type"), ("config.json", "architectures")):
        if (path / name).is_file():
            value = json.loads((path / name).read_text()).get(key) or ""
            text = value if isinstance(value, str) else " ".join(value)
            if "SEQ_CLS" in text or "SequenceClassification" in text:
                return "bt"
            if "CAUSAL_LM" in text or "CausalLM" in text:
                return "arm"
    raise ValueError(f"{path}: cannot tell a bt from an arm model; pass --kind")


def load_reward_model(path: str | Path, kind: str):
    """(model, tokenizer) in float32 through `decoding.model_refs`, as the server would load it."""
    import torch

    from decoding.model_refs import load_causal_lm, load_sequence_classifier

    loader = load_sequence_classifier if kind == "bt" else load_causal_lm
    return loader(path, dtype=torch.float32)


def validation_rows(model: str | Path, data: list[str], *, split: str = "val", seed: int | None = None,
                    val_fraction: float | None = None, max_val_pairs: int | None = None):
    """(source -> rows, split settings) for `eval-rm`: by default the model's own validation
    split (its seed, fraction and cap from `eval.json`), so "val" means pairs it never trained on.
    `data` items are `FILE[:WEIGHT]` as for training; `split` is "val", "train" or "all"."""
    from aligner.training.data import DataSpec, load_source, split_by_prompt

    trained = {}
    eval_file = Path(model) / EVAL_FILE
    if eval_file.is_file():
        trained = json.loads(eval_file.read_text()).get("config", {})
    seed = seed if seed is not None else trained.get("seed", 0)
    fraction = val_fraction if val_fraction is not None else trained.get("val_fraction", 0.05)
    cap = max_val_pairs if max_val_pairs is not None else trained.get("max_val_pairs", 500)
    val = {}
    for item in data:
        spec = DataSpec.parse(item)
        rows, _ = load_source(spec)
        if split == "all":
            val[spec.name] = rows if max_val_pairs is None else rows[:max_val_pairs]
        else:
            val[spec.name] = split_by_prompt(rows, fraction, cap, seed)[1 if split == "val" else 0]
    return val, {"split": split, "seed": seed, "val_fraction": fraction, "max_val_pairs": cap}


def score_pairs(
    model,
    kind: str,
    encoded: list[dict],
    *,
    beta: float = 1.0,
    pad_token_id: int,
    batch_size: int = 16,
    desc: str = "Scoring",
):
    """(chosen_scores, rejected_scores) as lists of floats, one per encoded pair.

    `encoded` rows are `PairEncoder.encode_pair` outputs. A bt score is the model's one
    output; an arm score is beta times the summed response log-probability. A sequence that
    recurs (AlpacaEval's reference answer is one side of every pair on its prompt) is scored
    once; a batch holds `batch_size` pairs' worth, 2 * `batch_size` sequences.
    """
    import torch
    from tqdm.auto import tqdm

    from aligner.rewards.hf import classifier_scores
    from aligner.training.genarm import response_logprobs
    from aligner.training.encoding import pad_sequences

    def key(e: dict, side: str) -> tuple:
        return tuple(e[f"{side}_ids"]), e[f"{side}_start"]

    unique = {key(e, side): None for e in encoded for side in ("chosen", "rejected")}
    # Batches of similar length waste less compute on padding.
    seqs = sorted(unique, key=lambda seq: len(seq[0]))
    scores: dict[tuple, float] = {}
    model.eval()
    with torch.inference_mode():
        for start in tqdm(range(0, len(seqs), 2 * batch_size), desc=desc, unit="batch"):
            chunk = seqs[start : start + 2 * batch_size]
            batch = pad_sequences(chunk, pad_token_id)
            if kind == "bt":
                out = classifier_scores(model, batch["input_ids"], batch["attention_mask"])
            else:
                out = beta * response_logprobs(
                    model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
                )
            scores.update(zip(chunk, out.float().tolist()))
    return [scores[key(e, "chosen")] for e in encoded], [scores[key(e, "rejected")] for e in encoded]


def pair_metrics(rows: list[dict], chosen: list[float], rejected: list[float]) -> dict[str, Any]:
    """Accuracy, length baseline, length-controlled accuracy and mean gap over scored pairs.

    >>> rows = [{"chosen": [{"content": "long answer"}], "rejected": [{"content": "no"}]},
    ...         {"chosen": [{"content": "ok"}], "rejected": [{"content": "rambling"}]}]
    >>> m = pair_metrics(rows, [1.0, 0.5], [0.0, 1.0])
    >>> m["accuracy"], m["length_baseline"], m["length_controlled_accuracy"], m["n_length_controlled"]
    (0.5, 0.5, 0.0, 1)
    """

    def win(a: float, b: float) -> float:
        return 1.0 if a > b else 0.5 if a == b else 0.0

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    wins = [win(c, r) for c, r in zip(chosen, rejected)]
    length_wins = []
    controlled = []
    for row, w in zip(rows, wins):
        lc, lr = len(response_text(row["chosen"])), len(response_text(row["rejected"]))
        length_wins.append(win(lc, lr))
        if not chosen_is_longer(row):
            controlled.append(w)
    return {
        "n": len(rows),
        "accuracy": mean(wins),
        "length_baseline": mean(length_wins),
        "length_controlled_accuracy": mean(controlled),
        "n_length_controlled": len(controlled),
        "mean_score_gap": mean([c - r for c, r in zip(chosen, rejected)]),
    }


def evaluate_model(
    path: str | Path,
    val: dict[str, list[dict]],
    *,
    kind: str | None = None,
    beta: float | None = None,
    max_length: int | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Score `val` (source -> clean rows) with the model saved at `path`; the JSON report."""
    from aligner.training.encoding import PairEncoder

    meta = read_meta(path)
    kind = kind or guess_kind(path)
    beta = beta if beta is not None else meta.get("beta", 1.0)
    model, tokenizer = load_reward_model(path, kind)
    encoder = PairEncoder.for_model(tokenizer, path, 512, length=max_length)
    max_length = encoder.max_length
    report: dict[str, Any] = {"model": str(path), "kind": kind, "max_length": max_length, "sources": {}}
    if kind == "arm":
        report["beta"] = beta
    reference = _reference_model(path) if kind == "arm" else None
    ratio: dict[str, Any] = {"sources": {}}
    all_rows, scored, ratios = [], ([], []), ([], [])
    for source, rows in val.items():
        if not rows:
            continue
        encoded = [encoder.encode_pair(row) for row in rows]
        score = functools.partial(
            score_pairs, kind=kind, encoded=encoded, beta=beta, pad_token_id=tokenizer.pad_token_id,
            batch_size=batch_size,
        )
        chosen, rejected = score(model, desc=f"Scoring {source}")
        report["sources"][source] = pair_metrics(rows, chosen, rejected)
        logger.info("%s: %s", source, report["sources"][source])
        all_rows += rows
        scored[0].extend(chosen)
        scored[1].extend(rejected)
        if reference is not None:
            ref_chosen, ref_rejected = score(reference, desc=f"Scoring {source} (base)")
            chosen = [a - b for a, b in zip(chosen, ref_chosen)]
            rejected = [a - b for a, b in zip(rejected, ref_rejected)]
            ratio["sources"][source] = pair_metrics(rows, chosen, rejected)
            logger.info("%s, log-ratio to the base: %s", source, ratio["sources"][source])
            ratios[0].extend(chosen)
            ratios[1].extend(rejected)
    report.update(pair_metrics(all_rows, *scored))
    if reference is not None:
        ratio.update(pair_metrics(all_rows, *ratios))
        report["log_ratio"] = ratio
    return report


def _reference_model(path: str | Path):
    """The base an `arm` adapter was trained on (float32), or None for a full checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    from decoding.model_refs import base_of

    base = base_of(Path(path))
    if base is None:
        return None
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
