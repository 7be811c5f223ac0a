"""What the CPU numerics switches cost: start-up time and plain decode throughput of `make
serve`'s configuration as it was until 2026-11-30, vLLM's own attention choice and no start-up
self-check ("before"); as it is, the plugin's "vec" attention and the self-check ("after");
vLLM's own choice with the self-check ("amx", ALIGNER_CPU_AMX_ATTENTION=1); and float32, side
by side in one run.

    python -m bench.numerics                      # before and after, c = 1 and 8, 128 tokens
    python -m bench.numerics --arms before,after,amx,float32 --output numerics.json

On a CPU without AMX the plugin changes nothing, so "amx" is "after". The answer to the France
question is printed for each arm (its first token is a near-tie in float32: 0.098 nats between
"The" and "L", so kernels may answer it differently; `python -m bench.amx_attention` measures
how far each decodes from float32 over 1,280 positions).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx

from bench.launch import REPO, start_server, stop_server
from bench.throughput import run_level
from decoding.vllm_plugin import AMX_ATTENTION_ENV

ARMS = {
    "before": {"args": ["--self-check", "off"], "env": {AMX_ATTENTION_ENV: "1"}},
    "after": {"args": ["--self-check", "on"], "env": {AMX_ATTENTION_ENV: "0"}},
    "amx": {"args": ["--self-check", "on"], "env": {AMX_ATTENTION_ENV: "1"}},
    # The safe configuration a failed check falls back to, for its price on this CPU.
    "float32": {"args": ["--self-check", "on", "--dtype", "float32"], "env": {AMX_ATTENTION_ENV: "0"}},
}
MODEL = "SmolLM2-135M-Instruct"


def measure(arm: str, levels: list[int], max_tokens: int, serve_args: list[str]) -> dict:
    spec = ARMS[arm]
    started = time.monotonic()
    server = start_server(Path(tempfile.mkdtemp(prefix=f"numerics-{arm}-")), *serve_args, *spec["args"],
                          env=spec["env"])
    ready_s = time.monotonic() - started
    try:
        ready = httpx.get(f"{server.base_url}/ready", timeout=10).json()
        answer = httpx.post(f"{server.v1}/chat/completions", timeout=120, json={
            "model": MODEL, "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}).json()
        levels_out = [asyncio.run(run_level(server.v1, MODEL, c, max_tokens, {})) for c in levels]
    finally:
        stop_server(server)
    policy = ready["numerics"]["policy"]
    return {"arm": arm, "ready_s": round(ready_s, 1), "attention": policy["attention"]["kernel"],
            "dtype": policy["dtype"], "self_check": policy["self_check"],
            "answer": answer["choices"][0]["message"]["content"], "levels": levels_out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--serve-args", default=f"--models-dir {REPO / 'models'}",
                        help="arguments of both servers (default: make serve's starter models)")
    parser.add_argument("--arms", default="before,after",
                        help=f"which of {', '.join(ARMS)}; the first is the base of the ratios")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    levels = [int(c) for c in args.concurrency.split(",")]
    results = [measure(arm, levels, args.max_tokens, args.serve_args.split()) for arm in arms]
    base = results[0]
    print(f"{'arm':<8} {'dtype':<9} {'attention':<13} {'self-check':<11} {'ready s':>8} {'ratio':>6}  answer")
    for r in results:
        status = (r["self_check"] or {}).get("status", "-")
        print(f"{r['arm']:<8} {r['dtype']:<9} {r['attention']:<13} {status:<11} {r['ready_s']:>8} "
              f"{r['ready_s'] / base['ready_s']:>6.2f}  {r['answer']!r}")
    print(f"\n{'conc':>4} " + " ".join(f"{r['arm'] + ' tok/s':>15} {'ratio':>6}" for r in results))
    for i, level in enumerate(levels):
        cells = [(r["levels"][i]["tokens_per_s"], r["levels"][i]["tokens_per_s"] / base["levels"][i]["tokens_per_s"])
                 for r in results]
        print(f"{level:>4} " + " ".join(f"{tps:>15} {ratio:>6.2f}" for tps, ratio in cells))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
