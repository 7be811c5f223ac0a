"""The device check: what of the GPU path can run with only PyTorch, Triton, transformers and
pytest, in one command, stage by stage.

    python3 -m bench.device_check --output device_check.json          # on a GPU box (or any)
    python3 -m bench.device_check --quick --output device_check.json  # CPU, toy sizes (CI)

It needs nothing but this repository's source: no vLLM, no install step, no model weights
(guides are built at the shipped guides' shape with random weights; timing does not depend
on the weights). Each stage is independent: a failure is recorded as "not measured: <why>"
and the next stage runs; the JSON is rewritten after every stage, and one table is printed
at the end.

| stage | what |
| --- | --- |
| `facts` | device, torch / triton / transformers versions, `nvidia-smi`'s GPU line, the commit |
| `kernel_tests` | `pytest tests/unit/kernels` (compiled Triton on a GPU, the interpreter or torch on a CPU) |
| `kernel_bandwidth` | each kernel's torch reference (and Triton's on a GPU) at serving shapes: ms and GB/s, beside a device-to-device copy of 256 MiB; on a GPU timed by `triton.testing.do_bench` (L2 flushed between runs) |
| `guide_step` | one batched guide step (GenARM: append + next-token logits; ARGS: append + score k candidates) at SmolLM2-135M's shape, batch sizes 1-64, eager, and the same-size policy forward (Hugging Face, one new token over the same prefix) for the ratio the guided targets rest on; CUDA-graph capture of the step is not built yet |
| `v2_processor` | `pytest tests/unit/decoding/test_guided_processor_v2.py` (the Model Runner V2 processor against a simulated runner; it needs vLLM's interface) |
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# SmolLM2-135M's shape (the default policy, and the shipped guides' base).
FULL_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
              "num_key_value_heads": 3, "vocab_size": 49152}
QUICK_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 512}


def stage_facts(args: argparse.Namespace) -> dict:
    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "device": "cuda" if torch.cuda.is_available() else "cpu", "machine": platform.machine()}
    for module in ("triton", "transformers"):
        try:
            facts[module] = __import__(module).__version__
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            facts[module] = f"not importable: {type(exc).__name__}"
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        facts["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    facts["commit"] = commit.stdout.strip() or "unknown (no git here)"
    if Path("/proc/cpuinfo").exists():
        flags = Path("/proc/cpuinfo").read_text().split()
        facts["cpu_flags"] = sorted({f for f in flags if f.startswith(("amx", "avx512f", "avx2"))})
    return facts


def _pytest(target: str, timeout: int) -> dict:
    """Run one test file or folder with the interpreter this runs under: counts and the tail."""
    began = time.perf_counter()
    # A temp folder of its own, removed after: the check leaves no /tmp/pytest-of-USER folders
    # behind and takes no part in their rotation beside a test session (the suite runs its unit
    # tests, this check among them, beside the integration tests).
    with tempfile.TemporaryDirectory(prefix="device-check-") as scratch:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"--basetemp={scratch}/pytest", target],
                              capture_output=True, text=True, timeout=timeout, cwd=REPO)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-300:]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)\b", tail)}
    result = {"returncode": proc.returncode, "summary": tail, "counts": counts,
              "seconds": round(time.perf_counter() - began, 1)}
    if proc.returncode != 0:
        result["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
    return result


def stage_kernel_tests(args: argparse.Namespace) -> dict:
    return _pytest("tests/unit/kernels", args.timeout)


def _bench(fn, device: str) -> float:
    """Seconds per call: Triton's do_bench on a GPU (CUDA events, L2 flushed), else a wall-clock
    loop."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn) / 1e3
    from bench.kernels import timed

    return timed(fn, 3)


