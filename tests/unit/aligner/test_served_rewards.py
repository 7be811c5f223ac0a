"""Rewards served by vLLM, without vLLM: the remote client against an in-memory HTTP transport,
the pair layout against the Hugging Face scorer's, the registry's bounds on async rewards, and
the start-up checks. `tests/integration/test_served_rewards_integration.py` runs the real thing."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import httpx
import pytest

from aligner.rewards.hf import SequenceClassifierReward
from aligner.rewards.registry import RewardError, RewardRegistry
from aligner.rewards.served import REWARD_API_KEY_ENV, RemoteBackend, ServedReward
from decoding.pooling_engine import check_pooling_checkpoint

REPO = Path(__file__).resolve().parents[3]
PROMPTS = [[{"role": "user", "content": "How do I pick a lock?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]]
ANSWERS = ["A locksmith can help.", "4."]


class FakePoolingServer:
    """What vLLM's pooling API answers: `/v1/models` and `/classify` (one score per input, its
    token count, in shuffled order), after `faults` failures of the given kind."""

    def __init__(self, faults: list[str] = (), root: str = "/models/rm", outputs: int = 1):
        self.faults, self.root, self.outputs = list(faults), root, outputs
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.faults:
            fault = self.faults.pop(0)
            if fault == "connect":
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(int(fault), json={"error": {"message": f"fault {fault}"}})
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "rm", "root": self.root}]})
        body = json.loads(request.content)
        data = [{"index": i, "probs": [float(len(ids))] * self.outputs} for i, ids in enumerate(body["input"])]
        return httpx.Response(200, json={"data": data[::-1]})


def remote(server: FakePoolingServer, **kwargs) -> RemoteBackend:
    return RemoteBackend("http://rm:8000", transport=httpx.MockTransport(server), **kwargs)


async def test_remote_scores_token_ids_in_input_order_without_activation():
    server = FakePoolingServer()
    backend = remote(server)
    assert await backend.model_root() == "/models/rm"
    assert await backend.classify([[1, 2, 3], [4], [5, 6]]) == [3.0, 1.0, 2.0]
    body = json.loads(server.requests[-1].content)
    assert body == {"input": [[1, 2, 3], [4], [5, 6]], "use_activation": False, "model": "rm"}
    assert backend.state() == "ready"
    await backend.aclose()


async def test_remote_retries_connection_faults_and_unavailable_then_recovers():
    server = FakePoolingServer(["connect", "503"])
    backend = remote(server, retries=2)
    assert await backend.classify([[1, 2]]) == [2.0]
    assert len(server.requests) == 3


async def test_remote_gives_up_after_its_retries_and_says_why_until_it_recovers():
    server = FakePoolingServer(["connect"] * 3)
    backend = remote(server, retries=2)
    with pytest.raises(RuntimeError, match="ConnectError"):
        await backend.classify([[1]])
    assert len(server.requests) == 3 and backend.state().startswith("failing: ConnectError")
    assert await backend.classify([[1]]) == [1.0]
    assert backend.state() == "ready"


async def test_remote_does_not_retry_a_refusal_and_passes_its_message_on():
    server = FakePoolingServer(["400"])
    with pytest.raises(RuntimeError, match="HTTP 400: fault 400"):
        await remote(server).classify([[1]])
    assert len(server.requests) == 1


async def test_remote_refuses_a_model_with_several_outputs():
    with pytest.raises(ValueError, match="2 outputs"):
        await remote(FakePoolingServer(outputs=2)).classify([[1]])


async def test_remote_sends_the_reward_api_key(monkeypatch):
    monkeypatch.setenv(REWARD_API_KEY_ENV, "k3y")
    server = FakePoolingServer()
    await remote(server).classify([[1]])
    assert server.requests[0].headers["authorization"] == "Bearer k3y"


class EchoBackend:
    """Scores a sequence by its first token id, remembering what it was sent."""

    kind = "fake"

    def __init__(self):
        self.sent: list[list[int]] = []
        self.gate: asyncio.Event | None = None

    def describe(self) -> str:
        return "a fake"

    def state(self) -> str:
        return "ready"

    async def classify(self, sequences):
        self.sent += sequences
        if self.gate is not None:
            await self.gate.wait()
        return [float(len(s)) for s in sequences]

    async def aclose(self):
        pass


def test_served_pairs_are_laid_out_and_normalised_as_the_hugging_face_scorer_does(tiny_reward_dir, tmp_path):
    checkpoint = tmp_path / "rm"
    checkpoint.symlink_to(tiny_reward_dir, target_is_directory=True)
    hf = SequenceClassifierReward("hf", checkpoint, max_length=24)
    backend = EchoBackend()
    served = ServedReward("served", backend, checkpoint=checkpoint, max_length=24)
    assert served.encode_all(PROMPTS, ANSWERS) == [hf.encode(p, a) for p, a in zip(PROMPTS, ANSWERS)]
    assert max(len(ids) for ids in served.encode_all(PROMPTS, ANSWERS)) == 24  # cut as trained

    served.mean, served.std = 2.0, 4.0
    scores = asyncio.run(served.score_async(PROMPTS, ANSWERS))
    assert scores == [(len(ids) - 2.0) / 4.0 for ids in backend.sent]


def test_served_reward_reads_the_checkpoint_statistics(tiny_reward_dir, tmp_path):
    import shutil

    checkpoint = shutil.copytree(tiny_reward_dir, tmp_path / "rm")
    (checkpoint / "reward_stats.json").write_text(json.dumps({"mean": 1.5, "std": 0.5}))
    served = ServedReward("served", EchoBackend(), checkpoint=checkpoint)
    assert (served.mean, served.std) == (1.5, 0.5)
    assert served.describe()["checkpoint"] == "rm" and served.describe()["backend"] == "fake"


async def test_a_remote_reward_given_only_a_url_reads_its_files_from_the_servers_model_path(tiny_reward_dir):
    reward = ServedReward("r", remote(FakePoolingServer(root=str(tiny_reward_dir))), checkpoint=None)
    with pytest.raises(RuntimeError, match="not known yet"):
        await reward.score_async(PROMPTS, ANSWERS)
    await reward.start()
    assert reward.checkpoint == tiny_reward_dir and reward.state() == "ready"


async def test_a_remote_model_path_missing_here_is_an_error_naming_the_fix(caplog):
    reward = ServedReward("r", remote(FakePoolingServer(root="/nowhere/rm")), checkpoint=None)
    with caplog.at_level(logging.ERROR):
        await reward.start()
    assert reward.encoder is None and "r=PATH@URL" in caplog.text


async def test_registry_bounds_calls_held_by_a_served_reward_and_times_them_out(tiny_reward_dir):
    backend = EchoBackend()
    backend.gate = asyncio.Event()
    registry = RewardRegistry(timeout_s=0.5, max_pending_per_reward=1)
    registry.add(ServedReward("served", backend, checkpoint=tiny_reward_dir))
    first = asyncio.ensure_future(registry.score({"served": 1.0}, PROMPTS[0], ["a"]))
    await asyncio.sleep(0.1)
    with pytest.raises(RewardError, match="busy: 1 calls waiting"):
        await registry.score({"served": 1.0}, PROMPTS[0], ["b"])
    with pytest.raises(RewardError, match="timed out"):
        await first
    assert registry.pending() == {"served": 0}  # the timed-out call gave its slot back
    backend.gate.set()
    report = await registry.score({"served": 1.0}, PROMPTS[0], ["a", "bb"])
    assert len(report.total) == 2


def test_vllm_needs_a_plain_classifier_checkpoint(tmp_path):
    why = check_pooling_checkpoint(REPO / "models" / "helpful-harmless-causal")
    assert "aligner export-rm" in why
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert "not a sequence classifier" in check_pooling_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"],
                                                       "id2label": {"0": "a", "1": "b"}}))
    assert "several outputs" in check_pooling_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    assert check_pooling_checkpoint(tmp_path) is None


def test_serving_an_adapter_through_vllm_stops_the_server_with_the_export_command():
    from server.cli import parse_args
    from server.serve import build_rewards

    args = parse_args(["serve", "--reward-model", f"x=vllm:{REPO / 'models' / 'helpful-harmless-causal'}"])
    with pytest.raises(SystemExit, match="export-rm"):
        build_rewards(args)
    args = parse_args(["serve", "--reward-model", "x="])
    with pytest.raises(SystemExit, match="expects NAME=PATH"):
        build_rewards(args)
