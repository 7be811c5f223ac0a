"""`bench.amx_attention` renders its tables from the committed raw results (the runs themselves
need vLLM and take minutes: `tests/integration/test_amx_attention.py` drives the same
measurement, `decoding.attention_fidelity`, on AMX machines)."""

from __future__ import annotations

import subprocess
import sys

from bench.amx_attention import order
from bench.launch import REPO


def test_runs_alternate_and_each_kernel_goes_first_in_turn():
    assert order(4) == ["vec", "amx", "amx", "vec", "vec", "amx", "amx", "vec"]


def test_the_committed_results_render_with_intervals_and_ratios():
    done = subprocess.run([sys.executable, "-m", "bench.amx_attention", "--summarize",
                           "bench/raw/amx/amx_attention.json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    both = [line for line in lines if " all " in line]
    assert len(both) == 2 and all("22/1280 [0.011, 0.026]" in line for line in both)
    assert any(line.startswith("amx / vec, c8: 1.00") for line in lines)
    assert "margin 0.098 nats" in done.stdout
