"""Best-of-N, speculative rejection and blockwise search at equal N, side by side.

    python -m bench.search                     # starts a server with a MiniLM reward model
    python -m bench.search --base-url http://127.0.0.1:8000/v1 --reward helpful-harmless

For each prompt (same seeds for every arm) it records the reward of the returned answer
(re-scored by the same reward through `POST /v1/alignment/score`), the tokens generated,
the time to the answer, and for blockwise the time to its first streamed token. Targets: speculative rejection >= 95% of best-of-N's
mean reward with <= 50% of its tokens; blockwise's first token >= 3x sooner than best-of-N's
answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

from bench.best_of_n import add_prompt_args, add_server_args, load_prompts, reward_server
from bench.launch import stop_server

MODEL = "SmolLM2-135M-Instruct"


async def run_once(http, url, prompt, alignment, max_tokens, seed, stream):
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "seed": seed, "temperature": 1.0, "alignment": alignment}
    start = time.perf_counter()
    if not stream:
        r = await http.post(url, json=body)
        r.raise_for_status()
        data = r.json()
        row = {"latency": time.perf_counter() - start, "first": time.perf_counter() - start,
               "tokens": data["usage"]["completion_tokens"], "text": data["choices"][0]["message"]["content"]}
        if (data.get("alignment") or {}).get("candidates"):
            row["candidate_scores"] = [c["score"] for c in data["alignment"]["candidates"]]
        return row
    body.update(stream=True, stream_options={"include_usage": True})
    first, usage, text = None, None, ""
    async with http.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter() - start
                text += event["choices"][0]["delta"]["content"]
            usage = event.get("usage") or usage
    return {"latency": time.perf_counter() - start, "first": first or 0.0, "tokens": usage["completion_tokens"], "text": text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(parser)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    add_prompt_args(parser)
    parser.add_argument("--sr", default="{}", help="speculative rejection parameters beyond n and reward, as JSON "
                        "(default: the strategy's defaults), e.g. '{\"chunk_tokens\": 8, \"min_survivors\": 3}'")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    server, base_url = reward_server(args, "bench-search-")
    url = f"{base_url}/chat/completions"
    arms = {
        "plain": ({"strategy": "none"}, False),
        "best_of_n": ({"strategy": "best_of_n", "n": args.n, "reward": args.reward, "return_candidates": True}, False),
        "speculative_rejection": ({"strategy": "speculative_rejection", "n": args.n, "reward": args.reward,
                                   **json.loads(args.sr)}, False),
        "blockwise": ({"strategy": "blockwise", "k": args.k, "block_tokens": 16, "reward": args.reward}, True),
    }
    prompts = load_prompts(args)
    rows = {name: [] for name in arms}

    async def go():
        async with httpx.AsyncClient(timeout=900) as http:
            await run_once(http, url, prompts[0], {"strategy": "none"}, 4, 0, False)  # warm-up
            for i, prompt in enumerate(prompts):
                texts = {}
                for name, (alignment, stream) in arms.items():
                    rows[name].append(await run_once(http, url, prompt, alignment, args.max_tokens, 100 + i, stream))
                    texts[name] = rows[name][-1]["text"]
                # One judge for all arms: the same reward over the final answers, in one call.
                scores = await score_answers(http, base_url, prompt, [texts[n] for n in arms], args.reward)
                for name, score in zip(arms, scores):
                    rows[name][-1]["reward"] = score

    try:
        asyncio.run(go())
    finally:
        if server is not None:
            stop_server(server)
    summary = {}
    for name, results in rows.items():
        summary[name] = {
            "mean_reward": statistics.mean(r["reward"] for r in results),
            "mean_tokens": statistics.mean(r["tokens"] for r in results),
            "mean_latency_s": statistics.mean(r["latency"] for r in results),
            "mean_first_token_s": statistics.mean(r["first"] for r in results),
        }
    bon = summary["best_of_n"]
    print(f"N={args.n}, blockwise k={args.k}, {args.prompts} prompts, max_tokens {args.max_tokens}")
    print(f"{'arm':<22} {'reward':>8} {'tokens':>8} {'answer s':>9} {'first token s':>14}")
    for name, s in summary.items():
        print(f"{name:<22} {s['mean_reward']:>8.3f} {s['mean_tokens']:>8.1f} {s['mean_latency_s']:>9.2f} {s['mean_first_token_s']:>14.2f}")
    sr = summary["speculative_rejection"]
    # One sample's expected reward: the mean of best-of-N's N candidates (N samples per prompt,
    # a steadier baseline than the single plain sample).
    sample = statistics.mean(statistics.mean(r["candidate_scores"]) for r in rows["best_of_n"])
    gain = bon["mean_reward"] - sample
    print(f"one sample (mean of best-of-N's candidates): reward {sample:.3f}")
    print(f"speculative rejection: reward {reward_ratio(sr['mean_reward'], bon['mean_reward'])} of best-of-N, "
          f"{(sr['mean_reward'] - sample) / gain:.1%} of best-of-N's gain over one sample, "
          f"tokens {sr['mean_tokens'] / bon['mean_tokens']:.1%} of best-of-N")
    print(f"blockwise first token {bon['mean_latency_s'] / summary['blockwise']['mean_first_token_s']:.1f}x sooner "
          "than best-of-N's answer")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))


def reward_ratio(value: float, reference: float) -> str:
    """Rewards can be negative: report the ratio only where it means something."""
    return f"{value / reference:.1%}" if reference > 0 and value > 0 else f"{value:.3f} vs {reference:.3f}"


async def score_answers(http, base_url, prompt, texts, reward) -> list[float]:
    r = await http.post(f"{base_url}/alignment/score", json={"messages": [{"role": "user", "content": prompt}],
                                                            "responses": texts, "reward": reward})
    r.raise_for_status()
    return r.json()["scores"]


if __name__ == "__main__":
    main()
