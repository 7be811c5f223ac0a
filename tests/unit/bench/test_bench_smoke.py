"""Bench commands that need no server, each run once at toy size so that a refactor that
breaks one fails here instead of at the next measurement (issue 41's smoke modes). What they
print is checked for the rows the BENCHMARKS.md tables are made of."""

from __future__ import annotations

import json
import subprocess
import sys

from bench.launch import REPO

PREFS = [
    {"prompt": [{"role": "user", "content": "Name a fruit."}], "chosen": [{"role": "assistant", "content": "An apple."}],
     "rejected": [{"role": "assistant", "content": "No."}]},
    {"prompt": [{"role": "user", "content": "Say hi."}], "chosen": [{"role": "assistant", "content": "Hi there!"}],
     "rejected": [{"role": "assistant", "content": "Go away."}]},
]


def bench(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_experiment_report_times_both_ways(tmp_path):
    out = tmp_path / "report.json"
    proc = bench("bench.experiment_report", "--sizes", "40", "--rounds", "1", "--new", "5", "--output", str(out))
    assert "kept up to date" in proc.stdout
    assert json.loads(out.read_text())


def test_kernels_time_every_kernel():
    proc = bench("bench.kernels", "--batch", "2", "--vocab", "256", "--prefix", "16", "--k", "4", "--repeat", "1",
                 "--no-compile")
    rows = [line.split(" | ")[0] for line in proc.stdout.splitlines() if " | " in line]
    assert {"guide_combine", "topk_combine", "candidate_attention"} <= set(rows)


def test_reward_cards_score_pairs_both_ways(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in PREFS))
    out = tmp_path / "cards.json"
    proc = bench("bench.reward_cards", str(REPO / "models" / "helpful-harmless"), "--data", str(data), "--limit", "2",
                 "--output", str(out))
    assert "prefs" in proc.stdout and json.loads(out.read_text())


def test_guide_fidelity_compares_the_guides_variants():
    proc = bench("bench.guide_fidelity", "--max-tokens", "2", "--prompts", "1", "--k", "2")
    variants = [line.split(" | ")[0] for line in proc.stdout.splitlines() if "%" in line and " | " in line]
    assert variants == ["bf16", "bf16 + int8 projections"]
