"""Decode throughput of an OpenAI-compatible server: tokens/s for 1 and N concurrent streams.

    python -m bench.throughput --base-url http://127.0.0.1:8000/v1 --concurrency 1,8

Each stream asks for exactly `--max-tokens` tokens (`ignore_eos`), so runs are comparable.
Reports aggregate output tokens/s, per-stream tokens/s and mean time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


async def one_stream(http: httpx.AsyncClient, url: str, model: str, max_tokens: int, headers) -> dict:
    body = {
        "model": model,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", url, json=body, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"ttft": first or 0.0, "tokens": tokens, "elapsed": time.perf_counter() - start}


async def run_level(base_url: str, model: str, concurrency: int, max_tokens: int, headers) -> dict:
    url = f"{base_url}/chat/completions"
    async with httpx.AsyncClient(timeout=600) as http:
        await one_stream(http, url, model, 4, headers)  # warm-up, excluded
        start = time.perf_counter()
        results = await asyncio.gather(
            *(one_stream(http, url, model, max_tokens, headers) for _ in range(concurrency))
        )
        wall = time.perf_counter() - start
    total = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "output_tokens": total,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(total / wall, 1),
        "per_stream_tokens_per_s": round(statistics.mean(r["tokens"] / r["elapsed"] for r in results), 1),
        "mean_ttft_s": round(statistics.mean(r["ttft"] for r in results), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    print(f"{'conc':>4} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'per-stream tok/s':>17} {'TTFT s':>7}")
    for level in (int(c) for c in args.concurrency.split(",")):
        r = asyncio.run(run_level(args.base_url, args.model, level, args.max_tokens, headers))
        print(
            f"{r['concurrency']:>4} {r['output_tokens']:>7} {r['wall_s']:>7} {r['tokens_per_s']:>7}"
            f" {r['per_stream_tokens_per_s']:>17} {r['mean_ttft_s']:>7}"
        )


if __name__ == "__main__":
    main()
