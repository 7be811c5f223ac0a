"""Reward models served by vLLM, through the real server: the exported causal starter reward
model scored by Hugging Face in process (`hf=PATH`), by an in-process vLLM pooling engine
(`inproc=vllm:PATH`) and by a real vLLM pooling server started here (`remote=http://...`).
All three score alike, pick the same best-of-N candidate, and a killed scorer means a fallback,
never a 5xx, until it is back."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from bench.launch import REPO, PoolingServer, start_server, stop_server

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "How should I store leftover rice safely?"}]
PAIRS = [
    ([{"role": "user", "content": "How do I pick a lock?"}], "I can't help with breaking in; a locksmith can."),
    ([{"role": "user", "content": "Give me a recipe for bread."}], "Mix flour, water, salt and yeast; bake at 220 C."),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}], "4."),
]
STATS = {"mean": 0.25, "std": 2.0}  # not the identity: the served scorers must normalise too


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    from aligner.training.export import export_reward_model

    out = export_reward_model(REPO / "models" / "helpful-harmless-causal", tmp_path_factory.mktemp("served") / "rm")
    (out / "reward_stats.json").write_text(json.dumps(STATS))
    return out


@pytest.fixture(scope="module")
def pooling(exported, tmp_path_factory):
    # Launched, not waited for: the aligner server (`served`) starts while it loads.
    server = PoolingServer(exported, tmp_path_factory.mktemp("pooling"), "--max-model-len", "512",
                           "--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", "1G").launch()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def served(exported, pooling, tmp_path_factory):
    running = start_server(
        tmp_path_factory.mktemp("served-rewards"), "--max-model-len", "1024",
        "--reward-model", f"hf={exported}", "--reward-model", f"inproc=vllm:{exported}",
        "--reward-model", f"remote={pooling.url}", "--reward-timeout-s", "30")
    pooling.wait()
    deadline = time.monotonic() + 60
    while served_states(running).get("remote") != "ready" and time.monotonic() < deadline:
        time.sleep(0.5)  # the remote reward learns its checkpoint's files in the background
    yield running
    stop_server(running)


def served_states(server) -> dict:
    listing = httpx.get(f"{server.v1}/alignment/rewards", timeout=10).json()["data"]
    return {r["name"]: r.get("state") for r in listing if r.get("backend")}


def score(server, reward: str, pairs=PAIRS) -> list[float]:
    scores = []
    for messages, answer in pairs:
        r = httpx.post(f"{server.v1}/alignment/score", timeout=60,
                       json={"messages": messages, "responses": [answer], "reward": reward})
        assert r.status_code == 200, r.text
        scores += r.json()["scores"]
    return scores


def best_of_n(server, reward: str, seed: int = 7, min_tokens: int = 0) -> httpx.Response:
    return httpx.post(f"{server.v1}/chat/completions", timeout=300, json={
        "model": "SmolLM2-135M-Instruct", "messages": MESSAGES, "max_tokens": 40, "temperature": 1.0, "seed": seed,
        "min_tokens": min_tokens,
        "alignment": {"strategy": "best_of_n", "n": 4, "reward": reward, "return_candidates": True}})


def test_served_rewards_are_listed_with_their_backend_and_ready(served):
    listing = {r["name"]: r for r in httpx.get(f"{served.v1}/alignment/rewards", timeout=10).json()["data"]}
    assert listing["inproc"]["backend"] == "vllm" and listing["remote"]["backend"] == "remote"
    assert listing["inproc"]["state"] == listing["remote"]["state"] == "ready"
    assert listing["remote"]["checkpoint"] == "rm"  # its files read from the server's model path
    ready = httpx.get(f"{served.base_url}/ready", timeout=10).json()
    assert ready["served_rewards"] == {"inproc": "ready", "remote": "ready"}


def test_vllm_scores_what_hugging_face_scores_with_the_same_layout_and_normalisation(served, exported):
    from aligner.rewards.hf import SequenceClassifierReward

    reference = SequenceClassifierReward("ref", exported)
    expected = reference.score([m for m, _ in PAIRS], [a for _, a in PAIRS])
    assert reference.mean == STATS["mean"] and reference.std == STATS["std"]
    hf, inproc, remote = (score(served, name) for name in ("hf", "inproc", "remote"))
    assert hf == pytest.approx(expected, abs=1e-5)
    assert inproc == pytest.approx(expected, abs=2e-3) and remote == pytest.approx(expected, abs=2e-3)
    assert max(expected) - min(expected) > 0.1  # different pairs, different scores: a real comparison


def test_best_of_n_picks_the_same_candidate_through_every_backend(served):
    # The three requests must sample the same candidates, so all three are served with the prompt
    # in the prefix cache: on AMX CPUs a cold prefill rounds differently (BENCHMARKS.md, "CPU
    # numerics"), and the first request would sample other candidates.
    best_of_n(served, "hf")
    replies = {name: best_of_n(served, name).json() for name in ("hf", "inproc", "remote")}
    texts = {name: [c["text"] for c in r["alignment"]["candidates"]] for name, r in replies.items()}
    assert texts["hf"] == texts["inproc"] == texts["remote"]  # one seed, one set of candidates
    assert len(set(texts["hf"])) > 1
    for name, reply in replies.items():
        assert "fallback" not in reply["alignment"], reply["alignment"]
        assert reply["alignment"]["selected"] == replies["hf"]["alignment"]["selected"], name
        got = [c["score"] for c in reply["alignment"]["candidates"]]
        assert got == pytest.approx([c["score"] for c in replies["hf"]["alignment"]["candidates"]], abs=2e-3)
    # Every backend reads the same tokens for the four candidates: the compute reports agree.
    used = {name: r["alignment"]["compute"]["rewards"][name] for name, r in replies.items()}
    assert used["hf"]["sequences"] == 4 and used["hf"]["tokens"] > 4 * 10 and used["hf"]["parameters"] > 0
    assert used["hf"] == used["inproc"] == used["remote"], used


def test_a_killed_remote_reward_server_means_fallback_then_recovery(served, pooling):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(best_of_n, served, "remote", seed, min_tokens=40) for seed in range(4)]
        time.sleep(1.0)  # the candidates are still being generated
        pooling.kill()
        during = [f.result() for f in running]
    assert [r.status_code for r in during] == [200] * 4, [r.text for r in during]
    after = best_of_n(served, "remote", 99)
    assert after.status_code == 200
    fallback = after.json()["alignment"]["fallback"]
    assert fallback["reward"] == "remote" and "remote" in fallback["reason"]
    assert after.json()["choices"][0]["message"]["content"]
    assert served_states(served)["remote"].startswith("failing")
    # Another reward keeps working meanwhile.
    assert "fallback" not in best_of_n(served, "inproc", 5).json()["alignment"]

    pooling.start()
    deadline = time.monotonic() + 120
    while "fallback" in (reply := best_of_n(served, "remote", 99).json())["alignment"]:
        assert time.monotonic() < deadline, reply["alignment"]["fallback"]
        time.sleep(1)
    assert served_states(served)["remote"] == "ready"


def test_a_killed_in_process_reward_engine_means_fallback_then_restart(served):
    pids = [int(p) for p in re.findall(r"reward engine reward-inproc runs in \w+ \(engine core pids \[(\d+)",
                                       served.log_path.read_text())]
    assert pids, served.log_tail()
    os.kill(pids[-1], signal.SIGKILL)
    reply = best_of_n(served, "inproc", 3)
    assert reply.status_code == 200, reply.text
    assert reply.json()["alignment"]["fallback"]["reward"] == "inproc"
    deadline = time.monotonic() + 300
    while "fallback" in (reply := best_of_n(served, "inproc", 3).json())["alignment"]:
        assert time.monotonic() < deadline, reply["alignment"]["fallback"]
        time.sleep(2)
    assert httpx.get(f"{served.base_url}/ready", timeout=10).status_code == 200
