"""Microbenchmark of each guide kernel against its torch reference (and torch.compile of it).

    python -m bench.kernels

Reports time per call and achieved bytes/s; on a GPU also the fraction of the device-to-device
copy bandwidth measured in the same run, and Triton's speed-up. On a CPU, Triton runs only in
its interpreter (correctness, not speed), so only the torch providers are timed there.
Shapes follow the targets: batch 32, vocab 152k, k = 10, prefix 1-4k tokens.
"""

from __future__ import annotations

import argparse
import time

import torch

from kernels.candidate_attention import candidate_attention_expanded_torch, candidate_attention_torch
from kernels.guide_combine import guide_combine_torch
from kernels.topk_combine import topk_reward_combine_torch


def timed(fn, repeat: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def copy_bandwidth(device: str, nbytes: int = 1 << 28) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    seconds = timed(lambda: b.copy_(a), 10)
    return 2 * nbytes / seconds


def kernel_cases(device: str, dtype, b: int, v: int, prefix: int, k: int):
    """name -> (call(fn), torch reference, bytes a call must move) at serving shapes; and a
    call of the expanded attention reference (k copies of the prefix) on 4 of the b rows."""
    base, guide = torch.randn(b, v, device=device, dtype=dtype), torch.randn(b, v, device=device, dtype=dtype)
    alpha = torch.rand(b, device=device)
    cands = torch.topk(base, k, dim=-1).indices
    rewards, weight = torch.randn(b, k, device=device), torch.rand(b, device=device)
    hq, hkv, d = 9, 3, 64  # SmolLM2-135M's attention shape
    kc = torch.randn(b, hkv, prefix, d, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    q = torch.randn(b, k, hq, d, device=device, dtype=dtype)
    kn, vn = torch.randn(b, k, hkv, d, device=device, dtype=dtype), torch.randn(b, k, hkv, d, device=device, dtype=dtype)
    slots, lens = torch.arange(b, device=device), torch.randint(prefix // 2, prefix + 1, (b,), device=device)
    elem = base.element_size()
    cases = {
        "guide_combine": (lambda f: f(base, guide, alpha), guide_combine_torch, 3 * b * v * elem),
        "topk_combine": (lambda f: f(base, cands, rewards, weight), topk_reward_combine_torch, b * v * elem),
        "candidate_attention": (lambda f: f(q, kn, vn, kc, vc, slots, lens), candidate_attention_torch,
                                2 * int(lens.sum()) * hkv * d * elem),
    }
    return cases, lambda: candidate_attention_expanded_torch(q[:4], kn[:4], vn[:4], kc, vc, slots[:4], lens[:4])


def triton_kernels() -> dict:
    from kernels.candidate_attention import candidate_attention_triton
    from kernels.guide_combine import guide_combine_triton
    from kernels.topk_combine import topk_reward_combine_triton

    return {"guide_combine": guide_combine_triton, "topk_combine": topk_reward_combine_triton,
            "candidate_attention": candidate_attention_triton}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--prefix", type=int, default=2048)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b, v = args.batch, args.vocab
    cases, expanded = kernel_cases(device, dtype, b, v, args.prefix, args.k)
    providers = {"torch": lambda ref: ref}
    if not args.no_compile:
        providers["torch.compile"] = lambda ref: torch.compile(ref, dynamic=False)
    if device == "cuda":
        triton_impl = triton_kernels()
        providers["triton"] = None
    bandwidth = copy_bandwidth(device) if device == "cuda" else None
    print(f"device {device}, dtype {dtype}, batch {b}, vocab {v}, k {args.k}, prefix <= {args.prefix}")
    if bandwidth:
        print(f"device-to-device copy: {bandwidth / 1e9:.0f} GB/s")
    print("kernel | provider | ms | GB/s" + (" | of copy bw" if bandwidth else ""))
    for name, (call, ref, nbytes) in cases.items():
        for provider, make in providers.items():
            fn = triton_impl[name] if provider == "triton" else make(ref)
            try:
                seconds = timed(lambda: call(fn), args.repeat)
            except Exception as exc:  # noqa: BLE001 - e.g. torch.compile unavailable here
                print(f"{name} | {provider} | failed: {type(exc).__name__}")
                continue
            row = f"{name} | {provider} | {seconds * 1e3:.3f} | {nbytes / seconds / 1e9:.1f}"
            if bandwidth:
                row += f" | {nbytes / seconds / bandwidth:.0%}"
            print(row)
        if name == "candidate_attention":
            seconds = timed(expanded, 2)
            print(f"{name} | expanded reference (k copies, batch 4 of {b}) | {seconds * 1e3:.1f} | -")


if __name__ == "__main__":
    main()
