"""One GPU check, prepared to run in one go (about 8 minutes on one H100/H200):

    python -m bench.gpu_check --json gpu_check.json      # or: make gpu-check

1. the `gpu`-marked tests (kernels in bf16/fp16 at serving shapes);
2. each Triton kernel's achieved bandwidth at serving shapes, as a fraction of the device's
   device-to-device copy bandwidth measured in the same run (`bench.kernels`);
3. this server on the GPU with the starter models (`--models-dir models`): one plain, one
   best-of-N, one GenARM and one ARGS request must answer 200 with text;
4. output tokens/s at one concurrency, side by side: plain, GenARM and ARGS (k = 10) on this
   server, then `vllm serve` on the same model with the same engine settings
   (`decoding.vllm_config.VLLMEngineConfig.serve_flags`).

It prints one table, each measured ratio beside its target, and writes it as JSON. Without a
GPU it refuses to run (the pieces it composes are tested on the CPU by `make test`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = "SmolLM2-135M-Instruct"
GENARM_GUIDE, ARGS_GUIDE, REWARD = "helpful-harmless-arm", "helpful-harmless-causal", "helpful-harmless"
# name -> (what the ratio is of, target): the targets for the table.
TARGETS = {
    "plain / vllm serve": 0.97,
    "genarm / plain": 0.45,
    "args k=10 / plain": 0.30,
    "guide_combine of copy bw": 0.70,
    "topk_combine of copy bw": 0.70,
    "candidate_attention of copy bw": 0.70,
}


@dataclass
class Row:
    check: str
    measured: float | None
    target: float | None
    passed: bool
    note: str = ""


def judge(measured: dict[str, float | None], tests: dict[str, int], smoke: dict[str, str]) -> list[Row]:
    """The table: every target with its measured ratio (None: not measured, a failure), the
    gpu-marked tests, and each smoke request (its outcome: "ok" or why not).

    >>> rows = judge({"plain / vllm serve": 0.99, "genarm / plain": 0.3}, {"passed": 4, "failed": 0},
    ...              {"plain": "ok", "args": "HTTP 503"})
    >>> [(r.check, r.passed) for r in rows][:3]
    [('plain / vllm serve', True), ('genarm / plain', False), ('args k=10 / plain', False)]
    >>> [(r.check, r.passed, r.note) for r in rows][-3:]
    [('gpu tests', True, '4 passed, 0 failed'), ('smoke plain', True, 'ok'), ('smoke args', False, 'HTTP 503')]
    """
    rows = [Row(name, measured.get(name), target, measured.get(name) is not None and measured[name] >= target,
                "" if measured.get(name) is not None else "not measured")
            for name, target in TARGETS.items()]
    rows.append(Row("gpu tests", None, None, tests.get("passed", 0) > 0 and not tests.get("failed", 0),
                    f"{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed"))
    rows += [Row(f"smoke {name}", None, None, outcome == "ok", outcome) for name, outcome in smoke.items()]
    return rows


def format_table(rows: list[Row]) -> str:
    """Markdown, one line per check.

    >>> print(format_table([Row("genarm / plain", 0.512, 0.45, True)]))
    | check | measured | target | pass | note |
    | --- | --- | --- | --- | --- |
    | genarm / plain | 0.512 | >= 0.45 | yes |  |
    """
    lines = ["| check | measured | target | pass | note |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        measured = "-" if r.measured is None else f"{r.measured:.3f}"
        target = "-" if r.target is None else f">= {r.target:g}"
        lines.append(f"| {r.check} | {measured} | {target} | {'yes' if r.passed else 'NO'} | {r.note} |")
    return "\n".join(lines)


def pytest_counts(output: str) -> dict[str, int]:
    """pytest's summary line -> counts.

    >>> pytest_counts("=== 3 passed, 1 failed, 2 skipped in 9.1s ===")
    {'passed': 3, 'failed': 1, 'skipped': 2}
    """
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", output)}


def run_gpu_tests() -> dict[str, int]:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/unit"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    return pytest_counts(done.stdout.splitlines()[-1] if done.stdout else "")


def kernel_fractions(repeat: int = 20) -> dict[str, float]:
    import torch

    from bench.kernels import copy_bandwidth, kernel_cases, timed, triton_kernels

    cases, _ = kernel_cases("cuda", torch.bfloat16, 32, 151_936, 2048, 10)
    bandwidth = copy_bandwidth("cuda")
    fractions = {}
    for name, fn in triton_kernels().items():
        call, _, nbytes = cases[name]
        call(fn)  # compile outside the timing
        fractions[f"{name} of copy bw"] = nbytes / timed(lambda: call(fn), repeat) / bandwidth
    return fractions


def smoke(base_url: str) -> dict[str, str]:
    requests = {
        "plain": {},
        "best_of_n": {"strategy": "best_of_n", "n": 4, "reward": REWARD},
        "genarm": {"strategy": "guided", "guide": GENARM_GUIDE, "mode": "genarm", "alpha": 1.0},
        "args": {"strategy": "guided", "guide": ARGS_GUIDE, "mode": "args", "k": 10},
    }
    outcomes = {}
    for name, alignment in requests.items():
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Give me one tip for a job interview."}],
                "max_tokens": 48, "alignment": alignment}
        try:
            r = httpx.post(f"{base_url}/chat/completions", json=body, timeout=300)
            text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else ""
            outcomes[name] = "ok" if r.status_code == 200 and text.strip() else f"HTTP {r.status_code}: {r.text[:120]}"
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            outcomes[name] = f"{type(exc).__name__}: {exc}"
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu_check needs a CUDA GPU")
    from bench.cli import start_vllm_server
    from bench.guided import server_tokens_per_s
    from bench.launch import start_server, stop_server
    from decoding.model_prep import prepare_default_model

    began = time.monotonic()
    device = torch.cuda.get_device_name(0)
    tests = run_gpu_tests()
    measured: dict[str, float | None] = dict(kernel_fractions())
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    tokens_per_s: dict[str, float] = {}
    server = start_server(work, "--models-dir", str(ROOT / "models"), "--guide-max-slots", str(args.concurrency))
    try:
        outcomes = smoke(server.v1)
        url = f"{server.v1}/chat/completions"
        for name, alignment in (("plain", None),
                                ("genarm", {"strategy": "guided", "guide": GENARM_GUIDE, "mode": "genarm"}),
                                ("args", {"strategy": "guided", "guide": ARGS_GUIDE, "mode": "args", "k": 10})):
            tokens_per_s[name] = asyncio.run(server_tokens_per_s(url, alignment, args.concurrency, args.max_tokens))
    finally:
        stop_server(server)
    vllm = start_vllm_server(str(prepare_default_model()), MODEL, work)
    try:
        tokens_per_s["vllm serve"] = asyncio.run(server_tokens_per_s(f"{vllm.v1}/chat/completions", None,
                                                                     args.concurrency, args.max_tokens))
    finally:
        stop_server(vllm)
    plain = tokens_per_s["plain"]
    measured["plain / vllm serve"] = plain / tokens_per_s["vllm serve"]
    measured["genarm / plain"] = tokens_per_s["genarm"] / plain
    measured["args k=10 / plain"] = tokens_per_s["args"] / plain
    rows = judge(measured, tests, outcomes)
    print(f"# GPU check on {device}: {time.monotonic() - began:.0f} s, concurrency {args.concurrency}, "
          f"{args.max_tokens} tokens per request")
    print("tokens/s: " + ", ".join(f"{k} {v:.0f}" for k, v in tokens_per_s.items()))
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"device": device, "tokens_per_s": tokens_per_s, "tests": tests,
                                         "rows": [asdict(r) for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
