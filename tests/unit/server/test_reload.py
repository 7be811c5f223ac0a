"""Hot reload of reward models and profiles: what changed loads and swaps in at once, requests
already running keep their versions, a bad file changes nothing."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from aligner.profiles import DEFAULT_PROFILES, ProfileStore
from aligner.rewards import RewardRegistry
from server.reload import Reloader, ReloadError, ReloadSources, guide_versions

PROMPT = [{"role": "user", "content": "Say something kind."}]


def build(spec: str):
    return RewardRegistry.build_from_spec(spec)


@pytest.fixture
def setup(tiny_reward_dir, tmp_path):
    """A registry with the built-ins, a checkpoint reward and a rule; specs the test edits."""
    checkpoint = shutil.copytree(tiny_reward_dir, tmp_path / "rm")
    specs = [f"rm={checkpoint}", "bang=regex:!"]
    registry = RewardRegistry.with_builtins()
    for spec in specs:
        registry.add_from_spec(spec)
    applied = []
    profiles_path = tmp_path / "profiles.yaml"
    profiles_path.write_text(Path(DEFAULT_PROFILES).read_text())
    sources = ReloadSources(reward_specs=lambda: list(specs), build_reward=build,
                            load_profiles=lambda: ProfileStore.load(profiles_path))
    reloader = Reloader(registry, sources, apply_profiles=applied.append)
    return reloader, registry, specs, checkpoint, applied, profiles_path


def rewrite(checkpoint: Path) -> None:
    """A retrained model written over the old one: new bytes, new modification time."""
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes())
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))


def test_nothing_changed_nothing_loaded(setup):
    reloader, registry, _, _, applied, _ = setup
    before = dict(registry.rewards)
    report = asyncio.run(reloader.reload())
    assert report["rewards"]["loaded"] == [] and sorted(report["rewards"]["unchanged"]) == ["bang", "rm"]
    assert all(registry.rewards[n] is r for n, r in before.items())
    assert report["rewards"]["versions"]["rm"] == before["rm"].version and len(applied) == 1


def test_a_changed_checkpoint_swaps_in_while_a_running_request_keeps_the_old_version(setup):
    reloader, registry, _, checkpoint, _, _ = setup
    running = registry.snapshot()  # a request that started before the reload
    old = registry.rewards["rm"]
    rewrite(checkpoint)
    report = asyncio.run(reloader.reload())
    new = registry.rewards["rm"]
    assert new is not old and new.version != old.version
    assert report["rewards"]["loaded"] == [{"name": "rm", "version": new.version}]
    assert running.get("rm") is old and running.versions(["rm", "bang"]) == {"rm": old.version}
    assert registry.versions(["rm"]) == {"rm": new.version}
    scores = asyncio.run(running.score({"rm": 1.0}, PROMPT, ["Thank you!"]))
    assert len(scores.total) == 1  # the old model still scores for the request that holds it


def test_a_broken_checkpoint_leaves_everything_serving(setup):
    reloader, registry, _, checkpoint, applied, _ = setup
    before = dict(registry.rewards)
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(ReloadError, match="reward 'rm'"):
        asyncio.run(reloader.reload())
    assert registry.rewards == before and applied == []


def test_a_bad_profiles_file_leaves_the_rewards_too(setup):
    reloader, registry, specs, _, applied, profiles_path = setup
    before = dict(registry.rewards)
    specs.append("newrule=regex:\\?")
    profiles_path.write_text("profiles: [")
    with pytest.raises(ReloadError, match="profiles: .*not valid YAML"):
        asyncio.run(reloader.reload())
    assert registry.rewards == before and applied == []


def test_added_and_removed_rewards_and_the_default_follows(setup):
    reloader, registry, specs, _, _, _ = setup
    assert registry.default == "rm"
    specs[:] = ["bang=regex:!", "question=regex:\\?"]
    report = asyncio.run(reloader.reload())
    assert report["rewards"]["removed"] == ["rm"] and report["rewards"]["loaded"] == [
        {"name": "question", "version": None}]
    assert registry.get("rm") is None and registry.get("question") is not None
    assert registry.default is None and report["rewards"]["default"] is None
    assert registry.get("refusal") is not None  # built-in rules stay


def test_changed_guides_are_reported_as_needing_a_restart(setup, tmp_path):
    reloader, _, _, checkpoint, _, _ = setup
    specs = [f"g={checkpoint}"]
    reloader.sources.guide_specs = lambda: specs
    reloader.guides_at_start = guide_versions(specs)
    assert asyncio.run(reloader.reload())["restart_required"] == []
    rewrite(checkpoint)
    assert "guide g" in asyncio.run(reloader.reload())["restart_required"]


def test_the_reload_endpoint_swaps_and_answers_name_the_reward_version(setup):
    from fastapi.testclient import TestClient

    from server.app import build_app
    from server.config import ServerConfig
    from tests.fakes import FakeEngine

    _, registry, specs, checkpoint, _, profiles_path = setup
    sources = ReloadSources(reward_specs=lambda: list(specs), build_reward=build,
                            load_profiles=lambda: ProfileStore.load(profiles_path))
    app = build_app(FakeEngine(), ServerConfig(served_model_name="fake-model"), registry, start_engine=False,
                    reload_sources=sources)
    body = {"model": "fake-model", "messages": PROMPT, "max_tokens": 4,
            "alignment": {"strategy": "best_of_n", "n": 2, "reward": "rm"}}
    with TestClient(app) as client:
        first = client.post("/v1/chat/completions", json=body).json()["alignment"]["reward_versions"]
        assert first == {"rm": registry.rewards["rm"].version}
        rewrite(checkpoint)
        reply = client.post("/v1/alignment/reload")
        assert reply.status_code == 200 and reply.json()["rewards"]["loaded"][0]["name"] == "rm"
        second = client.post("/v1/chat/completions", json=body).json()["alignment"]["reward_versions"]
        assert second["rm"] != first["rm"] and second["rm"] == registry.rewards["rm"].version
        listed = client.get("/v1/alignment/profiles").json()
        assert listed["source"] == profiles_path.name  # its name, not where the server keeps it
        profiles_path.write_text("profiles: [")
        failed = client.post("/v1/alignment/reload")
        assert failed.status_code == 422 and failed.json()["error"]["code"] == "reload_failed"
        message = failed.json()["error"]["message"]  # which part, not where or the parser's text
        assert "profiles file is not valid" in message and str(profiles_path.parent) not in message
        assert "YAML" not in message and "line" not in message
        assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_without_sources_there_is_nothing_to_reload():
    from fastapi.testclient import TestClient

    from server.app import build_app
    from server.config import ServerConfig
    from tests.fakes import FakeEngine

    app = build_app(FakeEngine(), ServerConfig(served_model_name="fake-model"), start_engine=False)
    with TestClient(app) as client:
        assert client.post("/v1/alignment/reload").status_code == 404


def test_routers_reload_from_the_models_directory_and_a_bad_one_changes_nothing(setup, tmp_path):
    from aligner.bandit import ROUTER_META_FILE, fit, load_routers

    reloader, registry, specs, _, applied, _ = setup
    models = tmp_path / "models"
    swapped = []
    reloader.sources.load_routers = lambda: load_routers(models)
    reloader.apply_routers = swapped.append
    fit([], ["a@1", "b@1"], name="picker").save(models / "picker")
    report = asyncio.run(reloader.reload())
    assert list(report["routers"]) == ["picker"] and swapped[-1]["picker"].version == report["routers"]["picker"]
    before = dict(registry.rewards)
    specs.append("newrule=regex:\\?")
    (models / "picker" / ROUTER_META_FILE).write_text("{")
    with pytest.raises(ReloadError, match="routers: "):
        asyncio.run(reloader.reload())
    assert registry.rewards == before and len(swapped) == 1 and len(applied) == 1
    fit([], ["a@1", "b@1"], name="picker").save(models / "picker")
    (models / "picker" / "router.npz").write_bytes(b"PK not a zip")  # a truncated weights file
    with pytest.raises(ReloadError, match="routers: ") as caught:
        asyncio.run(reloader.reload())
    assert caught.value.public == "a router could not be loaded" and len(swapped) == 1
