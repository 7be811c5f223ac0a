"""`aligner serve --models-dir`: which trained models register as rewards and which as guides."""

from __future__ import annotations

import json

import pytest

from decoding.model_refs import discover


def _model(root, name, kind, model_type):
    base = root / f"{name}-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": model_type}))
    path = root / name
    path.mkdir()
    (path / "aligner_reward.json").write_text(json.dumps({"kind": kind}))
    (path / "aligner_base.json").write_text(json.dumps({"base": str(base)}))
    return path


def test_models_register_by_kind_and_backbone(tmp_path):
    arm = _model(tmp_path, "arm", "arm", "llama")
    causal = _model(tmp_path, "causal", "bt", "llama")
    encoder = _model(tmp_path, "encoder", "bt", "bert")
    (tmp_path / "notes").mkdir()  # no aligner_reward.json: not a model
    rewards, guides = discover(tmp_path)
    assert rewards == [f"causal={causal}", f"encoder={encoder}"]
    # the causal bt model also serves ARGS guidance; the encoder cannot run as a guide
    assert guides == [f"arm={arm}", f"causal={causal}"]


def test_an_unknown_kind_is_an_error(tmp_path):
    _model(tmp_path, "odd", "dpo", "llama")
    with pytest.raises(ValueError, match="unknown model kind 'dpo'"):
        discover(tmp_path)


def test_the_shipped_models_register(tmp_path):
    from bench.launch import REPO

    rewards, guides = discover(REPO / "models")
    assert "helpful-harmless" in {spec.split("=")[0] for spec in rewards}
    assert "helpful-harmless-arm" in {spec.split("=")[0] for spec in guides}
