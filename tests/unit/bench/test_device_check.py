"""`python -m bench.device_check --quick`: the device check in its CPU form, so that it cannot
rot before the next GPU is lent (issue 40). Every stage must run here; on a bare GPU box the
same command compiles the kernels and times them."""

from __future__ import annotations

import json
import subprocess
import sys

from bench.device_check import STAGES, run, table
from bench.launch import REPO


def test_the_quick_device_check_runs_every_stage_on_a_cpu(tmp_path):
    out = tmp_path / "device_check.json"
    proc = subprocess.run([sys.executable, "-m", "bench.device_check", "--quick", "--output", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert list(report["stages"]) == list(STAGES)
    assert all(stage["status"] == "ok" for stage in report["stages"].values())
    assert report["stages"]["kernel_tests"]["counts"]["passed"] > 0
    assert report["stages"]["v2_processor"]["counts"]["passed"] > 0
    guide = report["stages"]["guide_step"]["batches"]
    assert set(guide) == {"1", "4"} and all(row["genarm_ms"] > 0 and row["args_ms"] > 0 for row in guide.values())
    assert set(report["stages"]["kernel_bandwidth"]["kernels"]) == {"guide_combine", "topk_combine",
                                                                   "candidate_attention"}
    for name in STAGES:
        assert f"| {name} | ok |" in proc.stdout


def test_a_stage_that_cannot_run_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    import argparse

    def broken(args):
        raise RuntimeError("no device here")

    monkeypatch.setitem(STAGES, "kernel_bandwidth", broken)
    args = argparse.Namespace(quick=True, output=tmp_path / "r.json", only=["facts", "kernel_bandwidth"], timeout=60)
    report = run(args)
    assert report["stages"]["kernel_bandwidth"]["status"] == "not measured: RuntimeError: no device here"
    assert report["stages"]["facts"]["status"] == "ok"
    assert json.loads((tmp_path / "r.json").read_text())["stages"]["kernel_bandwidth"]["status"].startswith("not measured")
    assert "| kernel_bandwidth | not measured: RuntimeError: no device here |" in table(report)
