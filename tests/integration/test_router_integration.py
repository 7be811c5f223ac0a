"""A learned router through the real server (vLLM on CPU, SQLite store): the experiment
`route-test` (`unit: router`, `tests.conftest.EXPERIMENT_PROFILES`) draws its arms by the weights
while its router is untrained; a simulated user whose preference differs by prompt type rates
the answers; `aligner train-router` learns from the store; `POST /v1/alignment/reload` swaps the
router in; and the server's choices change: each prompt type now mostly gets the arm its user
preferred, every answer says the router's version and its choice's probability, and the trace
keeps that probability."""

from __future__ import annotations

import concurrent.futures
import json
import sqlite3
import subprocess
import sys

import httpx
import pytest

from bench.router_loop import wait_for_traces
from tests.conftest import MODEL, STORE_SERVER_KEY

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {STORE_SERVER_KEY}"}
HTTP_TIMEOUT_S = 300
CODE = ["Write a Python function that adds two numbers.", "Write a Python script that prints a list.",
        "Fix this Python code: print x", "Write a SQL query that counts users."]
CHAT = ["Tell me about your favourite holiday.", "What should I cook for dinner tonight?",
        "Suggest a name for my new cat.", "Recommend a novel for a rainy day."]
# The simulated user: on code prompts it likes tone@1's answers, on chat prompts tone@2's.
LIKES = {"code": "tone@1", "chat": "tone@2"}


def ask(server, kind: str, i: int) -> dict:
    text = (CODE if kind == "code" else CHAT)[i % 4]
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4,
            "user": f"router-user-{kind}-{i}", "alignment": {"experiment": "route-test"}}
    r = httpx.post(f"{server.v1}/chat/completions", json=body, headers=AUTH, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, r.text
    return {"kind": kind, **r.json()}


def ask_many(server, per_kind: int) -> list[dict]:
    jobs = [(kind, i) for i in range(per_kind) for kind in ("code", "chat")]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda job: ask(server, *job), jobs))


def test_a_router_learns_from_ratings_and_changes_its_choices(store_server):
    server = store_server
    before = ask_many(server, 20)
    for answer in before:
        experiment = answer["alignment"]["experiment"]
        assert experiment["unit"] == "router" and experiment["router"] is None
        assert experiment["propensity"] == 0.5  # equal weights: the logging policy before training
    wait_for_traces(server.db_path, [a["id"] for a in before])
    for answer in before:
        liked = answer["alignment"]["experiment"]["arm"] == LIKES[answer["kind"]]
        r = httpx.post(f"{server.v1}/alignment/feedback", json={"id": answer["id"], "rating": 5 if liked else 1},
                       headers=AUTH, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 200, r.text
    # Two more answers to one conversation, unrated: a pairwise preference rates both for training.
    pair = [ask(server, "code", 100), ask(server, "code", 104)]  # both CODE[0]
    wait_for_traces(server.db_path, [a["id"] for a in pair])
    winner, loser = sorted(pair, key=lambda a: a["alignment"]["experiment"]["arm"] != LIKES["code"])
    r = httpx.post(f"{server.v1}/alignment/feedback", json={"id": winner["id"], "preferred_over": loser["id"]},
                   headers=AUTH, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, r.text

    output = server.root / "models" / "route-test-router"
    done = subprocess.run([sys.executable, "-m", "aligner.training.cli", "train-router", "--store", server.store_url,
                           "--experiment", "route-test", "--output", str(output)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "42 rated requests" in done.stdout
    card = (output / "README.md").read_text()
    assert "| `router` |" in card and "| `arm:tone@1` |" in card

    r = httpx.post(f"{server.v1}/alignment/reload", headers=AUTH, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, r.text
    version = r.json()["routers"]["route-test-router"]
    assert version

    after = ask_many(server, 20)
    for kind, liked in LIKES.items():
        mine = [a["alignment"]["experiment"] for a in after if a["kind"] == kind]
        assert all(e["router"] == f"route-test-router@{version}" for e in mine)
        # With explore 0.1 the liked arm's probability is at least 0.05 + 0.9 x its Thompson
        # share; 20 requests a type leave room for chance, not for a router that did not learn.
        assert sum(e["arm"] == liked for e in mine) >= 15, (kind, [e["arm"] for e in mine])
        assert max(e["propensity"] for e in mine if e["arm"] == liked) > 0.8
        assert all(0.05 <= e["propensity"] <= 0.95 for e in mine)
    wait_for_traces(server.db_path, [a["id"] for a in after])
    with sqlite3.connect(f"file:{server.db_path}?mode=ro", uri=True) as conn:
        stored = dict(conn.execute("SELECT id, extra FROM traces WHERE experiment = 'route-test'").fetchall())
    for answer in after:
        logged = json.loads(stored[answer["id"]])["alignment"]["experiment"]
        assert logged == answer["alignment"]["experiment"]

    r = httpx.get(f"{server.v1}/alignment/experiments/route-test", headers=AUTH, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, r.text
    assert r.json()["requests"] == 82 and r.json()["sample_ratio"] is None
