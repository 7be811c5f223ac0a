"""`aligner serve`: build the engines, rewards, guides and profiles the flags name, then the app."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from aligner.bandit import load_routers
from aligner.profiles import DEFAULT_PROFILES, ProfileError
from aligner.rewards import RewardRegistry
from aligner.strategies import get_strategy
from decoding.guide_spec import GuideCatalog, vocabulary_mismatch
from decoding.model_prep import DEFAULT_MODEL_NAME, prepare_default_model
from decoding.model_refs import discover
from server.admission import AdmissionConfig
from server.api_keys import APIKeyFileError, read_key_file
from server.config import ServerConfig, StoreConfig
from server.reload import ReloadSources, guide_versions

GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default: the whole server's share of the device
HELPER_GPU_SHARE = 0.1  # of that total, per helper model (at most half of it for all helpers)


def memory_shares(total: float | None, helpers: int) -> tuple[float, float]:
    """(policy, each helper) fractions of device memory that add up to `total`
    (`--gpu-memory-utilization`, default 0.9): vLLM gives each engine its own fraction.

    >>> memory_shares(None, 2)
    (0.72, 0.09)
    >>> memory_shares(0.5, 0)
    (0.5, 0.0)
    """
    total = GPU_MEMORY_UTILIZATION if total is None else total
    helper = round(total * min(HELPER_GPU_SHARE, 0.5 / helpers), 4) if helpers else 0.0
    return round(total - helper * helpers, 4), helper


def named_path(spec: str, flag: str) -> tuple[str, str]:
    """`NAME=PATH` -> (NAME, PATH), or exit with a message naming `flag`."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"aligner: {flag} expects NAME=PATH, got {spec!r}")
    return name, path


def side_engines(args) -> int:
    """vLLM engines beside the policy's: helper models and reward models served in process."""
    return len(args.helper_model) + sum("=vllm:" in spec for spec in args.reward_model)


def served_reward(args):
    """The factory of rewards served by vLLM (`NAME=vllm:PATH`, `NAME=[PATH@]http://HOST:PORT`)."""

    def build(name: str, backend: str, checkpoint: str | None, url: str | None):
        from aligner.rewards.encoding import read_reward_meta
        from aligner.rewards.served import EngineBackend, RemoteBackend, ServedReward
        from decoding.pooling_engine import PoolingEngineConfig, VLLMPoolingEngine, check_pooling_checkpoint

        if checkpoint is not None and (why := check_pooling_checkpoint(checkpoint)):
            raise SystemExit(f"aligner: --reward-model {name}: {why}")
        if backend == "remote":
            return ServedReward(name, RemoteBackend(url, timeout_s=args.reward_timeout_s), checkpoint=checkpoint,
                                max_length=args.reward_max_length)
        path = Path(checkpoint).resolve()
        limit = json.loads((path / "config.json").read_text()).get("max_position_embeddings") or args.reward_max_length
        length = min(int(read_reward_meta(path).get("max_length") or args.reward_max_length), limit)
        engine = VLLMPoolingEngine(PoolingEngineConfig(
            model=str(path), name=f"reward-{name}", max_model_len=length,
            dtype="auto" if args.reward_dtype == "auto" else args.reward_dtype,
            gpu_memory_utilization=memory_shares(args.gpu_memory_utilization, side_engines(args))[1]))
        return ServedReward(name, EngineBackend(engine), checkpoint=path, max_length=length)

    return build


def reward_builder(args):
    """spec -> the reward it names, built with the flags' settings (at start and on reload)."""
    from decoding.vllm_config import detect_device

    device = detect_device() if args.reward_device == "auto" else args.reward_device

    def build(spec: str):
        return RewardRegistry.build_from_spec(
            spec, served=served_reward(args), max_length=args.reward_max_length,
            max_batch_size=args.reward_batch_size, dtype=args.reward_dtype, device=device)

    return build


def reload_sources(args, load_profiles) -> ReloadSources:
    """What `POST /v1/alignment/reload` and SIGHUP re-read: the models directory, the flags'
    reward models and guides (as given at start), the profiles file."""
    flag_rewards, flag_guides = list(args.flag_reward_model), list(args.flag_guide)

    def found(index: int) -> list[str]:
        return discover(args.models_dir)[index] if args.models_dir is not None else []

    return ReloadSources(
        reward_specs=lambda: found(0) + flag_rewards, build_reward=reward_builder(args),
        guide_specs=lambda: found(1) + flag_guides,
        load_profiles=lambda: load_profiles(args.profiles or DEFAULT_PROFILES), default_reward=args.default_reward,
        load_routers=lambda: load_routers(args.models_dir))


