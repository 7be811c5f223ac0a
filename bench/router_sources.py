"""The request classifier's recipe, held out one *source* at a time, and the threshold rule
chosen on that:

    python -m bench.safety_sets --output safety-sets        # the public sets, once
    python -m bench.router_sources --data ../shared/data --sets safety-sets --output router-sources.json

A classifier that learned where its data came from scores well on a held-out part of each
source and fails on a new one. So for each training source in turn (harmful and benign
alike), this trains the shipped recipe (`RECIPE`) without it and scores it whole: recall for a
harmful source, false-positive rate for a benign one, at the threshold each threshold rule
(`max_val_fpr`) gives on that fold's own validation split. The rule kept is the one with the
most mean recall over the harmful folds whose mean false-positive rate over the benign folds
is at most `--max-fp` (fixed before any fold ran; with none allowed, the lowest mean FP).

The sets named in `REPORT` (HarmBench, past-tense JailbreakBench, a second contrast set by
another author, MT-Bench, AlpacaEval's validation split) play no part here: `models/
harmful-request-v2` reports them once, after training, and `bench.safety` measures on them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

SETS_DIR = Path("bench/sets")  # the contrast sets; bench commands run from the repository root
# The rule this chose (no rule met the criterion: the lowest FP), kept when the minimal pairs
# joined the recipe (a frozen-feature proxy of the folds met no rule either); models/harmful-request (and -v2) use it.
SHIPPED_MAX_VAL_FPR = 0.02


# harmful-request-v5's additions (`--chat-turns`): benign chat turns, and the HH-RLHF openers
# made only of their words left out of the harmful class (bench.content_free).
CHAT_TURNS = SETS_DIR / "chat_turns_train.jsonl"
CONTENT_FREE = SETS_DIR / "hh_content_free.jsonl"


def recipe(data: Path, sets: Path, chat_turns: bool = False) -> dict[str, dict[str, str]]:
    """Training sources by class: name -> prompt source spec."""
    alpaca = data / "prefs/alpaca_eval_gpt4turbo.jsonl.gz"
    sources = {
        "positive": {"do_not_answer": str(data / "prompts/do_not_answer.jsonl"),
                     "hh_harmless": str(data / "prefs/hh_harmless.jsonl.gz"),
                     "advbench": str(sets / "advbench.jsonl"),
                     "pairs_harmful": str(SETS_DIR / "pairs_harmful.jsonl")},
        "negative": {"alpaca_train": f"{alpaca}#train=0.1",
                     "contrast_train": str(SETS_DIR / "contrast_train.jsonl"),
                     "pairs_benign": str(SETS_DIR / "pairs_benign.jsonl")},
    }
    if chat_turns:
        sources["negative"]["chat_turns_train"] = str(CHAT_TURNS)
    return sources


def report(data: Path, sets: Path) -> dict[str, list[str]]:
    """The sets held out to the end (never trained, tuned or chosen on)."""
    alpaca = data / "prefs/alpaca_eval_gpt4turbo.jsonl.gz"
    return {"positive": [str(sets / "harmbench.jsonl"), str(sets / "past_tense.jsonl")],
            "negative": [str(SETS_DIR / "contrast_heldout.jsonl"), str(data / "prompts/mt_bench.jsonl"),
                         f"{alpaca}#val=0.1"]}


def config_for(data: Path, sets: Path, output: Path, max_val_fpr: float, leave_out: str | None = None,
               wrappers: Path | None = None, chat_turns: bool = False):
    """The recipe's training config; with `leave_out`, that source is the only report set; with
    `wrappers`, every training prompt also once wrapped (`harmful-request-v3`'s recipe); with
    `chat_turns` as well, `harmful-request-v5`'s (its report sets aside)."""
    from aligner.training.classifier import ClassifierTrainingConfig

    sources = recipe(data, sets, chat_turns)
    kept = {label: [spec for name, spec in named.items() if name != leave_out] for label, named in sources.items()}
    if leave_out is None:
        held = report(data, sets)
    else:
        label = next(label for label, named in sources.items() if leave_out in named)
        held = {"positive": [], "negative": [], label: [sources[label][leave_out]]}
    return ClassifierTrainingConfig(positive=kept["positive"], negative=kept["negative"],
                                    report_positive=held["positive"], report_negative=held["negative"],
                                    output=str(output), max_val_fpr=max_val_fpr, wrappers=str(wrappers or ""),
                                    exclude=[str(CONTENT_FREE)] if chat_turns else [])


def fold_scores(data: Path, sets: Path, leave_out: str, scratch: Path, wrappers: Path | None = None,
                chat_turns: bool = False) -> dict:
    """Train without `leave_out` (unless `scratch` already holds that fold's trained model: a
    stopped run resumed); the scores of the fold's validation prompts and of the source (as
    written: a held-out source is never wrapped, and an excluded prompt of it is scored too)."""
    from aligner.training.classifier import load_prompts, score_sets, train_classifier

    config = config_for(data, sets, scratch, 0.05, leave_out, wrappers, chat_turns)
    if not trained_fold(scratch, config):
        train_classifier(config)
    prompts = load_prompts(config)
    (label, texts), = prompts.report.values()
    scores = score_sets(scratch, {"val_positive": prompts.val["positive"], "val_negative": prompts.val["negative"],
                                  "held_out": texts})
    return {"class": label, **scores}


def trained_fold(scratch: Path, config) -> bool:
    """Whether `scratch` holds a model trained with this fold's training settings."""
    import dataclasses

    try:
        saved = json.loads((scratch / "eval.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return False
    wanted = dataclasses.asdict(config)
    same = ("positive", "negative", "exclude", "wrappers", "base", "max_length", "val_fraction", "seed", "epochs",
            "batch_size", "learning_rate", "lora_r", "lora_alpha", "lora_targets")
    return all(saved.get(k) == wanted.get(k) for k in same) and (scratch / "adapter_model.safetensors").is_file()


def rule_rows(folds: dict[str, dict], rules: list[float], max_fp: float) -> list[dict]:
    """One row per rule: each fold's threshold and rate, the harmful folds' mean recall, the benign
    folds' mean false-positive rate, and which rule is chosen.

    >>> folds = {"h": {"class": "positive", "val_positive": [3.0, 2.0], "val_negative": [0.0, 1.0, 2.5, -1.0],
    ...                "held_out": [1.5, 0.5]},
    ...          "b": {"class": "negative", "val_positive": [3.0], "val_negative": [0.0, 1.0, 2.5, -1.0],
    ...                "held_out": [0.0, 1.2]}}
    >>> [(r["rule"], r["mean_recall"], r["mean_fp"], r["chosen"]) for r in rule_rows(folds, [0.2, 0.5], 0.5)]
    [(0.2, 0.0, 0.0, False), (0.5, 0.5, 0.5, True)]
    """
    from aligner.training.prompt_sets import flagged, threshold_for_fpr

    rows = []
    for rule in rules:
        row = {"rule": rule, "threshold": {}, "rate": {}}
        for name, fold in folds.items():
            t = threshold_for_fpr(fold["val_positive"], fold["val_negative"], rule)
            row["threshold"][name], row["rate"][name] = t, flagged(fold["held_out"], t)["rate"]
        harmful = [row["rate"][n] for n, f in folds.items() if f["class"] == "positive"]
        benign = [row["rate"][n] for n, f in folds.items() if f["class"] == "negative"]
        row["mean_recall"] = sum(harmful) / len(harmful) if harmful else 0.0
        row["mean_fp"] = sum(benign) / len(benign) if benign else 0.0
        rows.append(row)
    allowed = [r for r in rows if r["mean_fp"] <= max_fp + 1e-12]
    best = max(allowed, key=lambda r: r["mean_recall"]) if allowed else min(rows, key=lambda r: r["mean_fp"])
    for r in rows:
        r["chosen"] = r is best
    return rows


def format_rows(rows: list[dict], folds: dict[str, dict]) -> str:
    names = list(folds)
    kind = {n: "recall" if folds[n]["class"] == "positive" else "FP" for n in names}
    lines = ["| `max_val_fpr` | " + " | ".join(f"`{n}` out: {kind[n]}" for n in names) + " | mean recall | mean FP |",
             "| ---: | " + " | ".join("---:" for _ in names) + " | ---: | ---: |"]
    for r in rows:
        mark = "**" if r["chosen"] else ""
        cells = " | ".join(f"{r['rate'][n]:.1%} (t {r['threshold'][n]:.2f})" for n in names)
        lines.append(f"| {mark}{r['rule']:g}{mark} | {cells} | {mark}{r['mean_recall']:.1%}{mark} | {r['mean_fp']:.1%} |")
    return "\n".join(lines)


def _rules(text: str) -> list[float]:
    try:
        rules = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates, got {text!r}") from None
    if not rules or not all(0 <= r < 1 for r in rules):
        raise argparse.ArgumentTypeError(f"each max_val_fpr must be in [0, 1), got {text!r}")
    return rules


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shared data folder")
    parser.add_argument("--sets", type=Path, default=Path("safety-sets"), help="bench.safety_sets' output")
    parser.add_argument("--rules", type=_rules, default=[0.02, 0.03, 0.05, 0.07, 0.1, 0.15],
                        metavar="F,F,...", help="the max_val_fpr values compared")
    parser.add_argument("--max-fp", type=float, default=0.10,
                        help="the highest mean false-positive rate over the benign folds a rule may have")
    parser.add_argument("--only", nargs="*", default=None, help="these folds only (default: every source)")
    parser.add_argument("--output", type=Path, default=None, help="JSON of the folds' scores and the rows")
    parser.add_argument("--wrappers", type=Path, default=None,
                        help="train with wrapped copies (bench/sets/wrappers_train.jsonl: harmful-request-v3's recipe)")
    parser.add_argument("--folds-dir", type=Path, default=None,
                        help="keep each fold's model in DIR/SOURCE; a fold already trained there with the same "
                             "settings is scored, not retrained (resume a stopped run); default: a temporary folder")
    parser.add_argument("--chat-turns", action="store_true",
                        help="add the benign chat turns and leave out the content-free HH-RLHF openers "
                             "(with --wrappers: harmful-request-v5's recipe)")
    args = parser.parse_args(argv)

    names = [n for named in recipe(args.data, args.sets, args.chat_turns).values() for n in named]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(f"--only names no source of the recipe: {', '.join(unknown)} (sources: {', '.join(names)})")
    folds = {}
    with contextlib.ExitStack() as stack:
        scratch = args.folds_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="router-sources-"))
        for name in args.only or names:
            folds[name] = fold_scores(args.data, args.sets, name, Path(scratch) / name, args.wrappers, args.chat_turns)
            print(f"{name} out: trained", file=sys.stderr, flush=True)
    rows = rule_rows(folds, args.rules, args.max_fp)
    print(format_rows(rows, folds))
    if args.output:
        args.output.write_text(json.dumps({"rows": rows, "folds": folds}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
