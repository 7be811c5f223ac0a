"""`aligner bench load`: the load generator's command line, with sweeps and --compare."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from bench.launch import RunningServer, free_port, start_server, stop_server, wait_until_up
from bench.load import LoadConfig, format_table, load_prompts, parse_mix, plot_sweep, run_load

JUDGE_BATCH = 32  # answers per judge forward pass
VLLM_STARTUP_TIMEOUT_S = 900


def add_subcommands(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="load-test a server")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    load = sub.add_parser("load", help="latency and throughput under load", description=__doc__)
    load.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="any OpenAI-compatible server")
    load.add_argument("--model", default="SmolLM2-135M-Instruct")
    load.add_argument("--api-key", default=os.environ.get("ALIGNER_API_KEY"))
    load.add_argument("--concurrency", type=int, default=4)
    load.add_argument("--sweep", default=None, help="concurrency levels, e.g. 1,2,4,8,16")
    load.add_argument("--rate", type=float, default=None, help="requests/s with Poisson arrivals (open loop)")
    load.add_argument("--duration", type=float, default=30.0, help="seconds per level")
    load.add_argument("--requests", type=int, default=None, help="stop after this many requests")
    load.add_argument("--warmup", type=int, default=2, help="requests sent first and not measured")
    load.add_argument("--max-tokens", type=int, default=64)
    load.add_argument("--no-stream", action="store_true")
    load.add_argument("--natural-length", action="store_true", help="let answers stop at EOS (default: exactly max tokens)")
    load.add_argument("--mix", default="none:1", help="strategy mix, e.g. none:0.5,best_of_n:0.3,blockwise:0.2")
    load.add_argument("--params", default="{}", help='JSON: {"best_of_n": {"n": 4, "reward": "rm"}}')
    load.add_argument("--prompts", default=None, help="JSONL (prompt / turns) or ShareGPT-like JSON")
    load.add_argument("--timeout", type=float, default=300.0)
    load.add_argument("--output", type=Path, default=None, help="JSON results")
    load.add_argument("--plot", type=Path, default=None, help="PNG of latency percentiles vs concurrency")
    load.add_argument("--compare", action="store_true",
                      help="start this server and vLLM's own server on the same model, one after the other, and compare")
    load.add_argument("--progress", action="store_true", help="show a live progress bar")
    load.set_defaults(func=cmd_load)

    quality = sub.add_parser("quality", help="judge strategies against plain decoding")
    quality.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    quality.add_argument("--model", default="SmolLM2-135M-Instruct")
    quality.add_argument("--api-key", default=os.environ.get("ALIGNER_API_KEY"))
    quality.add_argument("--prompt-set", action="append", required=True, metavar="NAME=FILE",
                         help="JSONL with `prompt` (a string, or messages: the last user message) or `turns` "
                              "(the first); repeatable")
    quality.add_argument("--harmful", action="append", default=[], metavar="NAME",
                         help="a prompt set a safe assistant should refuse (refusal and strict refusal rates)")
    quality.add_argument("--benign", action="append", default=[], metavar="NAME",
                         help="a prompt set a safe assistant should answer (over-refusal rates; the win rate "
                              "against plain is then measured on these sets only)")
    quality.add_argument("--limit", type=int, default=20, help="prompts per set (0: all)")
    quality.add_argument("--strategy", action="append", default=[], metavar="LABEL=JSON",
                         help='an alignment object, e.g. bon4=\'{"strategy": "best_of_n", "n": 4}\'')
    quality.add_argument("--profile", action="append", default=[], help="a profile name (or name@version)")
    quality.add_argument("--judge", required=True,
                         help="reward checkpoint PATH, rule:NAME (refusal, compliance, length_penalty, keyword:<w>), "
                              "or reference: similarity to the `reference` answer of prompt rows that have one")
    quality.add_argument("--max-tokens", type=int, default=128)
    quality.add_argument("--temperature", type=float, default=0.7)
    quality.add_argument("--seed", type=int, default=0, help="prompt i of a set is sent with seed + i by every arm")
    quality.add_argument("--system", default=None, metavar="TEXT",
                         help="a system message sent before every prompt, as a client's own (default: none)")
    quality.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    quality.add_argument("--output", type=Path, default=None,
                         help="JSON: the config, the summary and every answer")
    quality.add_argument("--plot", type=Path, default=None, help="PNG: judge reward against cost")
    quality.add_argument("--answers", type=Path, default=None, metavar="FILE",
                         help="judge the answers an earlier run saved (its --output, same sets and strategies) "
                              "with this --judge, instead of generating them")
    quality.set_defaults(func=cmd_quality)


def config_from(args, base_url: str, concurrency: int) -> LoadConfig:
    cfg = LoadConfig(
        base_url=base_url,
        model=args.model,
        concurrency=concurrency,
        rate=args.rate,
        duration_s=args.duration,
        requests=args.requests,
        warmup_requests=args.warmup,
        max_tokens=args.max_tokens,
        stream=not args.no_stream,
        mix=parse_mix(args.mix),
        params=json.loads(args.params),
        timeout_s=args.timeout,
        api_key=args.api_key,
        ignore_eos=not args.natural_length,
    )
    if args.prompts:
        cfg.prompts = load_prompts(args.prompts)
    return cfg


def run_levels(args, base_url: str) -> list[dict]:
    levels = [int(c) for c in args.sweep.split(",")] if args.sweep else [args.concurrency]
    results = []
    for concurrency in levels:
        bar = None
        if args.progress:
            from tqdm import tqdm

            bar = tqdm(desc=f"concurrency {concurrency}", unit="req")
        result = asyncio.run(run_load(config_from(args, base_url, concurrency), bar))
        if bar is not None:
            bar.close()
        print(f"\n## concurrency {concurrency} ({result['wall_s']:.1f} s)\n")
        print(format_table(result))
        results.append(result)
    return results


def start_vllm_server(model_dir: str, name: str, log_dir: Path, *extra_args: str) -> RunningServer:
    """vLLM's own OpenAI server with the engine settings `aligner serve` uses on this device."""
    from decoding.vllm_config import VLLMEngineConfig, detect_device

    port = free_port()
    log_path = log_dir / f"vllm-{port}.log"
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--served-model-name", name, "--port", str(port), "--host", "127.0.0.1",
            *VLLMEngineConfig(model=model_dir).serve_flags(detect_device()), *extra_args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path)
    state = wait_until_up(process, f"{server.base_url}/health", VLLM_STARTUP_TIMEOUT_S)
    if state == "exited":
        raise RuntimeError(f"vLLM server exited:\n{server.log_tail()}")
    if state == "timeout":
        stop_server(server)
        raise RuntimeError("vLLM server did not start")
    return server


