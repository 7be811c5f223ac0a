"""vLLM general plugin: numerics switches that must hold in every vLLM process.

vLLM calls `register()` in each process it starts (API front end, engine core, workers)
through the `vllm.general_plugins` entry point in `pyproject.toml`, which is the one place
where code reaches the engine core process before its model and attention backend are built.

What it can do, only on vLLM's CPU build:

- **AMX attention off, on request.** `ALIGNER_CPU_AMX_ATTENTION=0` turns vLLM's bf16 attention
  choice on Intel CPUs with AMX (`cpu_attn._get_attn_isa` returns "amx" for bf16 with 32-token
  blocks) into its "vec" kernel; the AMX matrix multiplications stay on. By default (unset, or
  1) vLLM's own choice stands. Until 2026-12-07 "vec" was forced: vLLM's AMX kernel was
  believed to decode bf16 wrongly, from one answer ("What is the capital of France?" ->
  "L'Étoile, la Marseillaise,"). The first measurement on an AMX machine (`python -m
  bench.amx_attention`, BENCHMARKS.md) found both kernels equally close to float32 (mean
  |logprob difference| 0.057 each over 1,280 decoded positions, no flip where float32 is
  sure) and equally fast (amx / vec 0.97 at c = 1, 1.00 at c = 8); that answer's first token
  is a near-tie in float32 itself (0.098 nats). The switch stays for whoever wants the "vec"
  kernel's answers, and for the measurement.
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
    """Whether vLLM's own AMX attention choice stands: unless the operator turned it off."""
    return os.environ.get(AMX_ATTENTION_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


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
        return {"kernel": "amx", "reason": "vLLM's choice on an AMX CPU (measured as close to float32 as vec)"}
    return {"kernel": "vec", "reason": f"{AMX_ATTENTION_ENV}=0: the vec kernel instead of vLLM's AMX attention; "
            "AMX GEMMs stay on"}


def register() -> None:
    """The `vllm.general_plugins` entry point: safe to call more than once per process."""
    global _registered
    if _registered:
        return
    _registered = True
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and not amx_attention_allowed():
        _avoid_amx_attention()


def _avoid_amx_attention() -> None:
    logger.warning("aligner: %s=0: vLLM's AMX attention choice is turned into the vec kernel", AMX_ATTENTION_ENV)
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
