"""Shared fixtures. The real server (vLLM on CPU, default model) starts once per session.

Where a test goes: `tests/unit/<layer>/` for a test of one layer (kernels, decoding, aligner,
server, bench), fakes allowed (`tests/fakes.py`), seconds per file; `tests/integration/` for a
test through the real server. Everything under `tests/integration/` carries the `integration`
mark, and a unit test that asks for the real server is refused at collection.
"""

from __future__ import annotations

import os

import torch

# Triton kernels run in Triton's interpreter on machines without a GPU; it must be set before
# `kernels` is imported (the decorator reads it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path

import httpx  # noqa: E402
import pytest  # noqa: E402

from bench.launch import REPO, RunningServer, start_server, stop_server

MODEL = "SmolLM2-135M-Instruct"
__all__ = ["MODEL", "RunningServer", "start_server", "stop_server"]
INTEGRATION = Path(__file__).parent / "integration"
REAL_SERVER_FIXTURES = {"server", "client", "store_server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)
        elif REAL_SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            raise pytest.UsageError(f"{item.nodeid} uses the real server: move it to tests/integration/")
    skip_gpu_tests_without_a_gpu(items)  # one hook: a second definition would replace this one


def has_package(name: str) -> bool:
    """Whether the distribution `name` is installed (e.g. the packaged MiniLM encoder)."""
    from importlib import metadata

    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def build_tiny_reward_model(target: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama reward model on the policy's tokenizer: scores
    are arbitrary but fixed, which is all the mechanics tests need."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from decoding.model_prep import prepare_default_model

    tokenizer = AutoTokenizer.from_pretrained(prepare_default_model())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        num_labels=1, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # spread the scores so that candidates rarely tie
        model.score.weight.mul_(50.0)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("tiny-rm") / "tiny")


GUIDE_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
GENARM_TARGET = " banana"


def _one_token(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def build_preference_guide(target: Path, kind: str, token_id: int, hidden: int = 32, heads: int = 4) -> Path:
    """A 1-layer guide whose preference is known by construction: its layers add nothing, so
    the last hidden state is the normalised embedding of the current token.

    - genarm (causal LM): every embedding is the same vector u and the LM head is zero except
      the row of `token_id` (along u), so the guide always predicts `token_id`.
    - args (reward model): the embedding of `token_id` is u, every other one -u, and the
      score head reads along u, so prefix + `token_id` gets +10 and any other token -10.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from decoding.model_prep import prepare_default_model

    tokenizer = AutoTokenizer.from_pretrained(prepare_default_model())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=4096,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                         num_labels=1)
    model = (LlamaForCausalLM if kind == "genarm" else LlamaForSequenceClassification)(config)
    u = torch.ones(hidden) / hidden**0.5
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        if kind == "genarm":
            emb.copy_(u.expand_as(emb))
            model.lm_head.weight.zero_()
            model.lm_head.weight[token_id] = 20.0 * u
        else:
            emb.copy_(-u.expand_as(emb))
            emb[token_id] = u
            model.score.weight.copy_(10.0 * u[None] / hidden**0.5)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def guide_targets() -> dict:
    """Token ids the test guides prefer: for genarm an arbitrary word, for args the policy's
    third most likely first token (inside its top-k, but not its greedy choice: the top two are
    0.1 nats apart in float32, so either may be an engine's greedy choice in bf16)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from decoding.model_prep import prepare_default_model

    path = prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ids = tokenizer.apply_chat_template(GUIDE_PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        top = torch.topk(policy(**ids).logits[0, -1], 3).indices.tolist()
    return {"genarm": _one_token(tokenizer, GENARM_TARGET), "args": top[2], "greedy": top[0]}


@pytest.fixture(scope="session")
def guide_dirs(tmp_path_factory, guide_targets) -> dict:
    root = tmp_path_factory.mktemp("guides")
    return {kind: build_preference_guide(root / kind, kind, guide_targets[kind]) for kind in ("genarm", "args")}


def start_guide_server(tmp_path_factory, guide_dirs: dict, name: str, *extra: str, env: dict | None = None) -> RunningServer:
    """A server with only the two test guides: the guided integration tests rerun under other
    settings (`extra` arguments, `env`)."""
    return start_server(
        tmp_path_factory.mktemp(name),
        "--max-model-len", "1024",
        "--guide", f"prefers-banana={guide_dirs['genarm']}",
        "--guide", f"prefers-second={guide_dirs['args']}",
        *extra,
        env=env,
    )


@pytest.fixture(scope="session")
def banana_lm_dir(tmp_path_factory, guide_targets) -> Path:
    """A causal LM that says " banana" forever, shaped so that vLLM serves it (64-wide heads):
    the helper model the rewrite and correct strategies can be pointed at."""
    return build_preference_guide(tmp_path_factory.mktemp("banana-lm") / "banana-lm", "genarm",
                                  guide_targets["genarm"], hidden=128, heads=2)


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_reward_dir, guide_dirs, banana_lm_dir) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("server"),
        "--max-model-len", "2048",
        "--models-dir", str(REPO / "models"),  # the shipped starter models, as `make serve` has them
        "--reward-model", f"tiny={tiny_reward_dir}",
        "--reward-model", "exclaim=regex:!",
        "--reward-model", "banana=regex:banana",
        "--stream-keepalive-s", "0.1",
        "--guide", f"prefers-banana={guide_dirs['genarm']}",
        "--guide", f"prefers-second={guide_dirs['args']}",
        "--guide-max-slots", "4",
        "--helper-model", f"banana-lm={banana_lm_dir}",
        "--tool-call-parser", "hermes",
    )
    yield running
    stop_server(running)


# The keyed server with a store, shared by the auth, experiments, preference-loop, store and UI
# tests (one engine start instead of five). Every test there works on its own users, experiment and answers, and
# counts what it adds, not what the server holds.
STORE_SERVER_KEY = "store-server-key"
ROTATED_KEY = "file-key-alpha"  # the key file's first key, which the auth test rotates away
# Two cheap arms (two 8-token candidates each), scored by different rules; weights 1:3.
EXPERIMENT_PROFILES = """\
profiles:
  tone:
    - version: 1
      alignment: {strategy: best_of_n, n: 2, reward: {length_penalty: 1.0}}
    - version: 2
      alignment: {strategy: best_of_n, n: 2, reward: {exclaim: 1.0}}
experiments:
  tone-test:
    unit: user
    arms:
      - {profile: tone@1, weight: 1}
      - {profile: tone@2, weight: 3}
  route-test:
    unit: router
    router: route-test-router
    explore: 0.1
    arms:
      - {profile: tone@1}
      - {profile: tone@2}
"""


@pytest.fixture(scope="session")
def store_server(tmp_path_factory) -> Iterator[RunningServer]:
    """Every answer traced into SQLite (`.db_path`, `.store_url`), the experiments `tone-test` and
    `route-test` (a learned router's, `tests/integration/test_router_integration.py`),
    a fixed key (`--api-key`), a key file (`.key_file`, holding `ROTATED_KEY`) and an empty
    models directory (`.root / "models"`)."""
    root = tmp_path_factory.mktemp("store-server")
    (root / "models").mkdir()  # empty: the preference loop trains its reward model into it
    (root / "profiles.yaml").write_text(EXPERIMENT_PROFILES)
    (root / "keys").write_text(f"# rotated by the test\n{ROTATED_KEY}\n\n")
    db_path = root / "store.db"
    running = start_server(root, "--max-model-len", "1024", "--reward-model", "exclaim=regex:!",
                           "--reward-model", "bang=regex:!", "--models-dir", str(root / "models"),
                           "--store", f"sqlite:///{db_path}", "--store-traces",
                           "--profiles", str(root / "profiles.yaml"), "--api-key-file", str(root / "keys"),
                           api_key=STORE_SERVER_KEY)
    running.db_path, running.store_url, running.key_file = db_path, f"sqlite:///{db_path}", root / "keys"
    running.root = root
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from decoding.model_prep import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


def engine_unfinished(server: RunningServer) -> float:
    """The engine's own count of unfinished requests, read from /metrics."""
    text = httpx.get(f"{server.base_url}/metrics", headers=server.headers(), timeout=10).text
    for line in text.splitlines():
        if line.startswith("aligner_engine_unfinished_requests "):
            return float(line.split()[1])
    raise AssertionError("aligner_engine_unfinished_requests missing from /metrics")


def skip_gpu_tests_without_a_gpu(items) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
