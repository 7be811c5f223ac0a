"""Shared fixtures. The real server (vLLM on CPU, default model) starts once per session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL = "SmolLM2-135M-Instruct"
STARTUP_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    base_url: str
    process: subprocess.Popen
    log_path: Path
    api_key: str | None = None

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def start_server(tmp_dir: Path, *extra_args: str, api_key: str | None = None) -> RunningServer:
    port = free_port()
    log_path = tmp_dir / f"server-{port}.log"
    args = [sys.executable, "-m", "aligner.cli", "serve", "--port", str(port), *extra_args]
    if api_key:
        args += ["--api-key", api_key]
    env = {k: v for k, v in os.environ.items() if k != "ALIGNER_API_KEY"}
    log = open(log_path, "w")
    process = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path, api_key)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            r = httpx.get(f"{server.base_url}/ready", headers=server.headers(), timeout=2)
            if r.status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(server)
    raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S}s:\n{server.log_tail()}")


def stop_server(server: RunningServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


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