def stage_kernel_bandwidth(args: argparse.Namespace) -> dict:
    import torch

    from bench.kernels import kernel_cases, triton_kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b, v, prefix = (4, 4096, 64) if args.quick else (32, 151_936, 2048)
    cases, _ = kernel_cases(device, dtype, b, v, prefix, 10)
    nbytes = (1 << 20) if args.quick else (1 << 28)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = _bench(lambda: dst.copy_(src), device)
    result = {"device": device, "dtype": str(dtype), "batch": b, "vocab": v, "prefix": prefix,
              "copy_gb_s": round(2 * nbytes / copy_s / 1e9, 1), "kernels": {}}
    providers = {"torch": None}
    if device == "cuda":
        providers["triton"] = triton_kernels()
    for name, (call, reference, moved) in cases.items():
        rows = {}
        for provider, impl in providers.items():
            fn = reference if impl is None else impl[name]
            try:
                seconds = _bench(lambda: call(fn), device)
            except Exception as exc:  # noqa: BLE001 - one provider's failure is a row, not the stage
                rows[provider] = f"not measured: {type(exc).__name__}: {exc}"[:300]
                continue
            rows[provider] = {"ms": round(seconds * 1e3, 4), "gb_s": round(moved / seconds / 1e9, 2)}
            if device == "cuda":  # on a CPU the sizes and caches make the share meaningless
                rows[provider]["of_copy"] = round(moved / seconds / (2 * nbytes / copy_s), 3)
        result["kernels"][name] = rows
    return result


def _guide_models(shape: dict, device: str, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=True, num_labels=1,
                         pad_token_id=0)
    torch.manual_seed(0)
    genarm = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    args = LlamaForSequenceClassification(config).to(device=device, dtype=dtype).eval()
    return config, genarm, args


