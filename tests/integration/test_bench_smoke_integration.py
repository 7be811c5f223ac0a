"""Bench commands that talk to a server, each run once at toy size against the session's
server (or, for `bench.guided`, its own server with guides), so that a refactor that breaks
one fails here instead of at the next measurement (issue 41's smoke modes). `bench.auto` and
`aligner bench quality` have their own tests in `test_quality_integration.py`."""

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


def test_particles_bench_compares_the_searches_with_best_of_n_by_judge_reward_and_cost(server, tmp_path):
    """`python -m bench.particles` on two prompts: every arm answered and judged, every answer
    scored again by the steering reward (the server's default), and the compute each arm spent
    read from its answers' `alignment.compute`."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n" for p, r in [
        ("Name three fruits.", "Apples, bananas and cherries."),
        ("What is the capital of France?", "The capital of France is Paris."),
    ]))
    out = tmp_path / "particles.json"
    bench("bench.particles", "--base-url", server.v1, "--prompt-file", str(prompts), "--max-tokens", "12",
          "--block-tokens", "4", "--output", str(out))
    run = json.loads(out.read_text())
    assert {a["strategy"] for a in run["answers"]} == {"plain", "best_of_n(4)", "particle_filter(4)",
                                                       "beam_search(2x2)"} and len(run["answers"]) == 8
    assert all(a["judge"] is not None and a["steering_reward"] is not None for a in run["answers"])
    arms = run["steering"]["arms"]
    for label in ("best_of_n(4)", "particle_filter(4)", "beam_search(2x2)"):
        assert arms[label]["reward_gflops_per_request"] > 0 and arms[label]["policy_gflops_per_request"] > 0
    assert arms["plain"]["reward_gflops_per_request"] == 0
    assert 0 <= arms["particle_filter(4)"]["streamed_early_share"] <= 1
    assert set(run["steering"]["differences"]) == {"particle_filter(4) - best_of_n(4)",
                                                   "beam_search(2x2) - best_of_n(4)"}


def test_guided_bench_times_every_arm_and_the_hugging_face_loop(tmp_path):
    """`python -m bench.guided` at toy size: it starts its own server with a GenARM and an ARGS
    guide, and times plain, both guided arms and the per-request Hugging Face ARGS loop."""
    out = tmp_path / "guided.json"
    proc = bench("bench.guided", "--concurrency", "1", "--max-tokens", "4", "--hf-max-tokens", "2",
                 "--json", str(out))
    results = json.loads(out.read_text())
    assert set(results) == {"plain", "genarm", "args k=10", "HF per-request ARGS loop"}
    assert all(row["1"] > 0 for row in results.values()), results
    assert "vs plain" in proc.stdout


def test_router_loop_trains_a_router_and_compares_it_with_each_arm(tmp_path):
    bench("bench.router_loop", "--smoke", "--output", str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["summary"]) == {"held-out fixed brief@1", "held-out fixed full@1",
                                       "held-out router after 8 ratings", "oracle (the better arm per type)"}
    assert summary["training"]["1"]["version"] and (tmp_path / "router-card-1.md").is_file()
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    routed = [r for r in rows if r["stage"] == "held-out router after 8 ratings"]
    assert len(routed) == 8 and all(r["router"] == f"route-router@{summary['training']['1']['version']}"
                                    for r in routed)
