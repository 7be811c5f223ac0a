"""How well the request classifier's recipe finds harm it never saw, one risk area at a time:

    python -m bench.router_areas --data ../shared/data --output router-areas.json

For each Do-Not-Answer risk area, trains a classifier exactly as `models/harmful-request` was
trained (`aligner train-classifier`, same sources, settings and seed) but with that area held
out instead of `malicious_uses`, then reports its recall on the held-out area and its
false-positive rates on the benign report sets, at the threshold its own validation split chose.
`harmless` refuses what its router flags, so this recall is about the refusal rate `harmless`
can reach on a kind of harm nobody trained it for.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def training_config(data: Path, area: str, output: Path):
    """The shipped classifier's command (see models/harmful-request/README.md) with `area` held out."""
    from aligner.training.classifier import ClassifierTrainingConfig

    prompts, alpaca = data / "prompts/do_not_answer.jsonl", data / "prefs/alpaca_eval_gpt4turbo.jsonl.gz"
    return ClassifierTrainingConfig(
        positive=[f"{prompts}#not-category={area}", str(data / "prefs/hh_harmless.jsonl.gz")],
        negative=[f"{alpaca}#train=0.1"],
        report_positive=[f"{prompts}#category={area}"],
        report_negative=[f"{alpaca}#val=0.1", str(data / "prompts/mt_bench.jsonl")],
        output=str(output),
    )


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
    parser.add_argument("--areas", nargs="*", default=None, help="risk areas to hold out (default: all)")
    parser.add_argument("--output", type=Path, default=None, help="JSON of the rows")
    args = parser.parse_args(argv)

    from aligner.training.classifier import train_classifier

    areas = args.areas or areas_of(args.data)
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