def stage_guide_step(args: argparse.Namespace) -> dict:
    import torch

    from decoding.guide_model import SlotDecoder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    batches = (1, 4) if args.quick else (1, 8, 32, 64)
    prefix, k, steps = (16, 4, 3) if args.quick else (512, 10, 20)
    config, genarm_model, args_model = _guide_models(shape, device, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    result = {"device": device, "dtype": str(dtype), "shape": shape, "prefix": prefix, "k": k,
              "cuda_graph": "not built: the guide step runs eagerly", "batches": {}}
    generator = torch.Generator().manual_seed(0)
    for batch in batches:
        row = {}
        prompt = torch.randint(1, shape["vocab_size"], (batch, prefix), generator=generator).tolist()
        for mode, model in (("genarm", genarm_model), ("args", args_model)):
            decoder = SlotDecoder(model, batch, prefix + steps + 2, dtype, device)
            slots = [decoder.allocate() for _ in range(batch)]
            decoder.append({slot: prompt[i] for i, slot in enumerate(slots)})
            token = 1

            def step():
                nonlocal token
                token = token % (shape["vocab_size"] - 1) + 1
                new = {slot: [token] for slot in slots}
                if mode == "genarm":
                    hidden = decoder.append(new)
                    return decoder.next_token_logits(torch.stack([hidden[s] for s in slots]))
                candidates = torch.randint(1, shape["vocab_size"], (batch, k), generator=generator)
                return decoder.append_and_score(new, candidates)

            step()  # warm-up (and, on a GPU, the kernels' compilation)
            sync()
            began = time.perf_counter()
            for _ in range(steps - 1):
                step()
            sync()
            row[f"{mode}_ms"] = round((time.perf_counter() - began) / (steps - 1) * 1e3, 3)
        row["policy_forward_ms"] = _policy_forward_ms(genarm_model, prompt, steps, device, sync)
        for mode in ("genarm", "args"):
            # plain decoding's step is the policy's forward; a guided step adds the guide's
            row[f"{mode}_throughput_vs_plain"] = round(
                row["policy_forward_ms"] / (row["policy_forward_ms"] + row[f"{mode}_ms"]), 3)
        result["batches"][str(batch)] = row
    return result


def _policy_forward_ms(model, prompt: list[list[int]], steps: int, device: str, sync) -> float:
    """One new token per row over a cached prefix, through Hugging Face's forward: the
    same-size policy step, run the same (eager) way as the guide's."""
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        ids = torch.tensor(prompt, device=device)
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = torch.ones(len(prompt), 1, dtype=torch.long, device=device)
        model(input_ids=token, past_key_values=cache, use_cache=True)  # warm-up
        sync()
        began = time.perf_counter()
        for _ in range(steps - 1):
            model(input_ids=token, past_key_values=cache, use_cache=True)
        sync()
    return round((time.perf_counter() - began) / (steps - 1) * 1e3, 3)


def stage_v2_processor(args: argparse.Namespace) -> dict:
    return _pytest("tests/unit/decoding/test_guided_processor_v2.py", args.timeout)


STAGES = {
    "facts": stage_facts,
    "kernel_tests": stage_kernel_tests,
    "kernel_bandwidth": stage_kernel_bandwidth,
    "guide_step": stage_guide_step,
    "v2_processor": stage_v2_processor,
}


def run(args: argparse.Namespace) -> dict:
    report: dict = {"quick": args.quick, "stages": {}}
    for name, stage in STAGES.items():
        if args.only and name not in args.only:
            continue
        began = time.perf_counter()
        try:
            outcome = stage(args)
            ok = not (isinstance(outcome, dict) and outcome.get("returncode", 0) != 0)
            report["stages"][name] = {"status": "ok" if ok else "failed", **outcome}
        except Exception as exc:  # noqa: BLE001 - a stage that cannot run is recorded; the next one runs
            report["stages"][name] = {"status": f"not measured: {type(exc).__name__}: {exc}"[:500],
                                      "traceback": traceback.format_exc()[-2000:]}
        report["stages"][name]["stage_seconds"] = round(time.perf_counter() - began, 1)
        if args.output is not None:
            args.output.write_text(json.dumps(report, indent=2, default=str))
    return report


def table(report: dict) -> str:
    lines = ["| stage | status | key numbers |", "| --- | --- | --- |"]
    for name, stage in report["stages"].items():
        status = stage["status"]
        numbers = ""
        if name == "facts" and status == "ok":
            numbers = ", ".join(f"{k} {stage.get(k)}" for k in ("device", "gpu", "torch", "triton", "commit")
                                if stage.get(k))
        elif name in ("kernel_tests", "v2_processor"):
            numbers = stage.get("summary", "")
        elif name == "kernel_bandwidth" and status == "ok":
            numbers = f"copy {stage['copy_gb_s']} GB/s; " + "; ".join(
                f"{kernel} " + ", ".join(_provider_cell(p, r) for p, r in rows.items())
                for kernel, rows in stage["kernels"].items())
        elif name == "guide_step" and status == "ok":
            numbers = "; ".join(f"batch {b}: GenARM {r['genarm_ms']} ms, ARGS {r['args_ms']} ms, policy "
                                f"{r['policy_forward_ms']} ms (estimated x plain: {r['genarm_throughput_vs_plain']}, "
                                f"{r['args_throughput_vs_plain']})" for b, r in stage["batches"].items())
        lines.append(f"| {name} | {status if status in ('ok', 'failed') else status[:120]} | {numbers} |")
    return "\n".join(lines)


def _provider_cell(provider: str, row) -> str:
    if not isinstance(row, dict):
        return f"{provider} {row}"
    share = f", {row['of_copy']:.0%} of copy" if "of_copy" in row else ""
    return f"{provider} {row['ms']} ms ({row['gb_s']} GB/s{share})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes (the CPU form CI runs)")
    parser.add_argument("--output", type=Path, default=None, help="JSON, rewritten after every stage")
    parser.add_argument("--only", nargs="*", default=None, choices=list(STAGES), help="run these stages only")
    parser.add_argument("--timeout", type=int, default=600, help="seconds for each pytest stage")
    args = parser.parse_args(argv)
    report = run(args)
    print(table(report))
    return 0 if all(s["status"] == "ok" for s in report["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
