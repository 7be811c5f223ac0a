"""Tune speculative rejection for a reward model by replaying it on full samples.

    python -m bench.search_replay --base-url http://127.0.0.1:8000/v1 --reward helpful-harmless \
        --prompt-file ../shared/data/prompts/mt_bench.jsonl --prompts 32 --max-tokens 128

For each prompt it samples N full answers (one request, n=N), scores every `--every`-token
prefix of each with the reward, then replays speculative rejection's rule on those answers
for a grid of (chunk_tokens, rejection_rate, min_survivors): the survivors of a round
continue with their own sampled continuation, which is distributed like the fresh one the
server would draw. It prints how well a prefix's score predicts the finished answer's
(within-prompt Spearman correlation by prefix length) and, for each setting, the share of
best-of-N's gain over one sample that it keeps and the share of best-of-N's tokens it
generates. Much steadier than running the strategies on a few prompts (`bench.search`),
and it shows what the reward model allows before choosing the defaults for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.best_of_n import add_prompt_args, add_server_args, load_prompts, reward_server
from bench.launch import stop_server

MODEL = "SmolLM2-135M-Instruct"


@dataclass
class Sample:
    length: int  # generated tokens
    score: float  # the finished answer's reward
    prefix_scores: dict[int, float]  # reward of the first t tokens, for t < length

    def at(self, t: int) -> float:
        """What the strategy sees after t tokens: the partial answer's score, or the final one."""
        return self.score if self.length <= t else self.prefix_scores[t]


def replay(samples: list[Sample], chunk: int, rate: float, survivors: int, budget: int) -> tuple[float, int]:
    """Speculative rejection's rule (aligner/strategies/speculative_rejection.py) on finished
    samples -> (reward of the answer it returns, tokens it generates)."""
    alive, finished, t, tokens = list(range(len(samples))), [], 0, 0
    while alive:
        final = len(alive) <= survivors
        nt = budget if final else min(t + chunk, budget)
        tokens += sum(max(0, min(samples[i].length, nt) - t) for i in alive)
        t = nt
        done = [i for i in alive if samples[i].length <= t or t >= budget]
        finished += done
        alive = [i for i in alive if i not in done]
        if len(alive) > survivors:
            keep = max(survivors, len(alive) - math.floor(rate * len(alive)))
            alive = sorted(alive, key=lambda i: -samples[i].at(t))[:keep]
    return max(samples[i].score for i in finished), tokens


def spearman(a: list[float], b: list[float]) -> float | None:
    def ranks(xs):  # average ranks for ties
        order = sorted(range(len(xs)), key=xs.__getitem__)
        r = [0.0] * len(xs)
        start = 0
        while start < len(order):
            end = start
            while end + 1 < len(order) and xs[order[end + 1]] == xs[order[start]]:
                end += 1
            for i in order[start : end + 1]:
                r[i] = (start + end) / 2
            start = end + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    if not va or not vb:
        return None
    return sum((x - ma) * (y - mb) for x, y in zip(ra, rb)) / math.sqrt(va * vb)


async def collect(base_url: str, prompts: list[str], n: int, max_tokens: int, every: int, reward: str, tokenizer) -> list[list[Sample]]:
    out = []
    async with httpx.AsyncClient(timeout=900) as http:
        for i, prompt in enumerate(prompts):
            messages = [{"role": "user", "content": prompt}]
            r = await http.post(f"{base_url}/chat/completions", json={
                "model": MODEL, "messages": messages, "n": n, "max_tokens": max_tokens, "temperature": 1.0, "seed": 100 + i})
            r.raise_for_status()
            texts = [c["message"]["content"] for c in r.json()["choices"]]
            ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
            cuts = [(j, t) for j, tok in enumerate(ids) for t in range(every, len(tok), every)]
            responses = [tokenizer.decode(ids[j][:t]) for j, t in cuts] + texts
            scores = []
            for start in range(0, len(responses), 16):  # the server's per-request candidate limit
                s = await http.post(f"{base_url}/alignment/score", json={
                    "messages": messages, "responses": responses[start : start + 16], "reward": reward})
                s.raise_for_status()
                scores += s.json()["scores"]
            samples = [Sample(len(tok), scores[len(cuts) + j], {}) for j, tok in enumerate(ids)]
            for (j, t), score in zip(cuts, scores):
                samples[j].prefix_scores[t] = score
            out.append(samples)
            print(f"prompt {i + 1}/{len(prompts)}: best-of-{n} {max(s.score for s in samples):.3f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(parser)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--every", type=int, default=8, help="prefix lengths scored; chunk sizes are multiples of it")
    add_prompt_args(parser)
    parser.add_argument("--samples", type=Path, default=None, help="reuse (if it exists) or save the scored samples here")
    args = parser.parse_args()

    if args.samples and args.samples.is_file():
        data = [[Sample(s["length"], s["score"], {int(k): v for k, v in s["prefix_scores"].items()}) for s in p]
                for p in json.loads(args.samples.read_text())]
    else:
        from transformers import AutoTokenizer

        from decoding.model_prep import prepare_default_model

        tokenizer = AutoTokenizer.from_pretrained(prepare_default_model())
        prompts = load_prompts(args)
        server, base_url = reward_server(args, "bench-search-replay-")
        try:
            data = asyncio.run(collect(base_url, prompts, args.n, args.max_tokens, args.every, args.reward, tokenizer))
        finally:
            if server is not None:
                stop_server(server)
        if args.samples:
            args.samples.write_text(json.dumps([[vars(s) for s in p] for p in data]))

    print(f"\n{len(data)} prompts, N={args.n}, max_tokens {args.max_tokens}")
    for t in range(args.every, args.max_tokens, args.every):
        rhos = [spearman([s.prefix_scores[t] for s in p if t in s.prefix_scores], [s.score for s in p if t in s.prefix_scores])
                for p in data if sum(t in s.prefix_scores for s in p) >= 4]
        rhos = [r for r in rhos if r is not None]
        if rhos:
            print(f"prefix of {t:>3} tokens: within-prompt Spearman(prefix score, final score) {statistics.mean(rhos):.2f} ({len(rhos)} prompts)")
    best = statistics.mean(max(s.score for s in p) for p in data)
    one = statistics.mean(statistics.mean(s.score for s in p) for p in data)
    bon_tokens = sum(s.length for p in data for s in p)
    print(f"best-of-{args.n}: {best:.3f}; one sample: {one:.3f}")
    print(f"{'chunk':>6} {'rate':>5} {'survivors':>9} {'reward':>8} {'gain':>6} {'tokens':>7}")
    for chunk in [c for c in (args.every, 2 * args.every, 3 * args.every, 4 * args.every) if c < args.max_tokens]:
        for rate in (0.25, 0.5, 0.75):
            for survivors in (1, 2, 3):
                runs = [replay(p, chunk, rate, survivors, args.max_tokens) for p in data]
                reward = statistics.mean(r for r, _ in runs)
                share = (reward - one) / (best - one) if best != one else float("nan")
                print(f"{chunk:>6} {rate:>5} {survivors:>9} {reward:>8.3f} {share:>6.0%} {sum(t for _, t in runs) / bon_tokens:>7.0%}")


if __name__ == "__main__":
    main()
