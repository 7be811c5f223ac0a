"""Load generator for any OpenAI-compatible server: `aligner bench load ...`.

Fixed concurrency or Poisson arrivals at a request rate, for a duration or a request count,
prompts from a file, a strategy mix (`none:0.5,best_of_n:0.3,blockwise:0.2` with
parameters from `--params`), streaming on or off, warm-up excluded. Reports per strategy:
time to first token, time per output token, end-to-end latency (p50/p90/p99, mean),
requests/s, output tokens/s, errors and time-outs by type; writes JSON; `--sweep` runs
several concurrency levels and can plot latency percentiles against concurrency.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

DEFAULT_PROMPTS = [
    "Give me three tips for staying focused while studying.",
    "Explain why the sky is blue to a ten-year-old.",
    "Write a short, friendly reminder to water the plants.",
    "What should I pack for a weekend hiking trip?",
    "Summarise the rules of chess in five sentences.",
    "How do I make a simple tomato sauce?",
]


@dataclass
class LoadConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "SmolLM2-135M-Instruct"
    concurrency: int = 4
    rate: float | None = None  # requests/s with Poisson arrivals; None = closed loop at `concurrency`
    duration_s: float | None = 30.0
    requests: int | None = None
    warmup_requests: int = 2
    max_tokens: int = 64
    stream: bool = True
    mix: dict[str, float] = field(default_factory=lambda: {"none": 1.0})
    params: dict[str, dict] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    timeout_s: float = 300.0
    api_key: str | None = None
    seed: int = 0
    ignore_eos: bool = True


@dataclass
class Record:
    strategy: str
    start: float
    end: float
    ok: bool
    error: str | None = None
    ttft: float | None = None
    output_tokens: int = 0

    @property
    def latency(self) -> float:
        return self.end - self.start


def parse_mix(text: str) -> dict[str, float]:
    """"none:0.5,best_of_n:0.5" -> {"none": 0.5, "best_of_n": 0.5}; weights default to 1.

    >>> parse_mix("none:3,best_of_n")
    {'none': 3.0, 'best_of_n': 1.0}
    """
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition(":")
        mix[name] = float(weight) if weight else 1.0
        if mix[name] < 0:
            raise ValueError(f"negative weight for {name}")
    if not mix or not sum(mix.values()):
        raise ValueError("the strategy mix needs a positive weight")
    return mix


def load_prompts(path: str | Path) -> list[str]:
    """JSONL with `prompt` or `turns` (the shared prompt sets), or ShareGPT-like JSON."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".json":
        prompts = []
        for item in json.loads(text):
            turns = item.get("conversations") or item.get("messages") or []
            first = next((t.get("value") or t.get("content") for t in turns
                          if (t.get("from") or t.get("role")) in ("human", "user")), None)
            if first:
                prompts.append(first)
        return prompts
    prompts = []
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            prompts.append(row.get("prompt") or row["turns"][0])
    return prompts


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(values: list[float]) -> dict[str, float | None]:
    return {
        "mean": statistics.mean(values) if values else None,
        "p50": percentile(values, 0.5),
        "p90": percentile(values, 0.9),
        "p99": percentile(values, 0.99),
    }


