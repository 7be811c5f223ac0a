"""When to run a Triton kernel: on CUDA tensors, or anywhere with ALIGNER_KERNELS=triton
(with TRITON_INTERPRET=1 set before import, Triton's interpreter runs them on the CPU)."""

from __future__ import annotations

import os

import torch


def use_triton(tensor: torch.Tensor) -> bool:
    forced = os.environ.get("ALIGNER_KERNELS", "auto")
    if forced == "torch":
        return False
    if forced == "triton":
        return True
    return tensor.is_cuda


def next_pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(1, n) - 1).bit_length())
