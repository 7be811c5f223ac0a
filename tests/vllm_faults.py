"""A fault for tests, loaded into every vLLM process of a test server and never into a user's.

`ALIGNER_TEST_CORRUPT_LOGITS=bfloat16[,float32]|all`: the logits of a model running in a listed
dtype are rotated by one vocabulary entry, so the engine's top-1 tokens are all wrong in that
dtype: a stand-in for a broken kernel on a machine nobody here has, for testing the start-up
self-check and its fallback. With `@sampled` after the dtypes (`bfloat16@sampled`) only the
logits tokens are sampled from are rotated, not those of prompt logprobs: a fault that a check
by prompt logprobs alone cannot see (as a kernel broken only in decoding would be).

vLLM loads `vllm.general_plugins` entry points in each process it starts (engine core
included). This one is not in `pyproject.toml`: `fault_env()` writes its entry point into a
folder of the test's own and returns the environment (PYTHONPATH) that makes a server started
with it find the plugin.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

CORRUPT_LOGITS_ENV = "ALIGNER_TEST_CORRUPT_LOGITS"
REPO = Path(__file__).resolve().parents[1]
DIST_INFO = "aligner_test_faults-0.dist-info"
_in_prompt_logprobs = False  # set while vLLM's model runner computes prompt logprobs (@sampled only)


def fault_env(folder: Path, dtypes: str) -> dict[str, str]:
    """The environment of a server whose vLLM processes corrupt the logits in `dtypes`."""
    info = folder / DIST_INFO
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: aligner-test-faults\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\naligner_test_faults = tests.vllm_faults:register\n")
    path = os.pathsep.join(p for p in (str(folder), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {CORRUPT_LOGITS_ENV: dtypes, "PYTHONPATH": path}


def corrupted_dtypes() -> set[str]:
    value = os.environ.get(CORRUPT_LOGITS_ENV, "").strip().split("@")[0]
    if value == "all":
        return {"float32", "bfloat16", "float16"}
    return {part.strip() for part in value.split(",") if part.strip()}


def register() -> None:
    """The entry point: wrap vLLM's logits processor (once per process)."""
    dtypes = corrupted_dtypes()
    if not dtypes:
        return
    import torch
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    original = LogitsProcessor.forward
    if hasattr(original, "__wrapped__"):
        return
    names = {getattr(torch, name) for name in dtypes if isinstance(getattr(torch, name, None), torch.dtype)}

    @functools.wraps(original)
    def forward(self, lm_head, hidden_states, *args, **kwargs):
        logits = original(self, lm_head, hidden_states, *args, **kwargs)
        if logits is not None and hidden_states.dtype in names and not _in_prompt_logprobs:
            logits = logits.roll(1, dims=-1)
        return logits

    LogitsProcessor.forward = forward
    if os.environ.get(CORRUPT_LOGITS_ENV, "").strip().endswith("@sampled"):
        _spare_prompt_logprobs()
    logger.warning("aligner tests: %s=%s: logits of models in %s are corrupted (test fault)",
                   CORRUPT_LOGITS_ENV, os.environ.get(CORRUPT_LOGITS_ENV), sorted(dtypes))


def _spare_prompt_logprobs() -> None:
    """Flag the model runner's prompt-logprob pass, so `forward` leaves its logits alone."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._get_prompt_logprobs_dict

    @functools.wraps(original)
    def prompt_logprobs(self, *args, **kwargs):
        global _in_prompt_logprobs
        _in_prompt_logprobs = True
        try:
            return original(self, *args, **kwargs)
        finally:
            _in_prompt_logprobs = False

    GPUModelRunner._get_prompt_logprobs_dict = prompt_logprobs