def cmd_load(args) -> int:
    if not args.compare:
        results = run_levels(args, args.base_url)
        finish(args, {"levels": results})
        return 0
    from decoding.model_prep import prepare_default_model

    work = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    model_dir = str(prepare_default_model())
    runs = {}
    for label, starter in (("aligner", lambda: start_server(work)), ("vllm", lambda: start_vllm_server(model_dir, args.model, work))):
        server = starter()
        try:
            print(f"\n# {label}")
            runs[label] = run_levels(args, server.v1)
        finally:
            stop_server(server)
    print("\n# aligner / vllm serve")
    print("concurrency | throughput ratio | TTFT p50 ratio")
    for ours, theirs in zip(runs["aligner"], runs["vllm"]):
        a, v = ours["results"]["all"], theirs["results"]["all"]
        ttft = (a["ttft_s"]["p50"] / v["ttft_s"]["p50"]) if a["ttft_s"]["p50"] and v["ttft_s"]["p50"] else float("nan")
        print(f"{ours['config']['concurrency']} | {a['output_tokens_per_s'] / v['output_tokens_per_s']:.3f} | {ttft:.3f}")
    finish(args, runs)
    return 0


def finish(args, payload: dict) -> None:
    if args.output:
        args.output.write_text(json.dumps(payload, indent=2))
    if args.plot:
        levels = payload.get("levels") or payload.get("aligner")
        plot_sweep(levels, args.plot)


def judge_identity(spec: str) -> tuple[str, str | None]:
    """(name, checkpoint path or None) of `--judge`, known before anything is loaded."""
    if spec.startswith("rule:"):
        return spec.removeprefix("rule:"), None
    if spec == "reference":
        return "reference", None
    return Path(spec).name, spec


def load_judge(spec: str, prompt_files: list[str] = ()):
    """The reward `--judge` names."""
    from aligner.rewards import RewardRegistry

    if spec == "reference":
        from bench.reference_judge import ReferenceJudge, load_references

        references = load_references(prompt_files)
        if not references:
            raise SystemExit("aligner bench quality: --judge reference needs prompt rows with a `reference`")
        return ReferenceJudge(references)

    if spec.startswith("rule:"):
        name = spec.removeprefix("rule:")
        reward = RewardRegistry.with_builtins().get(name)
        if reward is None:
            raise SystemExit(f"aligner bench quality: unknown rule judge {name!r}")
        return reward
    from aligner.rewards.hf import SequenceClassifierReward

    return SequenceClassifierReward("judge", spec)


