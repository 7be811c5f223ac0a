"""Soak test: every strategy at moderate concurrency for a long time (not run in CI).

    python -m bench.soak --minutes 30 --concurrency 4

Starts its own server (default model, a MiniLM reward model with a random head, rule
rewards, the policy itself as a GenARM guide), then keeps `--concurrency` clients busy with a
mix of every registered strategy (plain, best-of-N plain and adaptive, `auto`, soft best-of-N,
blockwise, particle filtering, beam search, speculative rejection, guided, URIAL, rewrite, self-refine, correct, pipelines),
streamed and not; a share of the requests (`--deadline-share`) sets `alignment.deadline_s`.
Every window it records request count, 5xx, errors inside streams, other errors, p50/p99
latency, deadline-bounded requests answered late (after deadline + 1 s), and the resident
memory of the server and its engine processes. Pass criteria it prints: zero 5xx and stream
errors, no late deadline-bounded answer, memory growth under 5% after the warm-up window, p99
of the last window within 1.2x of the first post-warm-up window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from bench.best_of_n import PROMPTS, build_minilm_reward_model
from bench.launch import start_server, stop_server

MODEL = "SmolLM2-135M-Instruct"
MIX = [
    ({}, 0.11),
    ({"strategy": "mbr", "n": 4}, 0.05),
    ({"strategy": "auto", "n": 4, "reward": "rm"}, 0.04),
    ({"strategy": "decline", "n": 4}, 0.04),
    ({"strategy": "best_of_n", "n": 4, "reward": "rm"}, 0.06),
    ({"strategy": "best_of_n", "n": 8, "batch": 2, "stop_margin": 0.05, "reward": "rm"}, 0.05),
    ({"strategy": "soft_best_of_n", "n": 4, "reward": {"rm": 1.0, "length_penalty": 0.5}, "lambda": 0.5}, 0.05),
    ({"strategy": "best_of_n", "n": 2, "reward": "compliance"}, 0.05),
    ({"strategy": "blockwise", "k": 3, "block_tokens": 16, "reward": "rm"}, 0.04),
    ({"strategy": "particle_filter", "n": 4, "block_tokens": 16, "reward": "rm"}, 0.04),
    ({"strategy": "beam_search", "n": 2, "k": 2, "block_tokens": 16, "reward": "rm"}, 0.02),
    ({"strategy": "speculative_rejection", "n": 4, "chunk_tokens": 16, "reward": "rm"}, 0.06),
    ({"strategy": "guided", "guide": "arm", "alpha": 0.5}, 0.08),
    ({"strategy": "urial"}, 0.05),
    ({"strategy": "rewrite"}, 0.05),
    ({"strategy": "self_refine", "rounds": 1, "reward": "rm"}, 0.06),
    ({"strategy": "correct", "reward": "rm"}, 0.05),
    ({"pipeline": [{"strategy": "urial"}, {"strategy": "best_of_n", "n": 2, "reward": "rm"},
                   {"strategy": "self_refine", "rounds": 1, "reward": "rm"}]}, 0.1),
]
DEADLINES_S = (2.0, 4.0, 8.0)
LATE_AFTER_S = 1.0  # a deadline-bounded answer later than its deadline by more than this is late

STREAM_ERROR = "stream_error"  # a request whose stream carried an error event


def resident_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def strategy_of(alignment: dict) -> str:
    return "pipeline" if "pipeline" in alignment else alignment.get("strategy", "none")


async def client(http, url, stop_at, rng, records, deadline_share):
    while time.monotonic() < stop_at:
        alignment = dict(rng.choices([m for m, _ in MIX], weights=[w for _, w in MIX])[0])
        deadline = rng.choice(DEADLINES_S) if rng.random() < deadline_share else None
        if deadline is not None:
            alignment["deadline_s"] = deadline
        stream = rng.random() < 0.5
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": rng.choice([16, 32, 64]),
            "temperature": 0.8,
            "stream": stream,
        }
        if alignment:
            body["alignment"] = alignment
        start = time.monotonic()
        try:
            if stream:
                async with http.stream("POST", url, json=body) as r:
                    status = r.status_code
                    async for line in r.aiter_lines():
                        # An error after the stream began arrives under HTTP 200, as an event.
                        if line.startswith('data: {"error"'):
                            status = STREAM_ERROR
            else:
                status = (await http.post(url, json=body)).status_code
        except httpx.HTTPError as exc:
            status = f"client:{type(exc).__name__}"
        seconds = time.monotonic() - start
        late = deadline is not None and seconds > deadline + LATE_AFTER_S
        records.append((time.monotonic(), seconds, status, strategy_of(alignment), deadline is not None, late))


async def soak(url: str, pid: int, minutes: float, concurrency: int, window_s: float,
               deadline_share: float) -> list[dict]:
    records: list[tuple] = []
    windows: list[dict] = []
    stop_at = time.monotonic() + minutes * 60
    async with httpx.AsyncClient(timeout=300) as http:
        tasks = [asyncio.create_task(client(http, url, stop_at, random.Random(i), records, deadline_share)) for i in range(concurrency)]
        window_start = time.monotonic()
        while time.monotonic() < stop_at:
            await asyncio.sleep(min(window_s, max(0.0, stop_at - time.monotonic())))
            now = time.monotonic()
            done = [r for r in records if window_start <= r[0] < now]
            latencies = sorted(r[1] for r in done)
            windows.append({
                "t_min": round((now - (stop_at - minutes * 60)) / 60, 1),
                "requests": len(done),
                "5xx": sum(1 for r in done if isinstance(r[2], int) and r[2] >= 500),
                "stream_errors": sum(1 for r in done if r[2] == STREAM_ERROR),
                "other_errors": sum(1 for r in done if not (isinstance(r[2], int) and r[2] < 400)
                                    and not (isinstance(r[2], int) and r[2] >= 500) and r[2] != STREAM_ERROR),
                "deadline_requests": sum(1 for r in done if r[4]),
                "deadline_late": sum(1 for r in done if r[5]),
                "p50_s": round(statistics.median(latencies), 2) if latencies else None,
                "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2) if latencies else None,
                "rss_mb": round(resident_mb(pid), 1),
            })
            print(json.dumps(windows[-1]), flush=True)
            window_start = now
        await asyncio.gather(*tasks)
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--window-s", type=float, default=120.0)
    parser.add_argument("--deadline-share", type=float, default=0.3,
                        help="share of requests that set alignment.deadline_s (2, 4 or 8 s)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    rm = build_minilm_reward_model(work / "minilm-rm")
    from decoding.model_prep import prepare_default_model

    server = start_server(work, "--reward-model", f"rm={rm}", "--guide", f"arm={prepare_default_model()}")
    try:
        windows = asyncio.run(soak(f"{server.v1}/chat/completions", server.process.pid, args.minutes,
                                   args.concurrency, args.window_s, args.deadline_share))
    finally:
        stop_server(server)
    steady = windows[1:] or windows
    growth = (steady[-1]["rss_mb"] - steady[0]["rss_mb"]) / steady[0]["rss_mb"]
    p99_ratio = (steady[-1]["p99_s"] or 0) / (steady[0]["p99_s"] or 1)
    summary = {
        "requests": sum(w["requests"] for w in windows),
        "5xx": sum(w["5xx"] for w in windows),
        "stream_errors": sum(w["stream_errors"] for w in windows),
        "other_errors": sum(w["other_errors"] for w in windows),
        "deadline_requests": sum(w["deadline_requests"] for w in windows),
        "deadline_late": sum(w["deadline_late"] for w in windows),
        "rss_growth_after_warmup": round(growth, 4),
        "p99_last_over_first": round(p99_ratio, 3),
        "pass": sum(w["5xx"] + w["stream_errors"] + w["deadline_late"] for w in windows) == 0
        and growth < 0.05 and p99_ratio < 1.2,
    }
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"windows": windows, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
