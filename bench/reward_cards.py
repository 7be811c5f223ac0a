"""Re-measure a reward model's card through the serving path.

`eval-rm` scores pairs with the trainer's encoder and batching; the server scores a chat
request's answers with `aligner.rewards.hf.SequenceClassifierReward`. This scores the card's
own validation pairs (the split its card was measured on: seed, fraction and cap) both ways, side by side,
and prints the card's numbers beside them.

    python -m bench.reward_cards models/helpful-harmless [--limit 500] [--output FILE]

The data files are the ones the model was trained from (`eval.json`'s `config.data`, under
`../shared/data` in this project), or `--data FILE[:WEIGHT] ...`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def measure(model_dir: Path, data: list[str], limit: int | None, batch_size: int) -> dict:
    from aligner.rewards.hf import SequenceClassifierReward
    from aligner.rewards.encoding import PairEncoder
    from aligner.training.data import response_text
    from aligner.training.evaluate import (
        EVAL_FILE,
        load_reward_model,
        pair_metrics,
        score_pairs,
        validation_rows,
    )

    card = json.loads((model_dir / EVAL_FILE).read_text())
    measured = card.get("split", {})  # the split the card's numbers were measured on
    val, split = validation_rows(model_dir, data or card["config"]["data"], seed=measured.get("seed"),
                                 val_fraction=measured.get("val_fraction"), max_val_pairs=measured.get("max_val_pairs"))
    served_reward = SequenceClassifierReward(model_dir.name, model_dir, max_length=1024, max_batch_size=batch_size)
    model, tokenizer = load_reward_model(model_dir, "bt")
    encoder = PairEncoder.for_model(tokenizer, model_dir, 512)
    report = {"model": str(model_dir), "split": split, "sources": {}}
    for source, rows in val.items():
        rows = rows[:limit] if limit else rows
        started = time.perf_counter()
        served = served_reward.score([r["prompt"] for r in rows] * 2,
                                     [response_text(r["chosen"]) for r in rows]
                                     + [response_text(r["rejected"]) for r in rows])
        served_s = time.perf_counter() - started
        started = time.perf_counter()
        chosen, rejected = score_pairs(model, "bt", [encoder.encode_pair(r) for r in rows],
                                       pad_token_id=tokenizer.pad_token_id, batch_size=batch_size, desc=source)
        eval_s = time.perf_counter() - started
        report["sources"][source] = {
            "card": card.get("sources", {}).get(source),
            "eval_rm": pair_metrics(rows, chosen, rejected),
            "served": pair_metrics(rows, served[: len(rows)], served[len(rows):]),
            "max_abs_score_difference": max(abs(a - b) for a, b in zip(served, chosen + rejected)),
            "seconds": {"served": round(served_s, 1), "eval_rm": round(eval_s, 1)},
        }
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['model']}  (split {report['split']})",
             f"{'source':<24}{'n':>6}  {'accuracy card / eval-rm / served':>34}  {'length-controlled':>26}  max |diff|"]
    for source, r in report["sources"].items():
        def both(key: str) -> str:
            card = r["card"][key] if r["card"] and r["card"].get("n") == r["eval_rm"]["n"] else None
            values = [card, r["eval_rm"][key], r["served"][key]]
            return " / ".join("-" if v is None else f"{v:.3f}" for v in values)
        lines.append(f"{source:<24}{r['eval_rm']['n']:>6}  {both('accuracy'):>34}  "
                     f"{both('length_controlled_accuracy'):>26}  {r['max_abs_score_difference']:.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--data", nargs="*", default=None, metavar="FILE[:WEIGHT]")
    parser.add_argument("--limit", type=int, default=None, help="pairs per source (the card's n needs all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", type=Path, default=None, help="JSON of every number")
    args = parser.parse_args(argv)
    reports = [measure(m, args.data, args.limit, args.batch_size) for m in args.models]
    for report in reports:
        print(format_report(report))
    if args.output:
        args.output.write_text(json.dumps(reports, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
