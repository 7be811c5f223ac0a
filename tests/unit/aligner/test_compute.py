"""`alignment.compute`: parameters counted from checkpoints, reward forwards counted per
request, and the FLOPs estimate of an answer, through the app over the fake engine."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from aligner.compute import compute_report
from aligner.rewards import Reward, RewardRegistry
from aligner.strategies.base import StageReport, StrategyResult
from decoding.model_refs import matmul_parameters
from server.app import build_app
from server.config import ServerConfig
from tests.fakes import FakeEngine

MESSAGES = [{"role": "user", "content": "hello there"}]


def checkpoint(path, tensors: dict[str, tuple[int, ...]], **config):
    path.mkdir()
    save_file({name: torch.zeros(shape) for name, shape in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


LAYERS = {"model.layers.0.mlp.weight": (8, 4), "model.layers.0.norm.weight": (4,)}  # 36 parameters


def test_a_tied_causal_lm_multiplies_by_its_embeddings_once_as_the_output_projection(tmp_path):
    tied = checkpoint(tmp_path / "tied", {"model.embed_tokens.weight": (10, 4), **LAYERS})
    assert matmul_parameters(tied) == 36 + 40  # the lookup is free, the output projection is not
    assert matmul_parameters(tied, causal=False) == 36  # a classifier head reads no vocabulary


def test_an_untied_output_projection_counts_and_encoder_embeddings_do_not(tmp_path):
    untied = checkpoint(tmp_path / "untied", {"model.embed_tokens.weight": (10, 4), "lm_head.weight": (10, 4),
                                               **LAYERS})
    assert matmul_parameters(untied) == 36 + 40
    bert = checkpoint(tmp_path / "bert", {"embeddings.word_embeddings.weight": (10, 4),
                                          "embeddings.position_embeddings.weight": (6, 4),
                                          "embeddings.token_type_embeddings.weight": (2, 4),
                                          "embeddings.LayerNorm.weight": (4,), **LAYERS})
    assert matmul_parameters(bert, causal=False) == 36 + 4
    assert matmul_parameters(tmp_path) is None  # no safetensors: not known


def test_an_adapter_counts_its_base(tmp_path):
    base = checkpoint(tmp_path / "base", {"model.embed_tokens.weight": (10, 4), **LAYERS})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "aligner_base.json").write_text(json.dumps({"base": str(base)}))
    assert matmul_parameters(adapter, causal=False) == 36


class Counted(Reward):
    """A model reward that reads three tokens per response."""

    name, kind, description = "counted", "model", "reads three tokens a response"
    matmul_parameters = 1000

    def score(self, prompts, responses):
        return [float(len(r)) for r in responses]

    def score_counted(self, prompts, responses):
        return self.score(prompts, responses), 3 * len(responses)


def test_a_requests_snapshot_counts_its_own_forwards_only():
    rewards = RewardRegistry.with_builtins()
    rewards.add(Counted())
    one, other = rewards.snapshot(), rewards.snapshot()

    async def go():
        await one.score({"counted": 1.0, "length_penalty": 0.5}, MESSAGES, ["a", "bb"])
        await one.score({"counted": 1.0}, MESSAGES, ["c"])
        await other.score_requests("counted", [MESSAGES])

    asyncio.run(go())
    assert one.usage == {"counted": {"sequences": 3, "tokens": 9}, "length_penalty": {"sequences": 2, "tokens": 0}}
    assert other.usage == {"counted": {"sequences": 1, "tokens": 3}}
    assert rewards.usage == {}


def test_the_report_adds_prefill_and_decoded_tokens_per_model_and_reward_forwards():
    rewards = RewardRegistry.with_builtins()
    rewards.add(Counted())
    view = rewards.snapshot()
    asyncio.run(view.score({"counted": 1.0, "length_penalty": 1.0}, MESSAGES, ["a", "b"]))
    result = StrategyResult(choices=[], stages=[
        StageReport("generate", 0.1, prompt_tokens=10, completion_tokens=20, cached_tokens=4),
        StageReport("score", 0.1),
        StageReport("critique", 0.1, prompt_tokens=5, completion_tokens=7, model="helper"),
    ])
    report = compute_report(result, FakeEngine(matmul_parameters=100), {"helper": FakeEngine()}, view)
    assert report["models"]["policy"] == {"prefill_tokens": 6, "cached_tokens": 4, "decoded_tokens": 20,
                                          "parameters": 100, "flops": 2 * 100 * 26}
    assert report["models"]["helper"]["flops"] is None  # its parameters are not known
    assert report["rewards"] == {
        "counted": {"sequences": 2, "tokens": 6, "parameters": 1000, "flops": 2 * 1000 * 6},
        "length_penalty": {"sequences": 2, "tokens": 0, "parameters": 0, "flops": 0},
    }
    assert report["flops"] == 2 * 100 * 26 + 2 * 1000 * 6
    assert report["unmeasured"] == ["model helper: parameters unknown"]


@pytest.mark.parametrize("stream", [False, True])
def test_every_answer_reports_its_compute(stream):
    rewards = RewardRegistry.with_builtins()
    rewards.add(Counted())
    engine = FakeEngine(matmul_parameters=50)
    app = build_app(engine, ServerConfig(served_model_name="fake-model"), rewards, start_engine=False)
    body = {"model": "fake-model", "messages": MESSAGES, "max_tokens": 3, "seed": 0, "stream": stream,
            "alignment": {"strategy": "best_of_n", "n": 4, "reward": "counted"}}
    if stream:
        body["stream_options"] = {"include_usage": True}
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        usage = events[-1]["usage"]
        (alignment,) = [e["alignment"] for e in events if e.get("alignment")]
    else:
        usage, alignment = r.json()["usage"], r.json()["alignment"]
    compute = alignment["compute"]
    policy = compute["models"]["policy"]
    assert policy["decoded_tokens"] == usage["completion_tokens"] == 12
    assert policy["prefill_tokens"] + policy["cached_tokens"] == usage["prompt_tokens"]
    assert compute["rewards"]["counted"] == {"sequences": 4, "tokens": 12, "parameters": 1000, "flops": 24000}
    assert compute["flops"] == 2 * 50 * (policy["prefill_tokens"] + 12) + 24000 and compute["unmeasured"] == []
