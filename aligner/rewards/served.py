"""Reward models scored by vLLM's pooling runner, in this process or on another server.

- `NAME=vllm:PATH`: an in-process vLLM pooling engine (`decoding.pooling_engine`) on the policy's
  device, batching every request's score calls continuously;
- `NAME=http://HOST:PORT`: a remote server speaking vLLM's pooling API (`POST /classify`), e.g.
  `python -m vllm.entrypoints.openai.api_server --model PATH --runner pooling`; the checkpoint's
  small files (tokenizer, `aligner_reward.json`, `reward_stats.json`) are read from the path the
  server reports as its model's root when this machine has it;
- `NAME=PATH@http://HOST:PORT`: the same, with the files read from PATH here (a copy of the
  checkpoint without its weights does).

Both lay pairs out as the model was trained (`PairEncoder`: the server receives token ids, not
text) and normalise with its `reward_stats.json`, so they score what the in-process Hugging Face
scorer scores, within the numerics of vLLM's kernels.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from aligner.rewards.base import Messages, Reward, checkpoint_version
from aligner.rewards.encoding import PairEncoder
from decoding.model_refs import matmul_parameters

logger = logging.getLogger(__name__)

STATS_FILE = "reward_stats.json"
REWARD_API_KEY_ENV = "ALIGNER_REWARD_API_KEY"  # sent as a bearer token to remote reward servers


class RewardNotReady(RuntimeError):
    """The reward's model cannot score yet (loading, unreachable, restarting)."""


