"""`aligner` command line: serve, prepare-model."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from aligner.model_prep import DEFAULT_MODEL_NAME, default_model_dir, prepare_default_model


def _env(name: str, default=None):
    return os.environ.get(name, default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aligner", description="Inference-time alignment server")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the OpenAI-compatible server")
    serve.add_argument(
        "--model",
        default=None,
        help="Hugging Face model directory (default: the prepared SmolLM2-135M-Instruct)",
    )
    serve.add_argument("--served-model-name", default=None, help="name clients send as `model`")
    serve.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(_env("PORT", "8000")))
    serve.add_argument(
        "--api-key",
        default=_env("ALIGNER_API_KEY"),
        help="require 'Authorization: Bearer KEY' (also ALIGNER_API_KEY)",
    )
    serve.add_argument("--max-model-len", type=int, default=2048)
    serve.add_argument("--max-n", type=int, default=8, help="largest `n` a request may ask for")
    serve.add_argument("--dtype", default="auto")
    serve.add_argument(
        "--kv-cache-gib", type=float, default=1.0, help="KV cache size on CPU, in GiB of host RAM"
    )
    serve.add_argument("--max-num-seqs", type=int, default=64)
    serve.add_argument(
        "--enforce-eager",
        action="store_true",
        default=None,
        help="skip torch.compile and CUDA graphs on GPU (CPU always runs eager)",
    )
    serve.add_argument(
        "--self-check",
        default="auto",
        choices=["auto", "on", "off"],
        help="before /ready turns 200, compare the engine's (and each guide's) top-1 tokens over a fixed text "
        "with Hugging Face's float32 forward; on disagreement rebuild in float32, and if that disagrees too, "
        "stay not ready. auto: on for checkpoints up to 1 GiB (the default model)",
    )
    serve.add_argument(
        "--reward-model",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="register a reward: NAME=PATH (sequence-classification checkpoint or adapter) or "
        "NAME=regex:PATTERN (a rule); repeatable. Built-in rules need no flag.",
    )
    serve.add_argument(
        "--guide",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="register a token-level guide: a causal LM (genarm) or a causal reward model with a "
        "sequence-classification head (args), full checkpoint or adapter; repeatable",
    )
    serve.add_argument(
        "--models-dir",
        default=None,
        metavar="DIR",
        help="register every model `aligner train` wrote under DIR, named after its folder: bt models "
        "as rewards (and as ARGS guides on a causal backbone), arm models as GenARM guides",
    )
    serve.add_argument("--guide-max-slots", type=int, default=16, help="guided sequences decoded at once")
    serve.add_argument("--guide-max-len", type=int, default=None, help="default: --max-model-len")
    serve.add_argument("--guide-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                       help="guide weights and cache (bf16 measured faster than fp32 on CPU)")
    serve.add_argument("--guide-quantization", default=None, choices=["int8"],
                       help="int8: the guides' projections as W8A8 int8 GEMMs (per-channel weights, per-token "
                       "activations; CPU, vLLM's oneDNN kernels), about 1.8x faster than bf16 there")
    serve.add_argument(
        "--helper-model",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve another causal LM (a Hugging Face directory) in its own vLLM engine, for the "
        "rewrite strategy's `rewriter` and the correct strategy's `corrector`; repeatable",
    )
    serve.add_argument("--helper-kv-cache-gib", type=float, default=0.25, help="each helper's KV cache on CPU")
    serve.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="GPU: the policy engine's share of device memory (default 0.9, less 0.1 per helper model, "
        "each of which gets 0.1)",
    )
    serve.add_argument("--default-reward", default=None, help="reward used when a request names none")
    serve.add_argument("--reward-max-length", type=int, default=1024,
                       help="tokens per scored pair (models `aligner train` wrote keep the length they were trained with)")
    serve.add_argument("--reward-batch-size", type=int, default=16)
    serve.add_argument("--reward-dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                       help="reward models' weights (float32: as `eval-rm` scored them; auto: the checkpoint's)")
    serve.add_argument(
        "--default-strategy", default="none", help="strategy when the request names none"
    )
    serve.add_argument("--max-candidates", type=int, default=16, help="largest N for multi-sample strategies")
    serve.add_argument("--stream-keepalive-s", type=float, default=2.0)
    serve.add_argument(
        "--profiles", default=None, help="versioned alignment profiles (YAML); default: the shipped file"
    )
    serve.add_argument("--reward-timeout-s", type=float, default=30.0, help="then the request falls back")
    limits = serve.add_argument_group("overload protection (beyond these: 429 with Retry-After)")
    limits.add_argument("--max-running-requests", type=int, default=16)
    limits.add_argument("--max-running-sequences", type=int, default=64, help="n x candidates, summed")
    limits.add_argument("--max-queued-requests", type=int, default=64)
    limits.add_argument("--max-queue-wait-s", type=float, default=60.0)
    limits.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger bodies get 413")
    limits.add_argument("--max-engine-restarts", type=int, default=5)
    serve.add_argument("--log-level", default="info")

    from aligner.training.cli import add_subcommands as add_training
    from bench.cli import add_subcommands as add_bench

    add_bench(sub)
    add_training(sub)

    prep = sub.add_parser("prepare-model", help="convert the packaged GGUF default model once")
    prep.add_argument("--output", type=Path, default=None, help=f"default: {default_model_dir()}")
    prep.add_argument("--force", action="store_true", help="convert again even if present")
    return parser


def cmd_prepare_model(args) -> int:
    path = prepare_default_model(args.output, force=args.force)
    print(path)
    return 0


def build_rewards(args):
    from aligner.rewards import RewardRegistry

    rewards = RewardRegistry.with_builtins()
    rewards.timeout_s = args.reward_timeout_s
    for spec in args.reward_model:
        reward = rewards.add_from_spec(
            spec, max_length=args.reward_max_length, max_batch_size=args.reward_batch_size, dtype=args.reward_dtype
        )
        print(f"aligner: reward {reward.name!r} ({reward.kind}) registered", file=sys.stderr)
    if args.default_reward is not None:
        if rewards.get(args.default_reward) is None:
            raise SystemExit(f"aligner: unknown --default-reward {args.default_reward!r}")
        rewards.default = args.default_reward
    return rewards


HELPER_GPU_SHARE = 0.1


def named_path(spec: str, flag: str) -> tuple[str, str]:
    """`NAME=PATH` -> (NAME, PATH), or exit with a message naming `flag`."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"aligner: {flag} expects NAME=PATH, got {spec!r}")
    return name, path


