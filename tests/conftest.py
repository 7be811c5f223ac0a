"""Shared fixtures. The real server (vLLM on CPU, default model) starts once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.launch import RunningServer, start_server, stop_server

MODEL = "SmolLM2-135M-Instruct"
__all__ = ["MODEL", "RunningServer", "start_server", "stop_server"]


def build_tiny_reward_model(target: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama reward model on the policy's tokenizer: scores
    are arbitrary but fixed, which is all the mechanics tests need."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from aligner.model_prep import prepare_default_model

    tokenizer = AutoTokenizer.from_pretrained(prepare_default_model())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        num_labels=1, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # spread the scores so that candidates rarely tie
        model.score.weight.mul_(50.0)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("tiny-rm") / "tiny")


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_reward_dir) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("server"),
        "--max-model-len", "2048",
        "--reward-model", f"tiny={tiny_reward_dir}",
        "--reward-model", "exclaim=regex:!",
        "--stream-keepalive-s", "0.1",
    )
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from aligner.model_prep import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


def engine_unfinished(server: RunningServer) -> float:
    """The engine's own count of unfinished requests, read from /metrics."""
    text = httpx.get(f"{server.base_url}/metrics", headers=server.headers(), timeout=10).text
    for line in text.splitlines():
        if line.startswith("aligner_engine_unfinished_requests "):
            return float(line.split()[1])
    raise AssertionError("aligner_engine_unfinished_requests missing from /metrics")
