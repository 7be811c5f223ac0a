"""`Engine` implemented by vLLM's in-process `AsyncLLM` (V1): its lifecycle (build, the start-up
self-check, restart, shutdown) and its requests. How it is configured is `decoding.vllm_config`,
how settings and outputs convert is `decoding.vllm_convert`.

All vLLM imports happen inside functions so that importing this module stays cheap and
free of side effects; the engine is built by `start()`, off the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator

from decoding.engine import (
    EngineDeadError,
    EngineError,
    EngineStatus,
    GenerationChunk,
    InvalidRequestError,
    SamplingConfig,
)
from decoding.guide_spec import guide_report_key, read_guide_reports
from decoding.hf_tokenizer import HFChatTokenizer
from decoding.self_check import SelfCheckFailed
from decoding.vllm_config import VLLMEngineConfig, detect_device, engine_summary, prefer_spawn
from decoding.vllm_convert import to_chunk, to_sampling_params

logger = logging.getLogger(__name__)


class VLLMEngine:
    """`decoding.engine.Engine` backed by `vllm.v1.engine.async_llm.AsyncLLM`."""

    def __init__(self, config: VLLMEngineConfig):
        self.config = config
        self.model_name = config.served_model_name or config.model
        self._llm = None
        self._tokenizer: HFChatTokenizer | None = None
        self._start_error: BaseException | None = None
        self._failed = False  # the last start or restart raised: the supervisor retries
        self.restarting = False
        self.numerics: dict | None = None  # the configuration built and its self-check, for /ready
        self._checked = False  # the built engine passed its self-check (or it is off): it may serve
        self.matmul_parameters = _matmul_parameters(config.model)

    @property
    def ready(self) -> bool:
        return self._checked and self._llm is not None and not self.dead

    @property
    def dead(self) -> bool:
        return self._failed or (self._llm is not None and bool(self._llm.errored))

    def status(self) -> EngineStatus:
        return EngineStatus.of(ready=self.ready, dead=self.dead, restarting=self.restarting,
                               start_error=self._start_error, numerics=self.numerics)

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    @property
    def tokenizer(self) -> HFChatTokenizer:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = HFChatTokenizer(AutoTokenizer.from_pretrained(self.config.model))
        return self._tokenizer

    async def start(self) -> None:
        try:
            await self._build_checked()
            _ = self.tokenizer
        except SelfCheckFailed as exc:
            # Not dead: the supervisor would only rebuild the same wrong engine. Not ready, ever.
            self._start_error = exc
            raise
        except BaseException as exc:
            self._start_error = exc
            self._failed = True
            raise

    def _build(self):
        from vllm.v1.engine.async_llm import AsyncLLM

        from decoding.vllm_plugin import attention_choice

        device = detect_device()
        prefer_spawn(device)
        logger.info("building vLLM engine for %s on %s (%s numerics)", self.config.model, device, self.config.numerics)
        args, vllm_config = self.config.vllm_config(device)
        llm = AsyncLLM.from_vllm_config(vllm_config, enable_log_requests=args.enable_log_requests,
                                        disable_log_stats=args.disable_log_stats)
        logger.info("engine %s vLLM config: %s", self.model_name, json.dumps(engine_summary(llm.vllm_config)))
        dtype = str(llm.model_config.dtype).removeprefix("torch.")
        attention = attention_choice(device, dtype)
        logger.info("engine %s runs in %s; attention kernel: %s (%s)", self.model_name, dtype, attention["kernel"],
                    attention["reason"])
        self.numerics = {"configuration": self.config.numerics, "dtype": dtype, "device": device,
                         "attention": attention, "self_check": None}
        return llm

    async def _build_checked(self) -> None:
        """Build the engine; with the self-check on, check its numerics and those of its guides,
        rebuild once in the safe configuration if either disagrees, and raise SelfCheckFailed if
        that disagrees too (the engine is then shut down: never serve garbage)."""
        from decoding import self_check

        checking = self_check.resolve_mode(self.config.self_check, self.config.model)
        self._checked = False
        for attempt in ("fast", "safe"):
            if attempt == "safe":
                if self.config.numerics == "safe" or self._safe_is_same():
                    break
                logger.error("engine %s: self-check failed in %s; rebuilding in float32 (safe numerics)",
                             self.model_name, self.numerics["dtype"] if self.numerics else self.config.dtype)
                self.config = dataclasses.replace(self.config, numerics="safe")
            if not checking:
                self._llm = await asyncio.to_thread(self._build)
                self.numerics["self_check"] = {"status": "off"}
                self._checked = True
                return
            # The guides are checked in this process while the engine builds in its own.
            self._llm, results = await asyncio.gather(asyncio.to_thread(self._build), self._check_guides())
            if all(r.passed for r in results.values()):
                results = {**await self._check_engine(), **results}
                if results["engine"].passed and results["engine decode"].passed:
                    self._record_check("passed", results)
                    self._checked = True
                    return
            await self.shutdown()
        self._record_check("failed", results)
        failed = "; ".join(f"{name} {r.summary()}" for name, r in results.items() if not r.passed)
        raise SelfCheckFailed(f"numerics self-check failed, not serving: {failed}")

    def _safe_is_same(self) -> bool:
        c = self.config
        return c.dtype == "float32" and (not c.guides.specs or (c.guide_dtype == "float32" and not c.guide_quantization))

    def _record_check(self, status: str, results: dict) -> None:
        self.numerics = dict(self.numerics or {}, configuration=self.config.numerics)
        self.numerics["self_check"] = {"status": status, "fallback": self.config.numerics == "safe",
                                       **{name: r.describe() for name, r in results.items()}}
        logger.info("engine %s numerics: %s", self.model_name, self.numerics)

    async def _check_engine(self) -> dict:
        """{"engine": prompt logprobs over the check text, "engine decode": greedy decoding of its
        question}, each against float32 transformers."""
        from decoding import self_check

        started = time.monotonic()
        check_ids, prompt_ids = await asyncio.to_thread(self_check.engine_check_ids, self.config.model)
        got = await self.prompt_top_tokens(check_ids)
        prefill_seconds = time.monotonic() - started
        started = time.monotonic()
        decoded = await self.greedy_tokens(prompt_ids, self_check.DECODE_TOKENS)
        decode_seconds = time.monotonic() - started
        started = time.monotonic()
        prefill_ref, decode_ref = await asyncio.to_thread(
            self_check.causal_references, self.config.model, check_ids, prompt_ids, decoded)
        reference_seconds = time.monotonic() - started
        dtype = self.numerics["dtype"]
        results = {"engine": self_check.compare(got, prefill_ref, dtype),
                   "engine decode": self_check.compare(decoded, decode_ref, dtype)}
        # The float32 reference's time is counted once, with the prefill check.
        results["engine"].seconds = round(prefill_seconds + reference_seconds, 2)
        results["engine decode"].seconds = round(decode_seconds, 2)
        for name, result in results.items():
            (logger.info if result.passed else logger.error)("self-check of %s (%s): %s", self.model_name,
                                                             name, result.summary())
        return results

    async def _check_guides(self) -> dict:
        from decoding import self_check

        results = {}
        for name, spec in self.config.guides.specs.items():
            started = time.monotonic()
            results[f"guide {name}"] = result = await asyncio.to_thread(
                self_check.check_guide, spec["path"], spec["mode"], self.config.effective_guide_dtype,
                self.config.effective_guide_quantization)
            result.seconds = round(time.monotonic() - started, 2)
            (logger.info if result.passed else logger.error)("self-check of guide %s: %s", name, result.summary())
        return results

    async def _final_output(self, prompt_ids: list[int], params, tag: str):
        """The last `RequestOutput` of one self-check request (None if the engine gave none)."""
        final = None
        async for out in self._llm.generate({"prompt_token_ids": list(prompt_ids)}, params,
                                            f"{tag}-{uuid.uuid4().hex}"):
            final = out
        return final

    async def prompt_top_tokens(self, token_ids: list[int]) -> list[int | None]:
        """The engine's top-1 next token at every position of `token_ids`, teacher-forced
        (vLLM's prompt logprobs): element i predicts token i+1."""
        from vllm import SamplingParams

        from decoding.self_check import prompt_top1

        final = await self._final_output(token_ids, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1),
                                         "self-check")
        return prompt_top1(final.prompt_logprobs if final is not None else None)

    async def greedy_tokens(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        """The engine's greedy continuation of `prompt_ids`: `max_tokens` tokens decoded one a
        step, past the end-of-sequence token too (so the decode check always has its positions)."""
        from vllm import SamplingParams

        final = await self._final_output(prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                    ignore_eos=True), "self-check-decode")
        return list(final.outputs[0].token_ids) if final is not None and final.outputs else []

    async def shutdown(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)

    async def restart(self) -> None:
        """Replace a dead engine with a fresh one (in-flight requests have already failed)."""
        self.restarting = True
        try:
            old, self._llm = self._llm, None
            if old is not None:
                await asyncio.to_thread(old.shutdown)
            await self._build_checked()
            self._start_error = None
            self._failed = False
        except SelfCheckFailed as exc:
            self._start_error = exc
            self._failed = False
            raise
        except BaseException as exc:
            self._start_error = exc
            self._failed = True
            raise
        finally:
            self.restarting = False

    def num_unfinished_requests(self) -> int:
        return 0 if self._llm is None else self._llm.get_num_unfinished_requests()

    async def abort(self, request_id: str) -> None:
        if self._llm is not None and not self.dead:
            await self._llm.abort(request_id)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingConfig
    ) -> AsyncIterator[GenerationChunk]:
        if self._llm is None:
            raise EngineError("engine is not started")
        params = to_sampling_params(sampling)
        prompt = {"prompt_token_ids": list(prompt_token_ids)}
        queue: asyncio.Queue = asyncio.Queue()
        # The engine stream runs in its own task: a consumer cancelled by a disconnect (anyio
        # re-cancels at every await) then cancels it exactly once, and AsyncLLM's own
        # cancellation handler gets to send the abort to the engine core undisturbed.
        pump = asyncio.create_task(self._pump(prompt, params, request_id, queue,
                                              sampling.structured.param if sampling.structured else None))
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                chunk = to_chunk(item, top_k=sampling.logprobs)
                if chunk.finished and (key := guide_report_key(sampling.extra_args)):
                    # The engine core's processor writes them; the request reads them here, once,
                    # in a thread (a glob and small files: no disk wait on the event loop).
                    chunk.guide_reports = await asyncio.to_thread(read_guide_reports, self.config.guides.report_dir,
                                                                  key)
                yield chunk
        finally:
            if not pump.done():
                pump.cancel()

    async def _pump(self, prompt, params, request_id: str, queue: asyncio.Queue,
                    structured_param: str | None = None) -> None:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDead

        try:
            async for out in self._llm.generate(prompt, params, request_id):
                queue.put_nowait(out)
            queue.put_nowait(_END)
        except asyncio.CancelledError:
            pass
        except VLLMEngineDead as exc:
            queue.put_nowait(EngineDeadError(str(exc) or "engine is dead"))
        except VLLMClientError as exc:
            param = getattr(exc, "parameter", None)
            if param is None and params.structured_outputs is not None and _GRAMMAR_WORDS.search(str(exc)):
                param = structured_param  # vLLM's grammar compilers name no parameter
            queue.put_nowait(InvalidRequestError(str(exc), param))
        except Exception as exc:  # noqa: BLE001 - surfaced to the request, not the loop
            logger.exception("engine request %s failed", request_id)
            queue.put_nowait(EngineError(f"{type(exc).__name__}: {exc}"))


_END = object()
_GRAMMAR_WORDS = re.compile(r"grammar|schema|regex|structured|choice", re.IGNORECASE)


def _matmul_parameters(model: str) -> int | None:
    """The policy's parameter count for compute estimates; None (and a log line) where its
    checkpoint cannot be read (a hub name, an unreadable header)."""
    from decoding.model_refs import matmul_parameters

    try:
        return matmul_parameters(model)
    except (OSError, ValueError, KeyError):
        logger.info("no parameter count for %s: answers report no FLOPs for it", model, exc_info=True)
        return None