class ServedReward(Reward):
    """A one-output sequence classifier scored through `backend.classify(token_id_lists)`."""

    kind = "model"
    served = True

    def __init__(self, name: str, backend, *, checkpoint: str | Path | None, max_length: int = 1024):
        self.name = name
        self.backend = backend
        self.max_length = max_length
        self.encoder: PairEncoder | None = None
        self.checkpoint: Path | None = None
        self.mean, self.std = 0.0, 1.0
        if checkpoint is not None:
            self.load_layout(checkpoint)

    @property
    def engine(self):
        """The in-process engine the server must start and supervise, if any."""
        return getattr(self.backend, "engine", None)

    def load_layout(self, checkpoint: str | Path) -> None:
        """Tokenizer, pair layout, length and normalisation of the checkpoint (no weights)."""
        from transformers import AutoTokenizer

        path = Path(checkpoint)
        version = checkpoint_version(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        limit = min(self.max_length, getattr(tokenizer, "model_max_length", self.max_length) or self.max_length)
        encoder = PairEncoder.for_model(tokenizer, path, limit)
        if (path / STATS_FILE).is_file():
            stats = json.loads((path / STATS_FILE).read_text())
            self.mean, self.std = float(stats["mean"]), float(stats["std"]) or 1.0
        self.checkpoint, self.encoder, self.version = path, encoder, version
        try:
            self.matmul_parameters = matmul_parameters(path, causal=False)
        except (OSError, ValueError):  # a checkpoint without readable safetensors: FLOPs not estimated
            logger.info("reward %s: no parameter count from %s", self.name, path.name, exc_info=True)
            self.matmul_parameters = None
        self.description = f"sequence reward model {path.name}, scored by {self.backend.describe()}"

    async def start(self) -> None:
        """Learn where the checkpoint's files are when only a URL was given: ask the server
        until it answers (it may start after this one)."""
        if self.encoder is not None:
            return
        delay = 1.0
        while self.encoder is None:
            try:
                root = await self.backend.model_root()
                if root is None or not (Path(root) / "config.json").is_file():
                    raise RewardNotReady(f"the server's model {root!r} is not a directory here; give its files as "
                                         f"{self.name}=PATH@URL")
                await asyncio.to_thread(self.load_layout, root)
                logger.info("reward %s: layout read from %s", self.name, root)
            except RewardNotReady as exc:
                logger.error("reward %s: %s", self.name, exc)
                return
            except Exception as exc:  # noqa: BLE001 - unreachable for now: try again later
                logger.warning("reward %s: %s not reachable yet (%s: %s)", self.name, self.backend.describe(),
                               type(exc).__name__, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    def state(self) -> str:
        if self.encoder is None:
            return "waiting for the server's model"
        return self.backend.state()

    def describe(self) -> dict:
        return {**super().describe(), "backend": self.backend.kind, "state": self.state(),
                "checkpoint": self.checkpoint.name if self.checkpoint else None}

    def encode_all(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[list[int]]:
        encoded = []
        for messages, response in zip(prompts, responses):
            prompt_ids, response_ids = self.encoder.encode(list(messages), response)
            encoded.append(prompt_ids + response_ids)
        return encoded

    async def score_async(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        return (await self.score_async_counted(prompts, responses))[0]

    async def score_async_counted(self, prompts: Sequence[Messages], responses: Sequence[str]) -> tuple[list[float], int]:
        """The scores, and the tokens the pooling model read for them."""
        if self.encoder is None:
            raise RewardNotReady("the remote server's model is not known yet")
        # Tokenising candidates is CPU work: off the event loop.
        encoded = await asyncio.to_thread(self.encode_all, prompts, responses)
        raw = await self.backend.classify(encoded)
        return [(x - self.mean) / self.std for x in raw], sum(len(e) for e in encoded)

    def score(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        raise TypeError(f"reward {self.name!r} is served by vLLM: score it through RewardRegistry.score")

    async def aclose(self) -> None:
        await self.backend.aclose()


class EngineBackend:
    """Scores with an in-process `decoding.pooling_engine.VLLMPoolingEngine`."""

    kind = "vllm"

    def __init__(self, engine):
        self.engine = engine

    def describe(self) -> str:
        return "vLLM's pooling runner in this process"

    def state(self) -> str:
        state = self.engine.status().state
        return state if state in ("ready", "restarting") else "not running"

    async def model_root(self) -> str | None:
        return self.engine.config.model

    async def classify(self, sequences: list[list[int]]) -> list[float]:
        if not self.engine.ready:
            raise RewardNotReady(f"its vLLM engine is {self.state()}")
        return await self.engine.classify(sequences)

    async def aclose(self) -> None:
        pass  # the server stops the engine with the others


class RemoteBackend:
    """Scores through a server that speaks vLLM's pooling API, over one pooled HTTP client.

    A call that cannot connect, or gets 502/503/504, is retried `retries` times with back-off
    (a restarting server); anything else fails at once, and the request falls back."""

    kind = "remote"

    def __init__(self, url: str, *, timeout_s: float = 30.0, connect_timeout_s: float = 2.0, retries: int = 2,
                 max_connections: int = 32, transport=None):
        self.url = url.rstrip("/")
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.retries = retries
        self.max_connections = max_connections
        self.model: str | None = None  # the served model's id, learnt from /v1/models
        self.last_error: str | None = None
        self._transport = transport  # an httpx transport (tests); None: the network
        self._client = None

    def describe(self) -> str:
        return "a remote vLLM pooling server"

    def state(self) -> str:
        return "ready" if self.last_error is None else f"failing: {self.last_error}"

    def _http(self):
        if self._client is None:
            import httpx

            key = os.environ.get(REWARD_API_KEY_ENV)
            self._client = httpx.AsyncClient(
                base_url=self.url, headers={"Authorization": f"Bearer {key}"} if key else None,
                timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
                limits=httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections),
                transport=self._transport)
        return self._client

    async def model_root(self) -> str | None:
        response = await self._request("GET", "/v1/models")
        models = response.json().get("data") or []
        if not models:
            return None
        self.model = models[0].get("id")
        return models[0].get("root") or self.model

    async def classify(self, sequences: list[list[int]]) -> list[float]:
        body = {"input": sequences, "use_activation": False}
        if self.model is not None:
            body["model"] = self.model
        data = (await self._request("POST", "/classify", json=body)).json().get("data")
        if not isinstance(data, list) or len(data) != len(sequences):
            raise ValueError(f"the server returned {len(data) if isinstance(data, list) else 'no'} scores for "
                             f"{len(sequences)} inputs")
        scores = [0.0] * len(sequences)
        for item in data:
            probs = item.get("probs") or []
            if len(probs) != 1:
                raise ValueError(f"the server's model has {len(probs)} outputs; a reward model has one")
            scores[int(item["index"])] = float(probs[0])
        return scores

    async def _request(self, method: str, path: str, **kwargs):
        import httpx

        for attempt in range(self.retries + 1):
            try:
                response = await self._http().request(method, path, **kwargs)
                if response.status_code in (502, 503, 504) and attempt < self.retries:
                    raise _Retry(f"HTTP {response.status_code}")
                if response.status_code >= 400:
                    raise RuntimeError(f"{method} {path}: HTTP {response.status_code}: {_error_text(response)}")
                self.last_error = None
                return response
            except (httpx.NetworkError, httpx.ConnectTimeout, httpx.RemoteProtocolError, _Retry) as exc:
                # Connection-level failures (a server starting or restarting) are retried; a
                # read timeout is not: the server is slow, and a retry would only add load.
                if attempt == self.retries:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    raise RuntimeError(f"{method} {path}: {self.last_error}") from exc
                await asyncio.sleep(0.2 * 2**attempt)
            except Exception as exc:
                self.last_error = str(exc)
                raise

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


class _Retry(Exception):
    pass


def _error_text(response) -> str:
    try:
        error = response.json().get("error")
        return (error.get("message") if isinstance(error, dict) else str(error or response.text))[:300]
    except ValueError:
        return response.text[:300]


def parse_served_spec(target: str) -> tuple[str, str | None, str | None]:
    """A `--reward-model` target served by vLLM -> (backend, checkpoint, url), or ("", None, None)
    when it is not one.

    >>> parse_served_spec("vllm:/models/rm")
    ('vllm', '/models/rm', None)
    >>> parse_served_spec("http://rm:8000")
    ('remote', None, 'http://rm:8000')
    >>> parse_served_spec("/models/rm@https://rm.internal:8443/")
    ('remote', '/models/rm', 'https://rm.internal:8443/')
    >>> parse_served_spec("/models/rm")
    ('', None, None)
    """
    if target.startswith("vllm:"):
        return "vllm", target.removeprefix("vllm:"), None
    for scheme in ("http://", "https://"):
        if target.startswith(scheme):
            return "remote", None, target
        path, sep, url = target.partition("@" + scheme)
        if sep:
            return "remote", path, scheme + url
    return "", None, None
