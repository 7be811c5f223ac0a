"""Bench commands that talk to a server, each run once at toy size against the session's
server, so that a refactor that breaks one fails here instead of at the next measurement
(issue 41's smoke modes). `bench.auto` and `aligner bench quality` have their own tests in
`test_quality_integration.py`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.launch import REPO

pytestmark = pytest.mark.integration


def bench(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_best_of_n_bench_times_both_arms(server, tmp_path):
    out = tmp_path / "bon.json"
    bench("bench.best_of_n", "--base-url", server.v1, "--reward", "tiny", "--n", "2", "--requests", "1",
          "--rounds", "1", "--concurrency", "1", "--max-tokens", "4", "--json", str(out))
    rows = json.loads(out.read_text())
    text = json.dumps(rows)
    assert "plain n=2" in text and "best_of_n N=2" in text


def test_throughput_bench_reports_each_level(server):
    proc = bench("bench.throughput", "--base-url", server.v1, "--concurrency", "1,2", "--max-tokens", "4")
    levels = [line.split()[0] for line in proc.stdout.splitlines()[1:] if line.strip()]
    assert levels == ["1", "2"]
