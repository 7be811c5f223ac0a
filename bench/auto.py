"""`auto` beside best-of-8 and plain decoding, and the pilot its defaults were chosen on:

    python -m bench.auto pilot --data ../shared/data --output bench/raw/auto/pilot.json
    python -m bench.auto measure --data ../shared/data --output bench/raw/auto/measure.json

    python -m bench.auto load --data ../shared/data --output bench/raw/auto/load.json

(`--prompt-file FILE` takes the prompts, with their `reference`s, from a JSONL file instead.)

Both start the server as `make serve` does (`--models-dir models`: the shipped reward models,
the first of which is the default reward that best-of-N and `auto` select with).

- `pilot`: instructions of the reward models' *training* split of AlpacaEval (a seeded
  sample; the held-out split is never used here). Each is asked once of `auto` with a rule
  that never stops early (n 8, start 2, min_gain 0, agree 100), so every request samples its
  rounds of 2, 2 and 4 and reports every candidate with its reward. Since a round's seed does
  not depend on whether the next one runs, any stopping rule can then be replayed on these
  candidates (`replay`): how many candidates it would have used and the reward of the answer
  it would have chosen. The table is a grid of (min_gain, agree); the rule for choosing the
  defaults is in `choose`. The reward here is the steering reward: it chooses the rule, it
  does not measure the answers.
- `measure`: AlpacaEval's held-out split (the instructions the reward models never trained on,
  each with GPT-4-1106's answer as a reference), plain, best_of_n n=8 and `auto` with its
  defaults, through `aligner bench quality`, judged by `reference` (similarity to the
  reference answer; it steers nothing). Adds what `auto` spent: candidates per request, why
  it stopped, tokens beside best-of-8's, and the paired difference of judge scores with a
  bootstrap interval over prompts.
- `load`: the same held-out instructions under load (`run_load_compare`): whether the
  candidates `auto` does not sample buy throughput when the engine is busy.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from collections import Counter
from pathlib import Path

PILOT_SEED = 7
GRID_GAIN = (0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, math.inf)
GRID_AGREE = (40.0, 50.0, 60.0, 70.0, 100.0)
NEVER_STOP = {"strategy": "auto", "n": 8, "start": 2, "min_gain": None, "agree": None, "return_candidates": True}
ROUNDS = (2, 4, 8)  # candidates after each round of start 2, doubling, n 8


def replay(candidates: list[dict], min_gain: float | None, agree: float | None) -> tuple[int, float]:
    """(candidates used, reward of the chosen answer) under one stopping rule (None: that test
    never stops), on the 8 candidates a never-stopping request sampled (in round order).

    >>> rows = [{"score": s, "text": t} for s, t in [(0, "a b"), (1, "c d"), (3, "e f"), (0, "g h")] + [(9, "i j")] * 4]
    >>> replay(rows, math.inf, None), replay(rows, 0, 100), replay(rows, None, None)
    ((2, 1), (8, 9), (8, 9))
    >>> replay([{"score": 1.0, "text": t} for t in "abcdefgh"], 0, 100)  # no spread: no gain
    (2, 1.0)
    """
    from aligner.strategies.auto import expected_gain
    from aligner.strategies.mbr import consensus

    if len(candidates) != ROUNDS[-1]:
        raise ValueError(f"a replay needs the {ROUNDS[-1]} candidates of a request that never stopped")
    for k, after in zip(ROUNDS, ROUNDS[1:]):
        scores = [c["score"] for c in candidates[:k]]
        agreement = statistics.mean(consensus([c["text"] for c in candidates[:k]]))
        if (agree is not None and agreement >= agree) or (
                min_gain is not None and expected_gain(scores, after - k) <= min_gain):
            return k, max(scores)
    return len(candidates), max(c["score"] for c in candidates)


def choose(table: list[dict]) -> dict:
    """The rule written down before the pilot ran: among the settings that keep at least 75%
    of best-of-8's mean reward gain over best-of-2, the one that uses the fewest candidates
    (ties: the higher reward)."""
    bo2 = next(r for r in table if r["min_gain"] == math.inf)["reward"]
    bo8 = next(r for r in table if r["min_gain"] is None and r["agree"] is None)["reward"]
    keep = [r for r in table if r["reward"] - bo2 >= 0.75 * (bo8 - bo2)]
    return min(keep, key=lambda r: (r["candidates"], -r["reward"]))


def pilot_prompts(data: Path, count: int) -> list[str]:
    from aligner.training.data import DataSpec, load_source, split_by_prompt

    prefs, _ = load_source(DataSpec.parse(str(data / "prefs/alpaca_eval_gpt4turbo.jsonl.gz")))
    train, _ = split_by_prompt(prefs, 0.1, 10**9, 0)
    seen = list(dict.fromkeys(row["prompt"][-1]["content"] for row in train))
    random.Random(PILOT_SEED).shuffle(seen)
    return seen[:count]


def run_pilot(args: argparse.Namespace, base_url: str) -> dict:
    import httpx

    rows = []
    if args.prompt_file is not None:
        prompts = [json.loads(line)["prompt"] for line in args.prompt_file.read_text().splitlines() if line.strip()]
        prompts = prompts[:args.prompts]
    else:
        prompts = pilot_prompts(args.data, args.prompts)
    for i, prompt in enumerate(prompts):
        body = {"model": args.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
                "temperature": args.temperature, "seed": args.seed + i, "alignment": NEVER_STOP}
        r = httpx.post(f"{base_url}/chat/completions", json=body, timeout=900)
        r.raise_for_status()
        report = r.json()["alignment"]
        rows.append({"prompt": prompt, "seed": args.seed + i, "params": report["params"],
                     "candidates": [{"text": c["text"], "score": c["score"], "tokens": c["completion_tokens"]}
                                    for c in report["candidates"]]})
        print(f"pilot {i + 1}/{len(prompts)}", file=sys.stderr)
    return {"rows": rows, **replay_grid(rows)}


def replay_grid(rows: list[dict]) -> dict:
    """The grid of stopping rules replayed on the pilot's requests (best-of-8 first: neither
    test stops; best-of-2: `min_gain` infinite), and the rule `choose` picks."""
    rules = [(None, None)] + [(g, a) for g in GRID_GAIN for a in (GRID_AGREE if g != math.inf else (None,))]
    table = []
    for min_gain, agree in rules:
        replayed = [replay(row["candidates"], min_gain, agree) for row in rows]
        table.append({"min_gain": min_gain, "agree": agree, "candidates": statistics.mean(k for k, _ in replayed),
                      "reward": statistics.mean(s for _, s in replayed)})
    return {"table": table, "chosen": choose(table)}


def paired_bootstrap(a: list[float], b: list[float], rounds: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over paired prompts, and its percentile bootstrap 95% interval."""
    diffs = [x - y for x, y in zip(a, b)]
    rng = random.Random(seed)
    means = sorted(statistics.mean(rng.choices(diffs, k=len(diffs))) for _ in range(rounds))
    return statistics.mean(diffs), means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def spent(run: dict, auto: str, best: str) -> dict:
    """What `auto` spent and what it bought, beside best-of-N, from a quality run's answers."""
    answers = [a for a in run["answers"] if a["error"] is None]
    by = {(a["prompt"], a["strategy"]): a for a in answers}
    prompts = [p for p in dict.fromkeys(a["prompt"] for a in answers)
               if all((p, s) in by for s in (auto, best, "plain"))]
    auto_rows = [by[(p, auto)] for p in prompts]
    judged = [p for p in prompts if all(by[(p, s)]["judge"] is not None for s in (auto, best, "plain"))]
    result = {
        "prompts": len(prompts),
        "candidates": Counter(a["report"]["candidates_used"] for a in auto_rows),
        "stopped": Counter(str(a["report"]["stopped"]) for a in auto_rows),
        "tokens": {s: statistics.mean(by[(p, s)]["tokens"] for p in prompts) for s in (auto, best, "plain")},
        "seconds": {s: statistics.mean(by[(p, s)]["latency_s"] for p in prompts) for s in (auto, best, "plain")},
    }
    for other in (best, "plain"):
        result[f"judge: {auto} - {other}"] = paired_bootstrap([by[(p, auto)]["judge"] for p in judged],
                                                              [by[(p, other)]["judge"] for p in judged])
    return result


