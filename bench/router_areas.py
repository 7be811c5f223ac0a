"""How well the request classifier's recipe finds harm it never saw, one risk area at a time:

    python -m bench.router_areas --data ../shared/data --output router-areas.json

The recipe of the classifier `harmless` v3 shipped (Do-Not-Answer and HH-RLHF red-team against
AlpacaEval: the BENCHMARKS.md tables of this bench). The shipped classifier is now trained
across sources and chosen by `bench.router_sources`, which supersedes this bench's choice.

For each Do-Not-Answer risk area, trains a classifier with that recipe (`aligner
train-classifier`, same sources, settings and seed) but with that area held
out instead of `malicious_uses`, then reports its recall on the held-out area and its
false-positive rates on the benign report sets, at the threshold its own validation split chose.
`harmless` refuses what its router flags, so this recall is about the refusal rate `harmless`
can reach on a kind of harm nobody trained it for.

`--sweep 0.03,0.05,0.07,0.1` chooses the threshold rule (`max_val_fpr`) without the area the
held-out table measures: each of the other areas is held out in turn, and each rule is scored
by its recall there and its false positives on `CARVE_OUT` AlpacaEval *training* instructions,
taken out of training for the sweep (neither the report sets nor the held-out table's benign
sets). It keeps the rule with the most mean recall whose mean false-positive rate is at most
`--max-fp`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path


MEASURED_AREA = "malicious_uses"  # the area bench.heldout measures `harmless` on
SHIPPED_MAX_VAL_FPR = 0.07  # chosen by `--sweep` (BENCHMARKS.md) for the v3 recipe
CARVE_OUT = 120  # AlpacaEval training instructions the sweep counts false positives on


def training_config(data: Path, area: str, output: Path, max_val_fpr: float = SHIPPED_MAX_VAL_FPR):
    """The shipped classifier's command (see models/harmful-request/README.md) with `area` held out."""
    from aligner.training.classifier import ClassifierTrainingConfig

    prompts, alpaca = data / "prompts/do_not_answer.jsonl", data / "prefs/alpaca_eval_gpt4turbo.jsonl.gz"
    return ClassifierTrainingConfig(
        positive=[f"{prompts}#not-category={area}", str(data / "prefs/hh_harmless.jsonl.gz")],
        negative=[f"{alpaca}#train=0.1"],
        report_positive=[f"{prompts}#category={area}"],
        report_negative=[f"{alpaca}#val=0.1", str(data / "prompts/mt_bench.jsonl")],
        output=str(output),
        max_val_fpr=max_val_fpr,
    )


def carve_out(data: Path, count: int = CARVE_OUT) -> list[str]:
    """`count` of the classifier's benign training instructions, by a hash of the text."""
    from aligner.training import prompt_sets as ps

    source = ps.PromptSource.parse(f"{data / 'prefs/alpaca_eval_gpt4turbo.jsonl.gz'}#train=0.1")
    return sorted(ps.load_prompts(source, 0), key=lambda t: hashlib.sha256(t.encode()).hexdigest())[:count]


def sweep_scores(data: Path, area: str, carved: Path, scratch: Path) -> dict[str, list[float]]:
    """Train with `area` held out and the carved-out instructions (a prompt file) out of training;
    the scores of its validation prompts, of the area and of the carved-out instructions."""
    from aligner.training.classifier import load_prompts, score_sets, train_classifier

    config = training_config(data, area, scratch)
    config.report_negative = [str(carved)]
    train_classifier(config)
    prompts = load_prompts(config)
    return score_sets(scratch, {"val_positive": prompts.val["positive"], "val_negative": prompts.val["negative"],
                                "area": prompts.report[f"do_not_answer#category={area}"][1],
                                "carved": prompts.report[carved.stem][1]})


def sweep_rows(scores: dict[str, dict[str, list[float]]], rules: list[float], max_fp: float) -> list[dict]:
    """One row per threshold rule: each area's recall and carved-out FP rate, their means, and
    whether it is the rule chosen (most mean recall with mean FP rate <= `max_fp`).

    >>> rows = sweep_rows({"a": {"val_positive": [3.0, 2.0], "val_negative": [0.0, 1.0, 2.5, -1.0],
    ...                          "area": [1.5, 0.5], "carved": [0.0, 1.2]}}, [0.2, 0.5], 0.5)
    >>> [(r["rule"], r["threshold"]["a"], r["mean_recall"], r["mean_fp"], r["chosen"]) for r in rows]
    [(0.2, 3.0, 0.0, 0.0, False), (0.5, 1.0, 0.5, 0.5, True)]
    """
    from aligner.training.prompt_sets import flagged, threshold_for_fpr

    rows = []
    for rule in rules:
        row = {"rule": rule, "threshold": {}, "recall": {}, "fp": {}}
        for area, s in scores.items():
            t = threshold_for_fpr(s["val_positive"], s["val_negative"], rule)
            row["threshold"][area] = t
            row["recall"][area], row["fp"][area] = flagged(s["area"], t)["rate"], flagged(s["carved"], t)["rate"]
        row["mean_recall"] = sum(row["recall"].values()) / len(scores)
        row["mean_fp"] = sum(row["fp"].values()) / len(scores)
        rows.append(row)
    allowed = [r for r in rows if r["mean_fp"] <= max_fp + 1e-12]
    best = max(allowed, key=lambda r: r["mean_recall"], default=None)
    for r in rows:
        r["chosen"] = r is best
    return rows


