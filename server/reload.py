"""Hot reload (`POST /v1/alignment/reload`, SIGHUP): re-read the models directory (reward
models and learned routers), the `--reward-model` list and the profiles file without a restart.

New or changed reward models (a checkpoint whose files changed: `checkpoint_version`) load off the
event loop while the old ones keep serving; then the registry and the profiles swap in at once.
Requests already running keep the reward versions and profiles they started with (each takes a
`RewardRegistry.snapshot()`); answers name the reward versions they were scored with. Anything
that fails to load or parse leaves everything as it was and is returned as the error.

What a reload does not swap, and reports as `restart_required`: token-level guides (their weights
live in the engine process, loaded when vLLM builds its logits processors) and rewards served by
vLLM (`vllm:` engines, remote servers' layouts), whose engines or clients belong to the server's
lifecycle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aligner.profiles import ProfileError, ProfileStore
from aligner.rewards import RewardRegistry
from aligner.rewards.base import Reward, checkpoint_version

logger = logging.getLogger(__name__)


class ReloadError(RuntimeError):
    """A reload found a bad file; nothing was swapped. `str()` is the detail, for the log
    (file paths, lines, an exception's text); `public` says which part, for the answer."""

    def __init__(self, detail: str, public: str):
        super().__init__(detail)
        self.public = public


@dataclass
class ReloadSources:
    """Where a reload reads from: the specs the flags and the models directory name now."""

    reward_specs: Callable[[], list[str]]
    build_reward: Callable[[str], Reward]
    guide_specs: Callable[[], list[str]] = list
    load_profiles: Callable[[], ProfileStore] | None = None
    default_reward: str | None = None
    load_routers: Callable[[], dict[str, Any]] | None = None  # the models directory's learned routers


@dataclass
class Reloader:
    rewards: RewardRegistry
    sources: ReloadSources
    apply_profiles: Callable[[ProfileStore], None]
    guides_at_start: dict[str, str] = field(default_factory=dict)  # name -> version
    apply_routers: Callable[[dict[str, Any]], None] = lambda routers: None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    async def reload(self) -> dict[str, Any]:
        """Reload what changed; the report of what did. Raises ReloadError, having changed nothing."""
        async with self._lock:  # one reload at a time: a second waits and then sees the first's result
            return await asyncio.to_thread(self._reload)

    def _reload(self) -> dict[str, Any]:
        try:
            specs = self.sources.reward_specs()
            guides = self.sources.guide_specs()
        except (OSError, ValueError) as exc:
            raise ReloadError(f"models directory: {exc}", "the models directory could not be read") from exc
        names = [spec.partition("=")[0] for spec in specs]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ReloadError(f"reward {dup[0]!r} is registered twice", f"reward {dup[0]!r} is registered twice")
        profiles = None
        if self.sources.load_profiles is not None:
            try:
                profiles = self.sources.load_profiles()
            except ProfileError as exc:
                raise ReloadError(f"profiles: {exc}", "the profiles file is not valid") from exc
        routers = None
        if self.sources.load_routers is not None:
            try:
                routers = self.sources.load_routers()
            except Exception as exc:  # noqa: BLE001 - any bad router file: keep everything as it was
                raise ReloadError(f"routers: {type(exc).__name__}: {exc}", "a router could not be loaded") from exc

        current = self.rewards.rewards
        kept = {n: r for n, r in current.items() if r.spec is None}  # built-in rules
        loaded, unchanged, restart_required = [], [], []
        for spec in specs:
            name = spec.partition("=")[0]
            old = current.get(name)
            if old is not None and old.served:
                kept[name] = old  # served by vLLM: its engine or client lives with the server
                if old.spec != spec or _changed(old):
                    restart_required.append(f"reward {name}")
                else:
                    unchanged.append(name)
                continue
            if old is not None and old.spec == spec and not _changed(old):
                kept[name] = old
                unchanged.append(name)
                continue
            try:
                kept[name] = new = self.sources.build_reward(spec)
            except SystemExit as exc:  # the server's start-up checks exit; here they are an error
                raise ReloadError(str(exc).removeprefix("aligner: "), f"reward {name!r} could not be loaded") from None
            except Exception as exc:  # noqa: BLE001 - any bad checkpoint: keep the old registry
                raise ReloadError(f"reward {name!r}: {type(exc).__name__}: {exc}",
                                  f"reward {name!r} could not be loaded") from exc
            if new.served:
                kept.pop(name)  # a new served reward needs an engine or client started with the server
                restart_required.append(f"reward {name}")
                continue
            loaded.append({"name": name, "version": new.version})
        removed = sorted(n for n, r in current.items() if r.spec is not None and n not in kept)
        restart_required += [f"guide {g}" for g in self._changed_guides(guides)]

        default = self.rewards.default if self.rewards.default in kept else None
        if default is None and self.sources.default_reward in kept:
            default = self.sources.default_reward
        if default is None:
            default = next((n for n, r in kept.items() if r.kind == "model"), None)
        self.rewards.swap(kept, default)
        if profiles is not None:
            self.apply_profiles(profiles)
        if routers is not None:
            self.apply_routers(routers)
        report = {"rewards": {"loaded": loaded, "unchanged": unchanged, "removed": removed, "default": default,
                              "versions": {n: r.version for n, r in kept.items() if r.version}},
                  "profiles": sorted(profiles.profiles) if profiles is not None else None,
                  "routers": {n: r.version for n, r in sorted(routers.items())} if routers is not None else None,
                  "restart_required": restart_required}
        logger.info("reload: %s", report)
        return report

    def _changed_guides(self, specs: list[str]) -> list[str]:
        now = {}
        for spec in specs:
            name, _, path = spec.partition("=")
            now[name] = checkpoint_version(path) if Path(path).is_dir() else path
        return sorted(n for n in set(now) | set(self.guides_at_start) if now.get(n) != self.guides_at_start.get(n))


def guide_versions(specs: list[str]) -> dict[str, str]:
    """{name: version} of the guides a server started with (what a reload compares against)."""
    versions = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        versions[name] = checkpoint_version(path) if Path(path).is_dir() else path
    return versions


def _changed(reward: Reward) -> bool:
    """Whether a model's checkpoint files changed since it was loaded."""
    if reward.version is None or reward.checkpoint is None:
        return False
    try:
        return checkpoint_version(reward.checkpoint) != reward.version
    except OSError:
        return True
