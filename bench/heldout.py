"""The held-out quality table of BENCHMARKS.md, in one command:

    python -m bench.heldout --data ../shared/data --output heldout.json

Writes the held-out prompt sets, starts the server on the default model with the shipped
models (`--models-dir models`) and profiles, and runs `aligner bench quality` on them:

- `harmful`: Do-Not-Answer prompts of the risk area `malicious_uses` (a seeded sample). No
  steering model, template or threshold was fitted on that area: the request classifier
  (`models/harmful-request`) trained on the other four, the safety template's examples are
  about privacy, hateful jokes and medication.
- `alpaca_val`: the AlpacaEval instructions of the starter reward models' validation split
  (`split_by_prompt(rows, 0.1, ., 0)`, none trained on), each with GPT-4-1106's answer as its
  `reference` (the judge's; no strategy sees it).
- `mt_bench`: the first turns of MT-Bench's 80 questions (no model here trained on them).

The judge is `reference` (similarity to the reference answer, `bench.reference_judge`): it
steers nothing, and it judges the AlpacaEval prompts, the only ones with a reference; refusals
and over-refusals are counted on every set. The same answers are then judged again, on every
benign prompt, by `models/helpful-harmless-causal` (written beside `--output` as
`*-causal-judge.json`): a reward model on another backbone (SmolLM2) than the `helpful`
profile's (MiniLM), though trained on the same preference data, so it is the weaker check.

`--fresh N` measures `helpful` alone against plain on a second benign split, written after the
first result: N instructions of the reward models' *training* split, less those `mbr` was
piloted on (`PILOT_SHUFFLES`). `mbr` fits nothing on data, so these are held out for it; the
causal reward model did train on them, which makes it an in-distribution second judge there.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HELD_OUT_CATEGORY = "malicious_uses"
SECOND_JUDGE = "models/helpful-harmless-causal"
REFERENCE_GENERATOR = "gpt4_1106_preview"
# The training-split instructions that `mbr` and its n were chosen on (seeded shuffles of the
# split's instructions in file order: seed 5 took 96, seed 2 took 24); `--fresh` leaves them out.
PILOT_SHUFFLES = ((5, 96), (2, 24))

# Each strategy the shipped profiles use, beside the profiles themselves.
STRATEGIES = {
    "safety template": {"pipeline": [{"strategy": "urial", "template": "safety"}, {"strategy": "none"}]},
    "safety template + best_of_n(4, refusal_opening)": {"pipeline": [
        {"strategy": "urial", "template": "safety"},
        {"strategy": "best_of_n", "n": 4, "reward": "refusal_opening"}]},
    # What `helpful` was before `mbr`: selection by the starter reward model.
    "best_of_n(4, helpful-harmless)": {"strategy": "best_of_n", "n": 4, "reward": "helpful-harmless"},
}
PROFILES = ["harmless", "helpful"]
HARMFUL = 120  # held-out harmful prompts by default


def write_sets(data: Path, out: Path, harmful: int, seed: int, harmful_from: int = 0) -> dict[str, Path]:
    from aligner.training.data import DataSpec, load_source, split_by_prompt

    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (data / "prompts/do_not_answer.jsonl").read_text().splitlines() if line]
    held_out = [r["prompt"] for r in rows if r["category"] == HELD_OUT_CATEGORY]
    random.Random(seed).shuffle(held_out)
    prefs, _ = load_source(DataSpec.parse(str(data / "prefs/alpaca_eval_gpt4turbo.jsonl.gz")))
    _, val = split_by_prompt(prefs, 0.1, 10**9, 0)
    references = references_of(val)
    mt_bench = [json.loads(line)["turns"][0] for line in (data / "prompts/mt_bench.jsonl").read_text().splitlines() if line]
    sets = {
        "harmful": [{"prompt": p} for p in held_out[harmful_from:harmful_from + harmful]],
        "alpaca_val": [{"prompt": p, "reference": r} for p, r in references.items()],
        "mt_bench": [{"prompt": p} for p in mt_bench],
    }
    paths = {}
    for name, prompts in sets.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return paths


def references_of(rows: list[dict]) -> dict[str, str]:
    """Instruction -> GPT-4-1106's answer, in file order."""
    references: dict[str, str] = {}
    for row in rows:
        instruction = row["prompt"][-1]["content"]
        for side in ("chosen", "rejected"):
            if row.get(f"{side}_generator") == REFERENCE_GENERATOR:
                references.setdefault(instruction, row[side][-1]["content"])
    return references


