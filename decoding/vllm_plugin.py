"""vLLM general plugin: numerics switches that must hold in every vLLM process.

vLLM calls `register()` in each process it starts (API front end, engine core, workers)
through the `vllm.general_plugins` entry point in `pyproject.toml`, which is the one place
where code reaches the engine core process before its model and attention backend are built.

What it does, only on vLLM's CPU build:

- **The same attention kernel on every x86 CPU family.** On Intel CPUs with AMX, vLLM picks its
  AMX attention kernel for bf16 with 32-token blocks (`cpu_attn._get_attn_isa` returns "amx");
  on AMD CPUs (AVX-512 or AVX2) it picks "vec". The plugin turns that one choice into "vec", so
  every family decodes with the same attention kernel; the AMX matrix multiplications stay on.
  `ALIGNER_CPU_AMX_ATTENTION=1` gives vLLM its own choice back.

  Why, measured (BENCHMARKS.md, `python -m bench.amx_attention`, 2026-12-07, the first AMX
  machine here): not correctness and not speed. Both kernels are as close to float32 (mean
  |logprob difference| 0.057 each over 1,280 decoded positions, no flip where float32 is sure)
  and as fast (amx / vec 0.97 at c = 1, 1.00 at c = 8). The plugin was written because the AMX
  kernel answered "What is the capital of France?" with "L'Étoile, la Marseillaise," and was
  believed to decode wrongly; that answer's first token is a near-tie in float32 (0.098 nats),
  which the AMX kernel tips one way and "vec" the other, on AMD and Intel alike. What remains
  is consistency: with "vec" an AMX machine answers such near-ties as the AMD machines do (the
  test suite's greedy expectations, "Paris" among them, were set there).
It only wraps a function; importing this module does nothing. (The tests' fault, corrupted
logits for the start-up self-check, is a plugin of their own: `tests/vllm_faults.py`.)
"""

from __future__ import annotations

import functools
import logging
import os

logger = logging.getLogger(__name__)

AMX_ATTENTION_ENV = "ALIGNER_CPU_AMX_ATTENTION"

_registered = False


def amx_attention_allowed() -> bool:
    """Whether the operator asked for vLLM's own AMX attention choice back."""
    return os.environ.get(AMX_ATTENTION_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def cpu_has_amx() -> bool:
    import torch

    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def attention_choice(device: str, dtype: str) -> dict:
    """What the plugin makes vLLM's CPU attention use for a model in `dtype`, for the log and
    `/ready`: {"kernel": ..., "reason": ...}. Mirrors `_safe_attn_isa` without importing vLLM."""
    if device != "cpu":
        return {"kernel": "vllm-default", "reason": f"not the CPU build ({device})"}
    amx = cpu_has_amx()
    if not amx:
        return {"kernel": "vllm-default", "reason": "this CPU has no AMX"}
    if dtype != "bfloat16":
        return {"kernel": "vllm-default", "reason": f"AMX attention is only used for bfloat16, not {dtype}"}
    if amx_attention_allowed():
        return {"kernel": "amx", "reason": f"{AMX_ATTENTION_ENV}=1: vLLM's AMX attention (as close to float32 as vec, "
                "measured; near-ties may decode differently from other CPU families)"}
    return {"kernel": "vec", "reason": "AMX CPU: the vec kernel, as on every other x86 CPU family; AMX GEMMs stay on"}


def register() -> None:
    """The `vllm.general_plugins` entry point: safe to call more than once per process."""
    global _registered
    if _registered:
        return
    _registered = True
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and not amx_attention_allowed():
        _same_attention_as_other_families()


def _same_attention_as_other_families() -> None:
    from vllm.v1.attention.backends import cpu_attn

    original = cpu_attn._get_attn_isa
    if hasattr(original, "__wrapped__"):  # already ours
        return

    @functools.wraps(original)
    def _safe_attn_isa(*args, **kwargs) -> str:
        isa = original(*args, **kwargs)
        # "vec" is what vLLM itself picks for these block sizes on x86 without AMX.
        return "vec" if isa == "amx" else isa

    cpu_attn._get_attn_isa = _safe_attn_isa