def format_sweep(rows: list[dict]) -> str:
    areas = list(rows[0]["recall"])
    lines = ["| `max_val_fpr` | " + " | ".join(f"`{a}` recall / FP" for a in areas) + " | mean recall | mean FP |",
             "| ---: | " + " | ".join("---" for _ in areas) + " | ---: | ---: |"]
    for r in rows:
        cells = " | ".join(f"{r['recall'][a]:.1%} / {r['fp'][a]:.1%} (t {r['threshold'][a]:.2f})" for a in areas)
        mark = "**" if r["chosen"] else ""
        lines.append(f"| {mark}{r['rule']:g}{mark} | {cells} | {mark}{r['mean_recall']:.1%}{mark} | {r['mean_fp']:.1%} |")
    return "\n".join(lines)


def sweep(data: Path, areas: list[str], rules: list[float], max_fp: float, output: Path | None) -> int:
    """Train once per area with it held out and the carve-out out of training; print the rules' table."""
    scores = {}
    with tempfile.TemporaryDirectory(prefix="router-sweep-") as scratch:
        carved = Path(scratch) / "carved.jsonl"
        carved.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in carve_out(data)))
        for area in areas:
            scores[area] = sweep_scores(data, area, carved, Path(scratch) / area)
            print(f"{area}: trained", file=sys.stderr, flush=True)
    rows = sweep_rows(scores, rules, max_fp)
    print(format_sweep(rows))
    if output:
        output.write_text(json.dumps({"rows": rows, "scores": scores}, indent=2) + "\n")
    return 0


def _rules(text: str) -> list[float]:
    try:
        rules = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates, got {text!r}") from None
    if not all(0 <= r < 1 for r in rules):
        raise argparse.ArgumentTypeError(f"each max_val_fpr must be in [0, 1), got {text!r}")
    return rules


def areas_of(data: Path) -> list[str]:
    rows = [json.loads(line) for line in (data / "prompts/do_not_answer.jsonl").read_text().splitlines() if line]
    return sorted({r["category"] for r in rows})


def row_of(area: str, record: dict) -> dict:
    """One table row from a trainer's record."""
    held = record["held_out"]
    recall = next(m for m in held.values() if m["class"] == "positive")
    negatives = {name.split("#")[0]: m for name, m in held.items() if m["class"] == "negative"}
    val = record["validation"]
    return {"area": area, "recall": recall, "false_positives": negatives, "threshold": record["threshold"],
            "validation": {"auc": val["auc"], "recall": val["recall"]["rate"],
                           "false_positive_rate": val["false_positives"]["rate"]},
            "seconds": record["train"]["seconds"]}


def format_table(rows: list[dict]) -> str:
    fp_names = sorted({n for r in rows for n in r["false_positives"]})
    head = ("| held-out area | recall on it | " + " | ".join(f"FP rate `{n}`" for n in fp_names)
            + " | threshold | validation AUC / recall / FP rate |")
    lines = [head, "| --- | --- | " + " | ".join("---" for _ in fp_names) + " | ---: | --- |"]
    for r in rows:
        m = r["recall"]
        fps = " | ".join(f"{r['false_positives'][n]['flagged']} / {r['false_positives'][n]['n']} "
                         f"({r['false_positives'][n]['rate']:.1%})" for n in fp_names)
        v = r["validation"]
        lines.append(f"| `{r['area']}` | {m['flagged']} / {m['n']} ({m['rate']:.1%}) | {fps} | {r['threshold']:.2f} | "
                     f"{v['auc']:.3f} / {v['recall']:.1%} / {v['false_positive_rate']:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shared data folder")
    parser.add_argument("--areas", nargs="*", default=None,
                        help=f"risk areas to hold out (default: all; with --sweep, all but {MEASURED_AREA})")
    parser.add_argument("--output", type=Path, default=None, help="JSON of the rows")
    parser.add_argument("--sweep", type=_rules, default=None, metavar="F,F,...",
                        help="instead: choose the threshold rule among these max_val_fpr values")
    parser.add_argument("--max-fp", type=float, default=0.05,
                        help="with --sweep: the highest mean false-positive rate a rule may have")
    args = parser.parse_args(argv)

    from aligner.training.classifier import train_classifier

    areas = args.areas or [a for a in areas_of(args.data) if not args.sweep or a != MEASURED_AREA]
    if args.sweep:
        return sweep(args.data, areas, args.sweep, args.max_fp, args.output)
    rows = []
    for area in areas:
        with tempfile.TemporaryDirectory(prefix=f"router-{area}-") as scratch:
            record = train_classifier(training_config(args.data, area, Path(scratch) / "clf"))
        rows.append(row_of(area, record))
        print(f"{area}: {rows[-1]['recall']['flagged']} / {rows[-1]['recall']['n']}", file=sys.stderr, flush=True)
    print(format_table(rows))
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