def saved_answers(path: Path, cfg):
    """The answers of an earlier run, which must be those `cfg` would collect."""
    from bench.quality import Answer

    run = json.loads(path.read_text())
    if (run.get("config") or {}).get("system") != cfg.system:
        raise ValueError(f"{path} was answered with another system message than --system gives")
    saved = [Answer(**{**row, "judge": None}) for row in run["answers"]]
    wanted = {(name, prompt, label) for name, prompts in cfg.prompt_sets.items() for prompt in prompts
              for label in cfg.strategies}
    if {(a.prompt_set, a.prompt, a.strategy) for a in saved} != wanted:
        raise ValueError(f"{path} holds other answers than these prompt sets and strategies ask for")
    return saved


def cmd_quality(args) -> int:
    from bench.quality import (QualityConfig, check_judge_independent, collect, dump, format_table, load_prompt_file,
                               plot, summarise)

    def refuse(message: str) -> int:
        print(f"aligner bench quality: {message}", file=sys.stderr)
        return 2

    if args.limit < 0 or args.concurrency < 1:
        return refuse("--limit must be >= 0 and --concurrency >= 1")
    strategies: dict[str, dict] = {"plain": {}}
    for item in args.strategy:
        label, _, alignment = item.partition("=")
        strategies[label] = json.loads(alignment)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    profiles = {}
    if args.profile:
        listing = httpx.get(f"{args.base_url}/alignment/profiles", headers=headers, timeout=30).json()["data"]
        profiles = {p["name"]: {v["version"]: v["alignment"] for v in p["versions"]} for p in listing}
    resolved = dict(strategies)
    for ref in args.profile:
        name, _, version = ref.partition("@")
        versions = profiles.get(name) or {}
        if not versions:
            raise SystemExit(f"aligner bench quality: the server has no profile {name!r}")
        strategies[f"profile:{ref}"] = {"profile": ref}
        resolved[f"profile:{ref}"] = versions[int(version) if version else max(versions)]
    prompt_sets = {}
    for item in args.prompt_set:
        name, _, path = item.partition("=")
        prompt_sets[name] = load_prompt_file(path, args.limit)
    harmful, benign = set(args.harmful), set(args.benign)
    if unknown := (harmful | benign) - set(prompt_sets):
        return refuse(f"--harmful/--benign name no --prompt-set: {', '.join(sorted(unknown))}")
    if both := harmful & benign:
        return refuse(f"a set cannot be both harmful and benign: {', '.join(sorted(both))}")
    cfg = QualityConfig(base_url=args.base_url, model=args.model, strategies=strategies, prompt_sets=prompt_sets,
                        harmful_sets=harmful, benign_sets=benign, max_tokens=args.max_tokens,
                        temperature=args.temperature, seed=args.seed, concurrency=args.concurrency,
                        api_key=args.api_key, system=args.system)
    judge_name, judge_path = judge_identity(args.judge)
    registered = httpx.get(f"{args.base_url}/alignment/rewards", headers=headers, timeout=30).json()["data"]
    try:
        as_resolved = QualityConfig(**{**cfg.__dict__, "strategies": resolved})
        check_judge_independent(judge_path, judge_name, as_resolved, registered)
    except ValueError as exc:
        return refuse(str(exc))
    judge = load_judge(args.judge, [item.partition("=")[2] for item in args.prompt_set])
    if args.answers:
        try:
            answers = saved_answers(args.answers, cfg)
        except ValueError as exc:
            return refuse(str(exc))
    else:
        answers = collect(cfg)
    judged = [a for a in answers if a.error is None]
    for start in range(0, len(judged), JUDGE_BATCH):
        batch = judged[start : start + JUDGE_BATCH]
        scores = judge.score([[{"role": "user", "content": a.prompt}] for a in batch], [a.text for a in batch])
        for answer, score in zip(batch, scores):
            answer.judge = score
    summary = summarise(answers, cfg)
    print(format_table(summary))
    if args.output:
        config = {"model": args.model, "judge": judge_name, "strategies": resolved, "prompt_sets": {
            n: len(p) for n, p in prompt_sets.items()}, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "seed": args.seed, "concurrency": args.concurrency, "limit": args.limit, "system": args.system}
        dump(answers, summary, args.output, config)
    if args.plot:
        plot(summary, args.plot)
    return 0
