"""A reward model scored by vLLM's pooling runner in this process (`--reward-model NAME=vllm:PATH`).

The checkpoint is a plain one-output sequence classifier (what `aligner export-rm` writes); vLLM
batches the score requests of every concurrent request continuously, on the policy's device.
Like `VLLMEngine`, the engine core runs in its own process and is built by `start()`; it has
the same lifecycle (ready, dead, restart), so the server starts, supervises and stops it with
the helper models.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from decoding.engine import EngineDeadError, EngineError, EngineStatus

logger = logging.getLogger(__name__)

GiB = 1 << 30


def check_pooling_checkpoint(path: str | Path) -> str | None:
    """Why vLLM's pooling runner cannot load `path` as a reward model, or None when it can."""
    path = Path(path)
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file() or (path / "aligner_base.json").is_file():
            return (f"{path} is an adapter over a base model; vLLM loads plain checkpoints: "
                    f"run `aligner export-rm {path} OUT_DIR` and serve OUT_DIR")
        return f"{path} is not a Hugging Face model directory (no config.json)"
    config = json.loads((path / "config.json").read_text())
    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        return f"{path} is a {architectures or 'model'} checkpoint, not a sequence classifier"
    if len(config.get("id2label") or {0: "score"}) != 1:
        return f"{path} has several outputs; a reward model has one"
    return None


def engine_core_pids(llm) -> list[int]:
    """The pids of an AsyncLLM's engine core processes (logged: an operator, or a test, can
    tell this engine's processes from the policy's, which carry the same title)."""
    manager = getattr(getattr(getattr(llm, "engine_core", None), "resources", None), "engine_manager", None)
    return [p.pid for p in getattr(manager, "processes", [])]


@dataclass
class PoolingEngineConfig:
    model: str
    name: str
    max_model_len: int
    # float32 by default: what `eval-rm` measured the shipped reward models' accuracy in.
    dtype: str = "float32"
    kv_cache_gib: float = 0.25  # CPU: the prefills of the scored conversations
    gpu_memory_utilization: float = 0.1  # GPU: this engine's share of the device
    max_num_seqs: int = 64

    def engine_args(self, device: str):
        from vllm.engine.arg_utils import AsyncEngineArgs

        kwargs = dict(model=self.model, runner="pooling", served_model_name=self.name,
                      max_model_len=self.max_model_len, dtype=self.dtype, max_num_seqs=self.max_num_seqs,
                      enforce_eager=device == "cpu", disable_log_stats=True)
        if device == "cpu":
            # No sampling, so no seeded-chunk bug; a step budget that holds a whole conversation
            # keeps the CPU prefill in one piece, as for the policy.
            kwargs.update(kv_cache_memory_bytes=int(self.kv_cache_gib * GiB), enable_chunked_prefill=False,
                          max_num_batched_tokens=max(self.max_model_len, 2048), block_size=32)
        else:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        return AsyncEngineArgs(**kwargs)


class VLLMPoolingEngine:
    """Scores token sequences with a one-output sequence classifier in vLLM's pooling runner."""

    def __init__(self, config: PoolingEngineConfig):
        self.config = config
        self.model_name = config.name
        self._llm = None
        self._failed = False
        self._start_error: BaseException | None = None
        self.restarting = False
        self.numerics: dict | None = None

    @property
    def ready(self) -> bool:
        return self._llm is not None and not self.dead

    @property
    def dead(self) -> bool:
        return self._failed or (self._llm is not None and bool(self._llm.errored))

    def status(self) -> EngineStatus:
        return EngineStatus.of(ready=self.ready, dead=self.dead, restarting=self.restarting,
                               start_error=self._start_error, numerics=self.numerics)

    def _build(self):
        from vllm.v1.engine.async_llm import AsyncLLM

        from decoding.vllm_config import detect_device, prefer_spawn

        device = detect_device()
        prefer_spawn(device)
        logger.info("building vLLM pooling engine for reward %s (%s) on %s", self.model_name, self.config.model, device)
        llm = AsyncLLM.from_engine_args(self.config.engine_args(device))
        self.numerics = {"dtype": str(llm.model_config.dtype).removeprefix("torch."), "device": device,
                         "runner": "pooling"}
        logger.info("reward engine %s runs in %s (engine core pids %s)", self.model_name, self.numerics["dtype"],
                    engine_core_pids(llm))
        return llm

    async def start(self) -> None:
        try:
            self._llm = await asyncio.to_thread(self._build)
            self._start_error, self._failed = None, False
        except BaseException as exc:
            self._start_error, self._failed = exc, True
            raise

    async def restart(self) -> None:
        self.restarting = True
        try:
            await self.shutdown()
            await self.start()
        finally:
            self.restarting = False

    async def shutdown(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)

    async def classify(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        """The classifier's raw output (no activation) for each token sequence, in order; all
        sequences go to the engine at once, which batches them with other requests'."""
        if self._llm is None or self.dead:
            raise EngineDeadError(f"reward engine {self.model_name} is not running")
        from vllm import PoolingParams

        params = PoolingParams(task="classify", use_activation=False)
        return list(await asyncio.gather(*(self._one(list(ids), params) for ids in sequences)))

    async def _one(self, ids: list[int], params) -> float:
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDead

        final = None
        try:
            async for out in self._llm.encode({"prompt_token_ids": ids}, params, f"reward-{uuid.uuid4().hex}"):
                final = out
        except VLLMEngineDead as exc:
            raise EngineDeadError(str(exc) or "reward engine is dead") from exc
        if final is None or final.outputs is None:
            raise EngineError(f"reward engine {self.model_name} returned no output")
        return float(final.outputs.data.reshape(-1)[0])
