"""Step-level search (particle filtering, beam search) beside best-of-N at equal samples:

    python -m bench.particles --data ../shared/data --output bench/raw/particles/measure.json

Starts the server as `make serve` does (`--models-dir models`: the shipped reward models; the
default one steers every arm) unless `--base-url` names one. Arms, each generating four
sequences at a time: plain; `best_of_n` n=4; `particle_filter` n=4; `beam_search` n=2, k=2
(blocks of `--block-tokens`). Prompts: AlpacaEval's held-out split (instructions the reward
models never trained on, each with a reference answer), through `aligner bench quality`,
judged by `reference` (similarity to the reference answer: it steers nothing).

Then every answer is scored again by the steering reward (`POST /v1/alignment/score`): the
search's own objective, reported beside the judge, never instead of it. Adds the tokens each
arm generated per request and the paired differences (judge and reward, particle filter and
beam search each against best-of-N) with a bootstrap interval over prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import httpx

from bench.auto import paired_bootstrap, quality_of_arms

ARMS = {
    "best_of_n(4)": {"strategy": "best_of_n", "n": 4},
    "particle_filter(4)": {"strategy": "particle_filter", "n": 4},
    "beam_search(2x2)": {"strategy": "beam_search", "n": 2, "k": 2},
}


def arms(block_tokens: int) -> dict[str, dict]:
    return {label: ({**a, "block_tokens": block_tokens} if a["strategy"] != "best_of_n" else dict(a))
            for label, a in ARMS.items()}


def rescore(base_url: str, answers: list[dict], reward: str) -> None:
    """Each answer's `steering_reward`: the reward the arms steer with, of (prompt, answer)."""
    with httpx.Client(timeout=120) as http:
        for a in answers:
            if a.get("error") or a.get("text") is None:
                a["steering_reward"] = None
                continue
            r = http.post(f"{base_url}/alignment/score", json={
                "messages": [{"role": "user", "content": a["prompt"]}], "responses": [a["text"]], "reward": reward})
            r.raise_for_status()
            a["steering_reward"] = r.json()["scores"][0]


def cost(rows: list[dict]) -> dict:
    """Mean FLOPs per request (policy and rewards, from `alignment.compute`, where the server
    reported it) and, for the step-level searches, the share of the answer's tokens streamed
    before the search ended."""
    out = {}
    reports = [a.get("report") or {} for a in rows]
    computes = [r["compute"] for r in reports if "compute" in r]
    if computes and len(computes) == len(rows):
        out["policy_gflops_per_request"] = statistics.fmean(
            sum(m["flops"] or 0 for m in c["models"].values()) for c in computes) / 1e9
        out["reward_gflops_per_request"] = statistics.fmean(
            sum(r["flops"] or 0 for r in c["rewards"].values()) for c in computes) / 1e9
    early = [(r["streamed_early_tokens"], r["particles"][r["selected"]]["completion_tokens"])
             for r in reports if "streamed_early_tokens" in r and r.get("selected") is not None]
    if early:
        out["streamed_early_share"] = sum(e for e, _ in early) / max(1, sum(t for _, t in early))
    return out


def compare(answers: list[dict], labels: list[str], base: str) -> dict:
    """Per arm: mean steering reward and judge, tokens; each search arm minus `base`, paired by prompt."""
    by = {label: {a["prompt"]: a for a in answers if a["strategy"] == label} for label in labels}
    out: dict = {"arms": {}, "differences": {}}
    for label in labels:
        rows = list(by[label].values())
        rewards = [a["steering_reward"] for a in rows if a.get("steering_reward") is not None]
        out["arms"][label] = {
            "requests": len(rows),
            "mean_steering_reward": statistics.fmean(rewards) if rewards else None,
            "mean_judge": statistics.fmean(a["judge"] for a in rows if a.get("judge") is not None),
            "tokens_per_request": statistics.fmean(a["tokens"] for a in rows if a.get("tokens") is not None),
            "latency_s_per_request": statistics.fmean(a["latency_s"] for a in rows if a.get("latency_s") is not None),
            **cost(rows),
        }
    for label in labels:
        if label in (base, "plain"):
            continue
        common = [p for p in by[label] if p in by[base]]
        diff = {}
        for key in ("judge", "steering_reward"):
            pairs = [(by[label][p][key], by[base][p][key]) for p in common
                     if by[label][p].get(key) is not None and by[base][p].get(key) is not None]
            mean, lo, hi = paired_bootstrap([a for a, _ in pairs], [b for _, b in pairs])
            diff[key] = {"pairs": len(pairs), "mean": mean, "ci95": [lo, hi]}
        out["differences"][f"{label} - {base}"] = diff
    return out


def chosen_arms(args: argparse.Namespace) -> dict[str, dict]:
    """The arms `--arm LABEL=JSON` names (replacing the default four), else the default."""
    if not args.arm:
        return arms(args.block_tokens)
    chosen = {}
    for spec in args.arm:
        label, sep, alignment = spec.partition("=")
        if not sep:
            raise SystemExit(f"--arm takes LABEL=JSON, got {spec!r}")
        chosen[label] = json.loads(alignment)
    return chosen


def run(args: argparse.Namespace, base_url: str) -> int:
    searched = chosen_arms(args)
    if code := quality_of_arms(args, base_url, searched):
        return code
    result = json.loads(args.output.read_text())
    listing = httpx.get(f"{base_url}/alignment/rewards", timeout=30).json()["data"]
    reward = next(r["name"] for r in listing if r.get("default"))
    rescore(base_url, result["answers"], reward)
    result["steering"] = {"reward": reward, **compare(result["answers"], ["plain", *searched], args.base_arm)}
    args.output.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["steering"], indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--sets-dir", type=Path, default=Path("particles-sets"))
    parser.add_argument("--prompts", type=int, default=0, help="prompts (0: all of the held-out split)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--block-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-url", default=None, help="a running server (default: start one as make serve does)")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--prompt-file", type=Path, default=None,
                        help="JSONL rows with `prompt` and `reference` instead of the AlpacaEval split")
    parser.add_argument("--arm", action="append", default=[],
                        help="LABEL=JSON alignment, repeatable: these arms (beside plain) instead of the default four")
    parser.add_argument("--base-arm", default="best_of_n(4)", help="the arm the others are paired against")
    parser.add_argument("--summarize", action="store_true",
                        help="recompute the comparison from --output's answers (already rescored); no server")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.summarize:
        result = json.loads(args.output.read_text())
        labels = list(dict.fromkeys(a["strategy"] for a in result["answers"]))
        result["steering"] = {"reward": result["steering"]["reward"], **compare(result["answers"], labels, args.base_arm)}
        args.output.write_text(json.dumps(result, indent=2))
        print(json.dumps(result["steering"], indent=2))
        return 0
    from bench.launch import shipped_server

    args.output.parent.mkdir(parents=True, exist_ok=True)
    with shipped_server(args.base_url, args.sets_dir / "logs") as base_url:
        return run(args, base_url)

if __name__ == "__main__":
    sys.exit(main())
