"""How a request asks the engine for token-level guidance (no torch, no vLLM: the server
imports it)."""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_KEY = "aligner_guides"  # in vllm_config.additional_config
EXTRA_ARGS_KEY = "aligner_guide"  # in SamplingParams.extra_args
MODES = ("genarm", "args")
MAX_ALPHA = 20.0
MAX_K = 64
MAX_WEIGHT = 100.0


def guide_mode(path: str | Path) -> str:
    """"args" for a sequence-classification checkpoint (a reward head), else "genarm"."""
    path = Path(path)
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        return "args" if json.loads(adapter.read_text()).get("task_type") == "SEQ_CLS" else "genarm"
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} has neither config.json nor adapter_config.json")
    architectures = json.loads(config.read_text()).get("architectures") or []
    return "args" if any(a.endswith("ForSequenceClassification") for a in architectures) else "genarm"