def report(records: list[Record], wall_s: float) -> dict:
    """Per-strategy and overall statistics over the measured (post-warm-up) records."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        groups[r.strategy].append(r)
    groups["all"] = list(records)
    out = {}
    for name, rs in groups.items():
        ok = [r for r in rs if r.ok]
        tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
        out[name] = {
            "requests": len(rs),
            "completed": len(ok),
            "errors": dict(Counter(r.error for r in rs if not r.ok)),
            "requests_per_s": len(ok) / wall_s if wall_s else 0.0,
            "output_tokens_per_s": sum(r.output_tokens for r in ok) / wall_s if wall_s else 0.0,
            "output_tokens": sum(r.output_tokens for r in ok),
            "ttft_s": summarise([r.ttft for r in ok if r.ttft is not None]),
            "tpot_s": summarise(tpot),
            "e2e_s": summarise([r.latency for r in ok]),
        }
    return out


async def one_request(http: httpx.AsyncClient, cfg: LoadConfig, strategy: str, prompt: str, seed: int) -> Record:
    body = {
        "model": cfg.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": cfg.max_tokens,
        "stream": cfg.stream,
        "seed": seed,
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if strategy != "none" or strategy in cfg.params:
        body["alignment"] = {"strategy": strategy, **cfg.params.get(strategy, {})}
    if cfg.stream:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    record = Record(strategy, start, start, ok=False)
    try:
        if cfg.stream:
            async with http.stream("POST", f"{cfg.base_url}/chat/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    record.error = _error_type(r)
                else:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            record.error = event["error"].get("type", "stream_error")
                        if event.get("choices") and event["choices"][0]["delta"].get("content") and record.ttft is None:
                            record.ttft = time.perf_counter() - start
                        if event.get("usage"):
                            record.output_tokens = event["usage"]["completion_tokens"]
                    record.ok = record.error is None
        else:
            r = await http.post(f"{cfg.base_url}/chat/completions", json=body)
            if r.status_code == 200:
                record.ok = True
                record.output_tokens = r.json()["usage"]["completion_tokens"]
            else:
                record.error = _error_type(r)
    except httpx.TimeoutException:
        record.error = "timeout"
    except httpx.HTTPError as exc:
        record.error = f"transport:{type(exc).__name__}"
    record.end = time.perf_counter()
    return record


def _error_type(response: httpx.Response) -> str:
    try:
        return f"{response.status_code}:{response.json()['error']['type']}"
    except Exception:  # noqa: BLE001 - a non-OpenAI error body is still an error to count
        return f"{response.status_code}"


async def run_load(cfg: LoadConfig, progress=None) -> dict:
    """Run one load level; returns the report with the configuration that produced it."""
    rng = random.Random(cfg.seed)
    names, weights = list(cfg.mix), list(cfg.mix.values())
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
    limits = httpx.Limits(max_connections=max(cfg.concurrency, 64))
    records: list[Record] = []
    async with httpx.AsyncClient(timeout=cfg.timeout_s, headers=headers, limits=limits) as http:
        for i in range(cfg.warmup_requests):
            await one_request(http, cfg, names[i % len(names)], cfg.prompts[i % len(cfg.prompts)], cfg.seed + i)
        started = time.perf_counter()
        deadline = started + cfg.duration_s if cfg.duration_s else None
        issued = 0

        def more() -> bool:
            if cfg.requests is not None and issued >= cfg.requests:
                return False
            return deadline is None or time.perf_counter() < deadline

        def next_request():
            nonlocal issued
            issued += 1
            strategy = rng.choices(names, weights)[0]
            return one_request(http, cfg, strategy, rng.choice(cfg.prompts), cfg.seed + 1000 + issued)

        async def finish(coro):
            record = await coro
            records.append(record)
            if progress is not None:
                progress.update(1)

        if cfg.rate:  # open loop: Poisson arrivals, however slow the server is
            tasks = []
            while more():
                tasks.append(asyncio.create_task(finish(next_request())))
                await asyncio.sleep(rng.expovariate(cfg.rate))
            await asyncio.gather(*tasks)
        else:  # closed loop: `concurrency` clients, each sending its next request when done

            async def worker():
                while more():
                    await finish(next_request())

            await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        wall = time.perf_counter() - started
    return {"config": {k: v for k, v in asdict(cfg).items() if k not in ("prompts", "api_key")},
            "wall_s": wall, "results": report(records, wall)}


def plot_sweep(levels: list[dict], path: Path) -> None:
    """PNG of end-to-end (and TTFT) percentiles against concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [lv["config"]["concurrency"] for lv in levels]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("e2e_s", "ttft_s")):
        for q in ("p50", "p90", "p99"):
            ax.plot(xs, [lv["results"]["all"][metric][q] for lv in levels], marker="o", label=q)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("seconds")
        ax.set_title(metric.replace("_s", "").upper())
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(level: dict) -> str:
    rows = ["strategy | req | ok | req/s | tok/s | TTFT p50/p99 s | TPOT p50 ms | E2E p50/p90/p99 s | errors"]
    for name, r in level["results"].items():
        ttft, e2e, tpot = r["ttft_s"], r["e2e_s"], r["tpot_s"]
        fmt = lambda v, scale=1.0: "-" if v is None else f"{v * scale:.2f}"  # noqa: E731
        rows.append(
            f"{name} | {r['requests']} | {r['completed']} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
            f"{fmt(ttft['p50'])}/{fmt(ttft['p99'])} | {fmt(tpot['p50'], 1000)} | "
            f"{fmt(e2e['p50'])}/{fmt(e2e['p90'])}/{fmt(e2e['p99'])} | {r['errors'] or ''}"
        )
    return "\n".join(rows)