def quality_of_arms(args: argparse.Namespace, base_url: str, arms: dict[str, dict]) -> int:
    """`aligner bench quality` of `arms` beside plain on AlpacaEval's held-out split (or
    `--prompt-file`), judged by `reference`, one request at a time, written to `args.output`;
    its exit code. `bench.particles` measures with it too."""
    from bench.cli import add_subcommands
    from bench.heldout import write_sets

    paths = ({"alpaca_val": args.prompt_file} if args.prompt_file is not None
             else write_sets(args.data, args.sets_dir, 0, args.seed))
    quality = ["bench", "quality", "--base-url", base_url, "--prompt-set", f"alpaca_val={paths['alpaca_val']}",
               "--benign", "alpaca_val", "--limit", str(args.prompts), "--max-tokens", str(args.max_tokens),
               "--temperature", str(args.temperature), "--seed", str(args.seed), "--concurrency", "1",
               "--judge", "reference", "--output", str(args.output)]
    for label, alignment in arms.items():
        quality += ["--strategy", f"{label}={json.dumps(alignment)}"]
    cli = argparse.ArgumentParser(prog="aligner")
    add_subcommands(cli.add_subparsers())
    parsed = cli.parse_args(quality)
    return parsed.func(parsed)


def run_measure(args: argparse.Namespace, base_url: str) -> int:
    arms = {"best_of_n(8)": {"strategy": "best_of_n", "n": 8}, "auto(8)": {"strategy": "auto", "n": 8}}
    if code := quality_of_arms(args, base_url, arms):
        return code
    run = json.loads(args.output.read_text())
    run["auto"] = spent(run, "auto(8)", "best_of_n(8)")
    args.output.write_text(json.dumps(run, indent=2))
    print(json.dumps(run["auto"], indent=2))
    return 0


