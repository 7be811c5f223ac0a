"""The `aligner` command: serve, prepare-model, train, eval-rm, and the commands other
packages plug in (the `aligner.commands` entry points: `bench`).

The layers import downward only (server -> aligner -> decoding -> kernels), so this top
module never imports `bench`: bench registers its subcommands through an entry point.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import metadata
from pathlib import Path

from decoding.model_prep import default_model_dir, prepare_default_model

COMMANDS_ENTRY_POINTS = "aligner.commands"


def _env(name: str, default=None):
    return os.environ.get(name, default)


def _positive_or_none(text: str, kind=float):
    """A positive limit, or None for 0 (no limit)."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a limit cannot be negative (0 means none)")
    return value or None


def _count_or_none(text: str) -> int | None:
    return _positive_or_none(text, int)


def add_http_arguments(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("model and HTTP")
    group.add_argument("--model", default=None,
                       help="Hugging Face model directory (default: the prepared SmolLM2-135M-Instruct)")
    group.add_argument("--served-model-name", default=None, help="name clients send as `model`")
    group.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    group.add_argument("--port", type=int, default=int(_env("PORT", "8000")))
    group.add_argument("--api-key", default=_env("ALIGNER_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (also ALIGNER_API_KEY)")
    group.add_argument("--api-key-file", default=None, metavar="PATH",
                       help="accept any key of PATH, one per line ('#' comments and blank lines skipped), "
                       "as well as --api-key; a line may add tenant=NAME and role=admin|client|metrics after its key "
                       "(a bare key is an admin key); SIGHUP re-reads it, keeping the old keys if it is unreadable or empty")
    group.add_argument("--metrics-key", default=_env("ALIGNER_METRICS_KEY"),
                       help="one more key, of the metrics role: /metrics, /health and /ready only, for probes and "
                            "Prometheus (also ALIGNER_METRICS_KEY)")
    group.add_argument("--log-level", default="info")
    group.add_argument("--tool-call-parser", default=None, metavar="NAME",
                       help="vLLM's tool-call parser for the model's call format (hermes, llama3_json, mistral, ...): "
                            "enables tool_choice 'auto' (named and required choices work without one)")


def add_engine_arguments(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("policy engine (vLLM)")
    group.add_argument("--max-model-len", type=int, default=2048)
    group.add_argument("--dtype", default="auto")
    group.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache size on CPU, in GiB of host RAM")
    group.add_argument("--max-num-seqs", type=int, default=64)
    group.add_argument("--enforce-eager", action="store_true", default=None,
                       help="skip torch.compile and CUDA graphs on GPU (CPU always runs eager)")
    group.add_argument("--gpu-memory-utilization", type=float, default=None,
                       help="GPU: the whole server's share of device memory (default 0.9), split between the "
                       "policy and helper models (each helper 0.1 of it, all helpers at most half)")
    group.add_argument(
        "--self-check", default="auto", choices=["auto", "on", "off"],
        help="before /ready turns 200, compare the engine's (and each guide's) top-1 tokens over a fixed text "
        "with Hugging Face's float32 forward; on disagreement rebuild in float32, and if that disagrees too, "
        "stay not ready. auto: on for checkpoints up to 1 GiB (the default model)",
    )


def add_model_arguments(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("reward models, guides and helper models")
    group.add_argument(
        "--reward-model", action="append", default=[], metavar="NAME=PATH",
        help="register a reward: NAME=PATH (sequence-classification checkpoint or adapter, scored here by "
        "Hugging Face), NAME=vllm:PATH (a plain checkpoint, e.g. from `aligner export-rm`, scored by an "
        "in-process vLLM pooling engine), NAME=http://HOST:PORT or NAME=PATH@http://HOST:PORT (a vLLM server "
        "started with --runner pooling; PATH: a local copy of its checkpoint's tokenizer and layout files, "
        "else the server's model path is read here; bearer token from $ALIGNER_REWARD_API_KEY) or "
        "NAME=regex:PATTERN (a rule); repeatable. Built-in rules need no flag.",
    )
    group.add_argument("--default-reward", default=None, help="reward used when a request names none")
    group.add_argument("--reward-max-length", type=int, default=1024,
                       help="tokens per scored pair (models `aligner train` wrote keep the length they were trained with)")
    group.add_argument("--reward-batch-size", type=int, default=16)
    group.add_argument("--reward-dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                       help="reward models' weights (float32: as `eval-rm` scored them; auto: the checkpoint's); "
                       "`vllm:` engines take it too, a remote server keeps its own")
    group.add_argument("--reward-device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="where local reward models score (auto: the policy's device, a GPU when there is one); "
                       "`vllm:` engines run on the policy's platform, a remote server on its own")
    group.add_argument("--reward-timeout-s", type=float, default=30.0, help="then the request falls back")
    group.add_argument("--reward-max-pending", type=int, default=32,
                       help="score calls one reward model may hold (running or waiting); beyond that a request falls back at once")
    group.add_argument(
        "--guide", action="append", default=[], metavar="NAME=PATH",
        help="register a token-level guide: a causal LM (genarm) or a causal reward model with a "
        "sequence-classification head (args), full checkpoint or adapter; repeatable",
    )
    group.add_argument("--guide-max-slots", type=int, default=16,
                       help="guided sequences decoded at once (more wait in the admission queue)")
    group.add_argument("--guide-max-len", type=int, default=None, help="default: --max-model-len")
    group.add_argument("--guide-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                       help="guide weights and cache (bf16 measured faster than fp32 on CPU)")
    group.add_argument("--guide-quantization", default=None, choices=["int8"],
                       help="int8: the guides' projections as W8A8 int8 GEMMs (per-channel weights, per-token "
                       "activations; CPU, vLLM's oneDNN kernels), about 1.8x faster than bf16 there")
    group.add_argument(
        "--models-dir", default=None, metavar="DIR",
        help="register every model `aligner train` wrote under DIR, named after its folder: bt models "
        "as rewards (and as ARGS guides on a causal backbone), arm models as GenARM guides",
    )
    group.add_argument(
        "--helper-model", action="append", default=[], metavar="NAME=PATH",
        help="serve another causal LM (a Hugging Face directory) in its own vLLM engine, for the "
        "rewrite strategy's `rewriter` and the correct strategy's `corrector`; repeatable",
    )
    group.add_argument("--helper-kv-cache-gib", type=float, default=0.25, help="each helper's KV cache on CPU")


def add_alignment_arguments(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("alignment")
    group.add_argument("--default-strategy", default="none", help="strategy when the request names none")
    group.add_argument("--profiles", default=None,
                       help="versioned alignment profiles (YAML); default: the shipped file")
    group.add_argument("--max-n", type=int, default=8, help="largest `n` a request may ask for")
    group.add_argument("--max-candidates", type=int, default=16, help="largest N for multi-sample strategies")
    group.add_argument("--max-request-seconds", type=_positive_or_none, default=600.0,
                       help="deadline of every request (chat, Responses and text completions), and the largest "
                            "alignment.deadline_s; at it the best answer so far is returned (0: none)")
    group.add_argument("--max-request-tokens", type=_count_or_none, default=None,
                       help="tokens a request may generate in all (candidates, stages), and the largest "
                            "alignment.max_total_tokens (default: none)")
    group.add_argument("--stream-keepalive-s", type=float, default=2.0)


def add_limit_arguments(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("overload protection (beyond these: 429 with Retry-After)")
    group.add_argument("--max-running-requests", type=int, default=16)
    group.add_argument("--max-running-sequences", type=int, default=64, help="n x candidates, summed")
    group.add_argument("--max-queued-requests", type=int, default=64)
    group.add_argument("--max-queue-wait-s", type=float, default=60.0)
    group.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger bodies get 413")
    group.add_argument("--max-engine-restarts", type=int, default=5)


def add_store_arguments(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("store: traces and feedback (opened only when one of these is given)")
    group.add_argument("--store", default=_env("ALIGNER_STORE"), metavar="URL",
                       help="where traces and feedback are kept (also ALIGNER_STORE, which keeps a database "
                       "password out of the process list): sqlite:///PATH or a path (default, with "
                       "--store-traces or --allow-request-traces: $ALIGNER_HOME/store.db, SQLite in WAL mode), or "
                       "postgresql://USER[:PASSWORD]@HOST[:PORT]/DB, which several replicas can share")
    group.add_argument("--store-traces", action="store_true",
                       help="store every chat and Responses answer's trace (conversation, strategy, candidates "
                       "with per-reward scores, selection, usage, timings) under its response id")
    group.add_argument("--allow-request-traces", action="store_true",
                       help="let a request ask for its own trace with alignment.trace: true (refused otherwise)")
    group.add_argument("--store-retention-days", type=_positive_or_none, default=30.0, metavar="DAYS",
                       help="delete traces and feedback older than this, in the background (0: keep them)")
    group.add_argument("--store-max-pending", type=int, default=1000,
                       help="trace writes waiting for the store; beyond this a trace is dropped and counted, "
                       "the answer goes out anyway")


def add_plugged_commands(sub) -> None:
    """Subcommands other packages register under the `aligner.commands` entry points."""
    for entry in sorted(metadata.entry_points(group=COMMANDS_ENTRY_POINTS), key=lambda e: e.name):
        entry.load()(sub)


def build_parser() -> argparse.ArgumentParser:
    from aligner.training.cli import add_subcommands as add_training

    parser = argparse.ArgumentParser(prog="aligner", description="Inference-time alignment server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="start the OpenAI-compatible server",
        epilog="Any other vLLM engine argument (vllm serve --help=all: --tensor-parallel-size, --data-parallel-size, "
               "--distributed-executor-backend ray, --quantization, --kv-cache-dtype, --max-num-batched-tokens, ...) "
               "goes to the policy engine unchanged and wins over this server's CPU defaults.")
    for add in (add_http_arguments, add_engine_arguments, add_model_arguments, add_alignment_arguments,
                add_limit_arguments, add_store_arguments):
        add(serve)
    serve.set_defaults(func=cmd_serve)
    prep = sub.add_parser("prepare-model", help="convert the packaged GGUF default model once")
    prep.add_argument("--output", type=Path, default=None, help=f"default: {default_model_dir()}")
    prep.add_argument("--force", action="store_true", help="convert again even if present")
    prep.set_defaults(func=cmd_prepare_model)
    add_training(sub)
    add_plugged_commands(sub)
    return parser


def cmd_prepare_model(args) -> int:
    print(prepare_default_model(args.output, force=args.force))
    return 0


def cmd_serve(args) -> int:
    from server.serve import serve

    return serve(args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """This CLI's arguments; for `serve`, the rest go to vLLM's engine (`engine_overrides`)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "serve":
        from decoding.vllm_config import parse_engine_overrides

        args.engine_overrides = parse_engine_overrides(rest)
    else:
        args.engine_overrides = {}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(getattr(args, "log_level", "info")).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One INFO line per HTTP request drowns the reports of `bench` and `train`.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