def build_rewards(args) -> RewardRegistry:
    rewards = RewardRegistry.with_builtins()
    rewards.timeout_s = args.reward_timeout_s
    rewards.max_pending_per_reward = args.reward_max_pending
    build = reward_builder(args)
    for spec in args.reward_model:
        try:
            reward = build(spec)
            rewards.add(reward)
        except ValueError as exc:
            raise SystemExit(f"aligner: {exc}") from None
        print(f"aligner: reward {reward.name!r} ({reward.kind}) registered", file=sys.stderr)
    if args.default_reward is not None:
        if rewards.get(args.default_reward) is None:
            raise SystemExit(f"aligner: unknown --default-reward {args.default_reward!r}")
        rewards.default = args.default_reward
    return rewards


def build_guides(args, policy: str) -> GuideCatalog:
    """The guides the flags name; one that cannot steer `policy` stops the server here, before
    an engine is built, rather than failing in the engine at the first guided step."""
    paths = dict(named_path(spec, "--guide") for spec in args.guide)
    catalog = GuideCatalog.from_paths(paths, args.guide_max_slots, args.guide_max_len or args.max_model_len)
    for name, spec in catalog.specs.items():
        if why := vocabulary_mismatch(policy, spec["path"], spec["mode"]):
            catalog.close()
            raise SystemExit(f"aligner: --guide {name}: {why}")
    return catalog


def build_helpers(args) -> dict:
    """name -> VLLMEngine for every `--helper-model NAME=PATH` (not started yet)."""
    from decoding.vllm_config import VLLMEngineConfig
    from decoding.vllm_engine import VLLMEngine

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
            enforce_eager=args.enforce_eager,
            gpu_memory_utilization=memory_shares(args.gpu_memory_utilization, side_engines(args))[1],
            self_check=args.self_check,
        ))
    return helpers


def build_policy(args, model: str, name: str, guides: GuideCatalog, helpers: int):
    from decoding.vllm_config import VLLMEngineConfig, detect_device
    from decoding.vllm_engine import VLLMEngine

    if args.guide_quantization and detect_device() != "cpu":
        raise SystemExit("aligner: --guide-quantization int8 runs on vLLM's CPU kernels only; drop it on a GPU")
    return VLLMEngine(VLLMEngineConfig(
        model=model, served_model_name=name, max_model_len=args.max_model_len, dtype=args.dtype,
        kv_cache_gib=args.kv_cache_gib, max_num_seqs=args.max_num_seqs, enforce_eager=args.enforce_eager,
        guides=guides, guide_dtype=args.guide_dtype, guide_quantization=args.guide_quantization,
        gpu_memory_utilization=memory_shares(args.gpu_memory_utilization, helpers)[0],
        self_check=args.self_check, engine_overrides=getattr(args, "engine_overrides", {}),
    ))


def server_config(args, name: str) -> ServerConfig:
    from decoding.vllm_config import detect_device

    if get_strategy(args.default_strategy) is None:
        raise SystemExit(f"aligner: unknown --default-strategy {args.default_strategy!r}")
    if args.api_key_file is not None:
        try:  # checked before the engines are built: a bad file is one line, not a traceback
            read_key_file(args.api_key_file)
        except APIKeyFileError as exc:
            raise SystemExit(f"aligner: --api-key-file: {exc}") from None
    return ServerConfig(
        served_model_name=name,
        api_key=args.api_key or None,
        api_key_file=args.api_key_file,
        metrics_key=args.metrics_key or None,
        max_n=args.max_n,
        default_strategy=args.default_strategy,
        max_candidates=args.max_candidates,
        max_request_seconds=args.max_request_seconds,
        max_request_tokens=args.max_request_tokens,
        stream_keepalive_s=args.stream_keepalive_s,
        max_body_bytes=args.max_body_bytes,
        max_engine_restarts=args.max_engine_restarts,
        start_engines_in_turn=detect_device() != "cpu",
        store=store_config(args),
        admission=AdmissionConfig(
            max_running_requests=args.max_running_requests,
            max_running_sequences=args.max_running_sequences,
            max_queued_requests=args.max_queued_requests,
            max_queue_wait_s=args.max_queue_wait_s,
        ),
    )