def run_load_compare(args: argparse.Namespace, base_url: str) -> dict:
    """best_of_n n=8 against `auto` (n 8) under load: the same requests (prompts, seeds) to each
    arm at `--concurrency`, closed loop, answers of natural length, arms interleaved ABAB for
    `--repeats` rounds; requests per second and tokens per second of each run, their medians
    and the ratio of the medians."""
    import asyncio

    from bench.load import LoadConfig, run_load
    from bench.quality import load_prompt_file

    if args.prompt_file is not None:
        prompts = load_prompt_file(args.prompt_file)
    else:
        from bench.heldout import write_sets

        prompts = load_prompt_file(write_sets(args.data, args.sets_dir, 0, args.seed)["alpaca_val"])
    arms = {"best_of_n(8)": ("best_of_n", {"n": 8}), "auto(8)": ("auto", {"n": 8})}
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for _ in range(args.repeats):
        for arm, (strategy, params) in arms.items():
            cfg = LoadConfig(base_url=base_url, model=args.model, concurrency=args.concurrency, duration_s=None,
                             requests=args.requests, max_tokens=args.max_tokens, mix={strategy: 1.0},
                             params={strategy: params}, prompts=prompts, seed=args.seed, ignore_eos=False)
            result = asyncio.run(run_load(cfg))["results"][strategy]
            runs[arm].append({k: result[k] for k in ("requests", "completed", "errors", "requests_per_s",
                                                     "output_tokens_per_s", "output_tokens")})
            print(f"{arm}: {result['requests_per_s']:.3f} req/s, {result['output_tokens']} tokens", file=sys.stderr)
    medians = {arm: statistics.median(r["requests_per_s"] for r in rs) for arm, rs in runs.items()}
    return {"concurrency": args.concurrency, "requests": args.requests, "repeats": args.repeats, "runs": runs,
            "median_requests_per_s": medians,
            "spread_requests_per_s": {arm: [min(r["requests_per_s"] for r in rs), max(r["requests_per_s"] for r in rs)]
                                      for arm, rs in runs.items()},
            "ratio_auto_to_best_of_n": medians["auto(8)"] / medians["best_of_n(8)"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("pilot", "measure", "load"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--sets-dir", type=Path, default=Path("auto-sets"))
    parser.add_argument("--prompts", type=int, default=None, help="prompts (pilot default 24; measure default 0: all)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--base-url", default=None, help="a running server (default: start one as make serve does)")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=4, help="load: clients at once")
    parser.add_argument("--requests", type=int, default=16, help="load: requests per run")
    parser.add_argument("--repeats", type=int, default=3, help="load: runs per arm, interleaved")
    parser.add_argument("--prompt-file", type=Path, default=None,
                        help="JSONL rows with `prompt` (and `reference`, for measure) instead of the AlpacaEval splits")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.prompts is None:
        args.prompts = 24 if args.mode == "pilot" else 0
    from bench.launch import shipped_server

    args.output.parent.mkdir(parents=True, exist_ok=True)
    with shipped_server(args.base_url, args.sets_dir / "logs") as base_url:
        if args.mode == "measure":
            return run_measure(args, base_url)
        if args.mode == "load":
            result = run_load_compare(args, base_url)
            args.output.write_text(json.dumps(result, indent=2))
            print(json.dumps({k: result[k] for k in ("median_requests_per_s", "spread_requests_per_s",
                                                     "ratio_auto_to_best_of_n")}, indent=2))
            return 0
        result = run_pilot(args, base_url)
        args.output.write_text(json.dumps(result, indent=2, default=str))
        for row in result["table"]:
            print(f"min_gain {str(row['min_gain']):>5} agree {str(row['agree']):>5}: {row['candidates']:.2f} candidates, "
                  f"reward {row['reward']:.3f}")
        print("chosen:", result["chosen"])
        return 0


if __name__ == "__main__":
    sys.exit(main())
