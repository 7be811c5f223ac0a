"""Profiles file: versions, resolution, and errors that name the line."""

from __future__ import annotations

import pytest

from aligner.profiles import DEFAULT_PROFILES, ProfileError, ProfileStore
from server.alignment import check_profile_alignment


def load(tmp_path, text: str) -> ProfileStore:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return ProfileStore.load(path, check_profile_alignment)


def test_shipped_profiles_load_and_resolve_latest_and_pinned():
    store = ProfileStore.load(DEFAULT_PROFILES, check_profile_alignment)
    assert {"helpful", "harmless", "concise"} <= set(store.profiles)
    assert store.resolve("helpful").version == max(store.profiles["helpful"])
    assert store.resolve("helpful@1").alignment == {"strategy": "best_of_n", "n": 4}
    assert "concise" in store.templates


@pytest.mark.parametrize("reference", ["nope", "helpful@9", "helpful@x", "helpful@"])
def test_unknown_references_raise_with_a_message(reference):
    store = ProfileStore.load(DEFAULT_PROFILES, check_profile_alignment)
    if reference == "helpful@":
        assert store.resolve(reference).version == 2  # empty version means latest
        return
    with pytest.raises(KeyError):
        store.resolve(reference)


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("profiles:\n  a:\n    - version: 1\n      alignment: {strategy: warp}\n", 3, "unknown strategy"),
        ("profiles:\n  a:\n    - version: 1\n      alignment: {strategy: none}\n    - version: 1\n      alignment: {}\n", 5, "repeats version 1"),
        ("profiles:\n  a:\n    - {version: 0, alignment: {}}\n", 3, "version"),
        ("profiles:\n  a:\n    - version: 1\n      alignment:\n        pipeline: [{strategy: self_refine}, {strategy: none}]\n", 3, "comes after"),
        ("profiles:\n  a:\n    - version: 1\n      alignment: {strategy: urial, template: nope}\n", 3, "unknown template"),
        ("profiles:\n  a: [\n", 3, "not valid YAML"),
        ("templates:\n  t: {examples: []}\nprofiles: {}\n", 2, "system"),
        ("profiles:\n  a:\n    - version: 1\n      alignment: {profile: b}\n", 3, "cannot name another profile"),
    ],
)
def test_malformed_files_name_the_line(tmp_path, text, line, fragment):
    with pytest.raises(ProfileError) as info:
        load(tmp_path, text)
    assert f"p.yaml:{line}:" in str(info.value) and fragment in str(info.value)