def store_config(args) -> StoreConfig:
    if args.store_max_pending < 1:
        raise SystemExit("aligner: --store-max-pending must be at least 1")
    return StoreConfig(traces=args.store_traces, allow_request_traces=args.allow_request_traces,
                       retention_days=args.store_retention_days, max_pending=args.store_max_pending)


def wants_store(args) -> bool:
    """A store is opened only for a feature that needs one, so that a plain `aligner serve`
    writes nothing under $ALIGNER_HOME."""
    return args.store is not None or args.store_traces or args.allow_request_traces


def open_store(args):
    """The store the flags name (created or migrated now), or None; a store that cannot be
    opened stops the server here with one line, before any engine is built."""
    if not wants_store(args):
        return None
    from aligner.store import Store

    try:
        store = Store.open(args.store)
    except Exception as exc:  # noqa: BLE001 - a bad URL, an unreachable server, a newer schema
        where = args.store or "the default SQLite store under $ALIGNER_HOME"
        reason = (str(exc).splitlines() or [""])[0]
        raise SystemExit(f"aligner: --store: cannot open {where}: {type(exc).__name__}: {reason}") from None
    traces = ("every answer" if args.store_traces else
              "answers that ask (alignment.trace)" if args.allow_request_traces else "none from this replica")
    kept = f"{args.store_retention_days:g} days" if args.store_retention_days else "forever"
    print(f"aligner: store {store.url} (traces: {traces}; kept {kept})", file=sys.stderr)
    return store


def store_warning(args, config: ServerConfig) -> str | None:
    """Traces kept by a server without an API key cannot be read or deleted over HTTP."""
    if wants_store(args) and not (config.api_key or config.api_key_file):
        return ("aligner: WARNING: the store's traces can be read and deleted over HTTP only with an API key; "
                "set --api-key, --api-key-file or ALIGNER_API_KEY")
    return None


def build_tool_parser(args, model: str):
    if args.tool_call_parser is None:
        return None
    from decoding.tool_parsing import ToolCallParser

    try:
        return ToolCallParser(args.tool_call_parser, model)
    except ValueError as exc:
        raise SystemExit(f"aligner: --tool-call-parser: {exc}") from None


def exposure_warning(host: str, api_key: str | None, api_key_file: str | None = None) -> str | None:
    """What to warn of when the server listens beyond this machine with no API key (a key
    file counts as a key)."""
    if api_key or api_key_file or host in ("localhost", "::1") or host.startswith("127."):
        return None
    return (f"aligner: WARNING: listening on {host} without an API key: anyone who can reach this address can "
            "use the model; set --api-key, --api-key-file or ALIGNER_API_KEY")


def serve(args) -> int:
    import uvicorn

    from server.app import build_app, load_profiles

    args.flag_reward_model, args.flag_guide = list(args.reward_model), list(args.guide)  # what a reload re-reads
    if args.models_dir is not None:
        found_rewards, found_guides = discover(args.models_dir)
        args.reward_model = found_rewards + args.reward_model
        args.guide = found_guides + args.guide
    if args.model is None:
        model, name = str(prepare_default_model()), args.served_model_name or DEFAULT_MODEL_NAME
    else:
        model, name = args.model, args.served_model_name or Path(args.model.rstrip("/")).name
    guides = build_guides(args, model)
    config = server_config(args, name)
    try:
        profiles = load_profiles(args.profiles or DEFAULT_PROFILES)
    except ProfileError as exc:
        raise SystemExit(f"aligner: bad --profiles file: {exc}") from None
    try:
        routers = load_routers(args.models_dir)
    except Exception as exc:  # noqa: BLE001 - any bad router file stops the start with its reason
        raise SystemExit(f"aligner: a router in --models-dir could not be loaded: {type(exc).__name__}: {exc}") from None
    store = open_store(args)
    try:
        helpers = build_helpers(args)
        engine = build_policy(args, model, name, guides, side_engines(args))
        app = build_app(engine, config, build_rewards(args), profiles, guides, helpers,
                        tool_parser=build_tool_parser(args, model), store=store, routers=routers,
                        reload_sources=reload_sources(args, load_profiles), guides_at_start=guide_versions(args.guide))
        print(f"aligner: serving {name} on http://{args.host}:{args.port}/v1", file=sys.stderr)
        for warning in (exposure_warning(args.host, config.api_key, config.api_key_file),
                        store_warning(args, config)):
            if warning:
                print(warning, file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        guides.close()
        if store is not None:
            store.close()
    return 0
