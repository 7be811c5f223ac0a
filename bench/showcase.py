"""Side by side: what each strategy does to a few prompts, judged by one reward.

    python -m bench.showcase --base-url http://127.0.0.1:8000/v1 --reward helpful-harmless

Prompts default to one harmful prompt (Do-Not-Answer, Apache-2.0) and two helpful ones
(MT-Bench first turns, Apache-2.0) read from ../shared/data/prompts. Prints a Markdown table
per prompt: strategy, reward of the answer (re-scored through /v1/alignment/score),
latency, generated tokens, and the answer's first words.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx

MODEL = "SmolLM2-135M-Instruct"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"


def strategies(reward: str) -> dict[str, dict]:
    return {
        "none": {"strategy": "none"},
        "best_of_n (8)": {"strategy": "best_of_n", "n": 8, "reward": reward},
        "soft_best_of_n (8, λ=0.5)": {"strategy": "soft_best_of_n", "n": 8, "reward": reward, "lambda": 0.5},
        "speculative_rejection (8)": {"strategy": "speculative_rejection", "n": 8, "reward": reward},
        "blockwise (k=4, 16 tok)": {"strategy": "blockwise", "k": 4, "block_tokens": 16, "reward": reward},
        "urial": {"strategy": "urial"},
        "rewrite": {"strategy": "rewrite"},
        "self_refine (1 round)": {"strategy": "self_refine", "rounds": 1, "reward": reward},
        "correct": {"strategy": "correct", "reward": reward},
        "urial → best_of_n(4) → self_refine": {"pipeline": [
            {"strategy": "urial"}, {"strategy": "best_of_n", "n": 4, "reward": reward},
            {"strategy": "self_refine", "rounds": 1, "reward": reward}]},
    }


def default_prompts() -> list[tuple[str, str]]:
    harmful = json.loads((SHARED / "do_not_answer.jsonl").read_text().splitlines()[40])["prompt"]
    bench = [json.loads(line) for line in (SHARED / "mt_bench.jsonl").read_text().splitlines()]
    helpful = [q["turns"][0] for q in bench if q["category"] in ("stem", "reasoning")][:2]
    return [("harmful", harmful)] + [("helpful", h) for h in helpful]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--reward", required=True)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    http = httpx.Client(timeout=900)
    arms = strategies(args.reward)
    # Every token-level guide the server registered (e.g. the shipped starter guides).
    for entry in http.get(f"{args.base_url}/alignment/rewards").json()["data"]:
        if entry["kind"] == "guide":
            knobs = {"alpha": 1.0} if entry["mode"] == "genarm" else {"k": 10, "weight": 1.0}
            label = ", ".join(f"{k}={v}" for k, v in knobs.items())
            arms[f"guided {entry['mode']} ({entry['name']}, {label})"] = {
                "strategy": "guided", "guide": entry["name"], "mode": entry["mode"], **knobs}
    for kind, prompt in default_prompts():
        messages = [{"role": "user", "content": prompt}]
        print(f"\n**{kind}**: {prompt}\n")
        print("| strategy | reward | latency s | generated tokens | answer (start) |")
        print("| --- | ---: | ---: | ---: | --- |")
        for name, alignment in arms.items():
            start = time.perf_counter()
            r = http.post(f"{args.base_url}/chat/completions", json={
                "model": MODEL, "messages": messages, "max_tokens": args.max_tokens, "seed": args.seed,
                "temperature": 0.8, "alignment": alignment})
            latency = time.perf_counter() - start
            if r.status_code != 200:
                print(f"| {name} | error {r.status_code} | | | {r.json()['error']['message'][:60]} |")
                continue
            body = r.json()
            answer = body["choices"][0]["message"]["content"]
            score = http.post(f"{args.base_url}/alignment/score", json={
                "messages": messages, "responses": [answer], "reward": args.reward}).json()["scores"][0]
            snippet = " ".join(answer.split()[:18]).replace("|", "\\|")
            print(f"| {name} | {score:.3f} | {latency:.1f} | {body['usage']['completion_tokens']} | {snippet}… |")


if __name__ == "__main__":
    main()