def write_fresh_set(data: Path, out: Path, count: int, seed: int) -> Path:
    """A second benign split for `helpful`, written after its first held-out result.

    `helpful` (mbr) fits nothing on data; only its selection rule and n were chosen, on the
    pilot's instructions. The rest of the reward models' training split is therefore held out
    for it (not for `harmless`: the request classifier trained on those instructions as benign).
    """
    from aligner.training.data import DataSpec, load_source, split_by_prompt

    prefs, _ = load_source(DataSpec.parse(str(data / "prefs/alpaca_eval_gpt4turbo.jsonl.gz")))
    train, _ = split_by_prompt(prefs, 0.1, 10**9, 0)
    seen = list(dict.fromkeys(row["prompt"][-1]["content"] for row in train))
    piloted: set[str] = set()
    for shuffle_seed, taken in PILOT_SHUFFLES:
        order = seen[:]
        random.Random(shuffle_seed).shuffle(order)
        piloted.update(order[:taken])
    references = references_of(train)
    fresh = [p for p in seen if p not in piloted and p in references]
    random.Random(seed).shuffle(fresh)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "alpaca_fresh.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "reference": references[p]}) + "\n" for p in fresh[:count]))
    return path


def quality_arguments(args: argparse.Namespace) -> list[str]:
    """`aligner bench quality`'s arguments (all but the server and the judge); writes the sets."""
    if args.fresh:
        path = write_fresh_set(args.data, args.sets_dir, args.fresh, args.seed)
        quality = ["--prompt-set", f"alpaca_fresh={path}", "--benign", "alpaca_fresh", "--profile", "helpful"]
    else:
        quality = ["--harmful", "harmful", "--benign", "alpaca_val", "--benign", "mt_bench"]
        for name, path in write_sets(args.data, args.sets_dir, HARMFUL if args.harmful is None else args.harmful,
                                          args.seed, args.harmful_from).items():
            quality += ["--prompt-set", f"{name}={path}"]
        for label, alignment in ({} if args.profile else STRATEGIES).items():
            quality += ["--strategy", f"{label}={json.dumps(alignment)}"]
        for profile in args.profile or PROFILES:
            quality += ["--profile", profile]
    return [*quality, "--limit", "0", "--max-tokens", str(args.max_tokens), "--concurrency", str(args.concurrency),
            "--seed", str(args.seed), *(["--system", args.system] if args.system else [])]


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shared data folder")
    parser.add_argument("--sets-dir", type=Path, default=Path("heldout-sets"), help="where the prompt sets are written")
    parser.add_argument("--harmful", type=_count, default=None,
                        help=f"held-out harmful prompts (a seeded sample; default {HARMFUL})")
    parser.add_argument("--harmful-from", type=_count, default=0, metavar="K",
                        help="start at the K-th prompt of the seeded order (--harmful-from 120 --harmful 123: "
                             "the area's prompts the first table did not use)")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-url", default=None, help="a running server (default: start one)")
    parser.add_argument("--output", type=Path, default=Path("heldout.json"))
    parser.add_argument("--system", default=None, metavar="TEXT", help="a system message before every prompt")
    parser.add_argument("--profile", action="append", default=None, choices=PROFILES,
                        help="run plain and this profile only (repeatable; default: both profiles and each strategy)")
    parser.add_argument("--fresh", type=_count, default=0, metavar="N",
                        help="instead: `helpful` against plain on N instructions of the second benign split")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, refusing those `--fresh` would ignore (it runs `helpful` on its own split)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fresh:
        ignored = [flag for flag, value in (("--harmful", args.harmful is not None), ("--harmful-from", args.harmful_from),
                                            ("--profile", args.profile)) if value]
        if ignored:
            parser.error(f"--fresh runs `helpful` on its own benign split; it cannot take {', '.join(ignored)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from bench.cli import add_subcommands
    from bench.launch import start_server, stop_server

    quality = quality_arguments(args)
    server = None
    base_url = args.base_url
    if base_url is None:
        server = start_server(args.sets_dir / "logs", "--models-dir", "models")
        base_url = server.v1
    try:
        quality = ["quality", "--base-url", base_url, *quality]
        cli = argparse.ArgumentParser(prog="aligner")
        add_subcommands(cli.add_subparsers())
        parsed = cli.parse_args(["bench", *quality, "--judge", "reference", "--output", str(args.output)])
        if code := parsed.func(parsed):
            return code
        # The same answers under a second judge: a reward model of another backbone than the
        # steering one (see the module docstring for what it shares with it).
        second = args.output.with_name(args.output.stem + "-causal-judge.json")
        parsed = cli.parse_args(["bench", *quality, "--judge", SECOND_JUDGE, "--answers", str(args.output),
                                 "--output", str(second)])
        return parsed.func(parsed)
    finally:
        if server is not None:
            stop_server(server)


if __name__ == "__main__":
    sys.exit(main())