def build_helpers(args) -> dict:
    """name -> VLLMEngine for every `--helper-model NAME=PATH` (not started yet)."""
    from decoding.vllm_engine import VLLMEngine, VLLMEngineConfig

    helpers = {}
    for spec in args.helper_model:
        name, path = named_path(spec, "--helper-model")
        if name == "policy" or name in helpers:
            raise SystemExit(f"aligner: helper model name {name!r} is taken")
        if not (Path(path) / "config.json").is_file():
            raise SystemExit(f"aligner: --helper-model {name}: {path} is not a Hugging Face model directory")
        limit = json.loads((Path(path) / "config.json").read_text()).get("max_position_embeddings")
        helpers[name] = VLLMEngine(VLLMEngineConfig(
            model=str(Path(path).resolve()), served_model_name=name,
            max_model_len=min(args.max_model_len, limit or args.max_model_len),
            dtype=args.dtype, kv_cache_gib=args.helper_kv_cache_gib, max_num_seqs=16,
            enforce_eager=args.enforce_eager, gpu_memory_utilization=HELPER_GPU_SHARE,
            self_check=args.self_check,
        ))
    return helpers


def cmd_serve(args) -> int:
    import uvicorn

    if args.models_dir is not None:
        from aligner.model_refs import discover

        found_rewards, found_guides = discover(args.models_dir)
        args.reward_model = found_rewards + args.reward_model
        args.guide = found_guides + args.guide

    from aligner.strategies import get_strategy
    from server.admission import AdmissionConfig

    from decoding.vllm_engine import VLLMEngine, VLLMEngineConfig, detect_device
    from server.app import build_app
    from server.config import ServerConfig

    if args.model is None:
        model = str(prepare_default_model())
        name = args.served_model_name or DEFAULT_MODEL_NAME
    else:
        model = args.model
        name = args.served_model_name or Path(model.rstrip("/")).name
    from aligner.strategies.guided import GuideRegistry
    from decoding.guide_spec import guide_mode

    guide_specs = {}
    for spec in args.guide:
        gname, path = named_path(spec, "--guide")
        guide_specs[gname] = {"path": str(Path(path).resolve()), "mode": guide_mode(path)}
    if args.guide_quantization and detect_device() != "cpu":
        raise SystemExit("aligner: --guide-quantization int8 runs on vLLM's CPU kernels only; drop it on a GPU")
    helpers = build_helpers(args)
    guide_max_len = args.guide_max_len or args.max_model_len
    guides = GuideRegistry({n: g["mode"] for n, g in guide_specs.items()}, args.guide_max_slots, guide_max_len)
    engine = VLLMEngine(
        VLLMEngineConfig(
            model=model,
            served_model_name=name,
            max_model_len=args.max_model_len,
            dtype=args.dtype,
            kv_cache_gib=args.kv_cache_gib,
            max_num_seqs=args.max_num_seqs,
            enforce_eager=args.enforce_eager,
            guides=guide_specs,
            guide_max_slots=args.guide_max_slots,
            guide_max_len=guide_max_len,
            guide_dtype=args.guide_dtype,
            guide_quantization=args.guide_quantization,
            gpu_memory_utilization=args.gpu_memory_utilization or 0.9 - HELPER_GPU_SHARE * len(helpers),
            self_check=args.self_check,
        )
    )
    config = ServerConfig(
        served_model_name=name,
        api_key=args.api_key or None,
        max_n=args.max_n,
        default_strategy=args.default_strategy,
        max_candidates=args.max_candidates,
        stream_keepalive_s=args.stream_keepalive_s,
        max_body_bytes=args.max_body_bytes,
        max_engine_restarts=args.max_engine_restarts,
        admission=AdmissionConfig(
            max_running_requests=args.max_running_requests,
            max_running_sequences=args.max_running_sequences,
            max_queued_requests=args.max_queued_requests,
            max_queue_wait_s=args.max_queue_wait_s,
        ),
    )
    if get_strategy(args.default_strategy) is None:
        raise SystemExit(f"aligner: unknown --default-strategy {args.default_strategy!r}")
    from aligner.profiles import DEFAULT_PROFILES, ProfileError
    from server.app import load_profiles

    try:
        profiles = load_profiles(args.profiles or DEFAULT_PROFILES)
    except ProfileError as exc:
        raise SystemExit(f"aligner: bad --profiles file: {exc}") from None
    rewards = build_rewards(args)
    app = build_app(engine, config, rewards, profiles, guides, helpers)
    print(f"aligner: serving {name} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(getattr(args, "log_level", "info")).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One INFO line per HTTP request drowns the reports of `bench` and `train`.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "prepare-model":
        return cmd_prepare_model(args)
    if hasattr(args, "func"):
        return args.func(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
