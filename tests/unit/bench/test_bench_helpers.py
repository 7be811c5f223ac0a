"""The pure parts of the benchmarks: prompt files, the statistics of the quality report."""

from __future__ import annotations

import numpy as np
import pytest

from bench.load import load_prompts
from bench.quality import length_controlled_win_rate, win_rate_ci


def test_prompt_files_in_both_formats(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n{"turns": ["b", "c"]}\n')
    sharegpt = tmp_path / "p.json"
    sharegpt.write_text('[{"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}]')
    assert load_prompts(jsonl) == ["a", "b"] and load_prompts(sharegpt) == ["x"]


def test_statistics():
    assert win_rate_ci(np.array([0.0, 1.0] * 50))[0] == 0.5
    low, high = win_rate_ci(np.array([0.0, 1.0] * 50))[1:]
    assert 0.35 < low < 0.5 < high < 0.65
    # Wins explained entirely by length: at equal length, a coin flip.
    diff = np.array([30.0, 25.0, 40.0, -30.0, -25.0, -40.0, 28.0, -28.0])
    wins = (diff > 0).astype(float)
    assert length_controlled_win_rate(wins, diff) == pytest.approx(0.5, abs=0.05)
    # Wins regardless of length: stays high.
    assert length_controlled_win_rate(np.ones(8), diff) > 0.9


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_vllm_baseline_flags_are_vllms_own_and_match_this_servers_engine(device):
    """`vllm serve` in a comparison gets the engine settings `aligner serve` uses on the device;
    vLLM's own parser must accept every flag."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from decoding.vllm_config import VLLMEngineConfig

    ours = VLLMEngineConfig(model="m")
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m", *ours.serve_flags(device)])
    assert (parsed.max_model_len, parsed.max_num_seqs) == (ours.max_model_len, ours.max_num_seqs)
    assert parsed.enforce_eager is (device == "cpu")  # GPU: CUDA graphs, as this server builds them
    if device == "cuda":
        assert parsed.gpu_memory_utilization == ours.gpu_memory_utilization
    else:
        assert parsed.block_size == 32 and parsed.kv_cache_memory_bytes == 1 << 30


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal without a GPU")
def test_the_gpu_check_refuses_to_run_without_a_gpu():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "bench.gpu_check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "needs a CUDA GPU" in done.stderr


def test_wait_until_up_tells_up_exited_and_timeout_apart():
    import subprocess
    import sys

    from bench.launch import free_port, wait_until_up

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until_up(server, f"http://127.0.0.1:{port}/", 30) == "up"
        # A predicate that never holds: the same server times out.
        assert wait_until_up(server, f"http://127.0.0.1:{port}/", 1.5, ready=lambda r: False) == "timeout"
    finally:
        server.terminate()
        server.wait()
    quitter = subprocess.Popen([sys.executable, "-c", "pass"])
    quitter.wait()
    assert wait_until_up(quitter, f"http://127.0.0.1:{free_port()}/", 30) == "exited"
