"""Named, versioned alignment profiles loaded from a YAML file at start.

    templates:                       # optional in-context templates, usable by `urial`
      terse: {system: "...", examples: [["question", "answer"], ...]}
    profiles:
      harmless:
        - version: 1
          description: refuse harmful requests
          alignment: {strategy: best_of_n, n: 4, reward: {compliance: 0.0, refusal: 1.0}}
        - version: 2
          alignment: {pipeline: [{strategy: urial}, {strategy: best_of_n, n: 4}]}

    experiments:                     # optional A/B tests of profile versions (aligner.experiments)
      tone-test:
        unit: user                   # or random
        arms: [{profile: harmless@1, weight: 1}, {profile: harmless@2, weight: 1}]

Every profile names a `strategy` or a `pipeline`, each stage with its `strategy`. A request
names `{"profile": "harmless@2"}` (a bare name means the latest version); its own alignment
fields override the profile's. The file is checked completely at start, and an
error names the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aligner.experiments import Experiment, ExperimentError, check_experiment
from aligner.strategies.templates import InContextTemplate

DEFAULT_PROFILES = Path(__file__).with_name("default_profiles.yaml")
_LINE = "__line__"


class ProfileError(ValueError):
    pass


class ProfileVersion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)
    description: str = ""
    alignment: dict[str, Any]


class _LineLoader(yaml.SafeLoader):
    """Records the 1-based line of every mapping under the `__line__` key."""

    def construct_mapping(self, node, deep=False):
        mapping = super().construct_mapping(node, deep=deep)
        mapping[_LINE] = node.start_mark.line + 1
        return mapping


def _strip_lines(value):
    if isinstance(value, dict):
        return {k: _strip_lines(v) for k, v in value.items() if k != _LINE}
    if isinstance(value, list):
        return [_strip_lines(v) for v in value]
    return value


@dataclass
class ProfileStore:
    profiles: dict[str, dict[int, ProfileVersion]] = field(default_factory=dict)
    templates: dict[str, InContextTemplate] = field(default_factory=dict)
    experiments: dict[str, Experiment] = field(default_factory=dict)
    source: str | None = None

    @classmethod
    def load(cls, path: str | Path, validate_alignment=None) -> ProfileStore:
        """Parse and check the file. `validate_alignment(alignment, store) -> str | None` says
        why a profile's alignment object cannot run (`aligner.alignment.check_profile_alignment`
        runs a request's checks, less those that need a request)."""
        path = Path(path)
        try:
            raw = yaml.load(path.read_text(), Loader=_LineLoader) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ProfileError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
        except OSError as exc:
            raise ProfileError(f"{path}: cannot read: {exc}") from None
        if not isinstance(raw, dict):
            raise ProfileError(f"{path}:1: expected a mapping with 'profiles' (and optional 'templates', "
                               "'experiments')")
        unknown = set(raw) - {"profiles", "templates", "experiments", _LINE}
        if unknown:
            raise ProfileError(f"{path}:{raw.get(_LINE, 1)}: unknown top-level keys {sorted(unknown)}")
        store = cls(source=str(path))
        for name, body in (raw.get("templates") or {}).items():
            if name == _LINE:
                continue
            line = body.get(_LINE, raw[_LINE]) if isinstance(body, dict) else raw[_LINE]
            try:
                store.templates[name] = InContextTemplate.model_validate(_strip_lines(body))
            except ValidationError as exc:
                raise ProfileError(f"{path}:{line}: template {name!r}: {_first_error(exc)}") from None
        for name, versions in (raw.get("profiles") or {}).items():
            if name == _LINE:
                continue
            if "@" in name or not isinstance(versions, list) or not versions:
                raise ProfileError(f"{path}:{raw['profiles'][_LINE]}: profile {name!r} needs a list of versions and no '@' in its name")
            store.profiles[name] = {}
            for entry in versions:
                line = entry.get(_LINE, "?") if isinstance(entry, dict) else "?"
                try:
                    version = ProfileVersion.model_validate(_strip_lines(entry))
                except ValidationError as exc:
                    raise ProfileError(f"{path}:{line}: profile {name!r}: {_first_error(exc)}") from None
                if version.version in store.profiles[name]:
                    raise ProfileError(f"{path}:{line}: profile {name!r} repeats version {version.version}")
                if "profile" in version.alignment:
                    raise ProfileError(f"{path}:{line}: profile {name!r}: a profile cannot name another profile")
                if version.alignment.get("strategy") is None and not {"pipeline", "route"} & set(version.alignment):
                    # A profile is a complete recipe: it never falls back to a header, alias or default.
                    where = f"{path}:{line}: profile {name}@{version.version}"
                    raise ProfileError(f"{where}: name a 'strategy', a 'pipeline' or a 'route'")
                if validate_alignment is not None and (problem := validate_alignment(version.alignment, store)):
                    raise ProfileError(f"{path}:{line}: profile {name}@{version.version}: {problem}")
                store.profiles[name][version.version] = version
        store._load_experiments(raw, path)
        return store

    def _load_experiments(self, raw: dict, path: Path) -> None:
        """`experiments:`, after the profiles its arms name."""
        section = raw.get("experiments") or {}
        if not isinstance(section, dict):
            raise ProfileError(f"{path}:{raw[_LINE]}: 'experiments' must map names to experiments")
        for name, body in section.items():
            if name == _LINE:
                continue
            line = body.get(_LINE, section[_LINE]) if isinstance(body, dict) else section[_LINE]
            try:
                self.experiments[name] = check_experiment(name, _strip_lines(body), self.resolve)
            except ExperimentError as exc:
                arms = body.get("arms") if isinstance(body, dict) else None
                if exc.arm is not None and isinstance(arms, list) and isinstance(arms[exc.arm], dict):
                    line = arms[exc.arm].get(_LINE, line)
                raise ProfileError(f"{path}:{line}: experiment {name!r}: {exc}") from None

    def resolve(self, reference: str) -> ProfileVersion:
        """"name" (latest) or "name@version" -> the profile version; KeyError with a message."""
        name, _, version = reference.partition("@")
        versions = self.profiles.get(name)
        if not versions:
            raise KeyError(f"unknown profile {name!r}; available: {', '.join(sorted(self.profiles)) or 'none'}")
        if not version:
            return versions[max(versions)]
        if not version.isdigit() or int(version) not in versions:
            raise KeyError(f"profile {name!r} has no version {version!r}; versions: {sorted(versions)}")
        return versions[int(version)]

    def describe_experiments(self) -> list[dict[str, Any]]:
        return [experiment.public() for _, experiment in sorted(self.experiments.items())]

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "latest": max(versions),
                "versions": [v.model_dump() for _, v in sorted(versions.items())],
            }
            for name, versions in sorted(self.profiles.items())
        ]


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]
