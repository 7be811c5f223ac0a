"""The guides a server runs and how a request asks the engine for token-level guidance
(no torch, no vLLM: the server and the strategies import it).

One concept, `GuideCatalog`: which guides the engine was built with, in which mode, how long
a guided sequence may be, and how many guided sequences decode at once. The slot budget is
counted in one place, the server's admission controller, which holds a request until its
sequences have slots; the engine's slot pool (`guide_model.SlotDecoder`) is sized to the same
budget, so a guided request never finds the pool full.

The engine tells what it could not guide through small report files: the logits processor
runs in vLLM's engine process, where nothing flows back with the tokens but the tokens. The
engine (`decoding.vllm_engine`) reads a request's reports when it finishes and returns them
with its last chunk (`GenerationChunk.guide_reports`); strategies never see the files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_KEY = "aligner_guides"  # in vllm_config.additional_config
EXTRA_ARGS_KEY = "aligner_guide"  # in SamplingParams.extra_args
MODES = ("genarm", "args")
MAX_ALPHA = 20.0
MAX_K = 64
MAX_WEIGHT = 100.0
REPORT_KEY = "report"  # in the request's guide spec: the prefix of its report files


@dataclass
class GuideCatalog:
    """Guides the engine was built with: name -> {"path", "mode"}, plus the limits."""

    specs: dict[str, dict[str, str]] = field(default_factory=dict)
    max_slots: int = 16  # guided sequences decoded at once, server-wide
    max_len: int = 2048  # prompt + answer tokens of a guided sequence
    report_dir: str | None = None  # where the engine writes what it could not guide

    @property
    def modes(self) -> dict[str, str]:
        return {name: spec["mode"] for name, spec in self.specs.items()}

    @property
    def default(self) -> str | None:
        return next(iter(self.specs), None)

    @classmethod
    def from_paths(cls, paths: dict[str, str], max_slots: int, max_len: int) -> GuideCatalog:
        specs = {name: {"path": str(Path(p).resolve()), "mode": guide_mode(p)} for name, p in paths.items()}
        report_dir = tempfile.mkdtemp(prefix="aligner-guide-reports-") if specs else None
        return cls(specs, max_slots, max_len, report_dir)

    def close(self) -> None:
        """Remove the report folder (reports of requests cut off by a disconnect stay there)."""
        if self.report_dir is not None:
            shutil.rmtree(self.report_dir, ignore_errors=True)


class EngineExtras(Mapping):
    """vLLM's `additional_config` for the guides: a read-only mapping (the processors read it
    with `.get`) whose hash leaves out what differs between two starts of the same server.
    vLLM keys its compile cache on the config's hash and hashes a plain dict as JSON, so a fresh
    temporary `report_dir` in one would miss that cache on every start; for anything else it
    calls `compute_hash` (vLLM's SupportsHash)."""

    UNHASHED = ("report_dir",)

    def __init__(self, items: dict):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"EngineExtras({self._items!r})"

    def compute_hash(self) -> str:
        import hashlib

        stable = {k: ({kk: vv for kk, vv in v.items() if kk not in self.UNHASHED} if isinstance(v, dict) else v)
                  for k, v in self._items.items()}
        return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()


def write_guide_report(report_dir: str, key: str, report: dict) -> None:
    """One row's report (`{"guided_steps", "unguided_steps", "reason"}`), written atomically;
    a row rewrites its own file, rows of one request (n > 1) write files of their own."""
    path = Path(report_dir) / f"{key}.json"
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, path)


def guide_report_key(extra_args: dict[str, Any] | None) -> str | None:
    """The report key a guided request's sampling carries (None for an unguided request).

    >>> guide_report_key({EXTRA_ARGS_KEY: {"guide": "g", REPORT_KEY: "req-1-ab"}}), guide_report_key(None)
    ('req-1-ab', None)
    """
    spec = (extra_args or {}).get(EXTRA_ARGS_KEY)
    return spec.get(REPORT_KEY) if isinstance(spec, dict) else None


def read_guide_reports(report_dir: str | None, prefix: str) -> list[dict]:
    """The reports the engine wrote for a request's rows, removed once read."""
    if report_dir is None:
        return []
    reports = []
    for path in sorted(Path(report_dir).glob(f"{prefix}-*.json")):
        try:
            reports.append(json.loads(path.read_text()))
            path.unlink()
        except (OSError, ValueError):
            continue
    return reports


def guide_mode(path: str | Path) -> str:
    """"args" for a sequence-classification checkpoint (a reward head), else "genarm"."""
    path = Path(path)
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        return "args" if json.loads(adapter.read_text()).get("task_type") == "SEQ_CLS" else "genarm"
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} has neither config.json nor adapter_config.json")
    architectures = json.loads(config.read_text()).get("architectures") or []
    return "args" if any(a.endswith("ForSequenceClassification") for a in architectures) else "genarm"


def vocabulary_mismatch(policy: str | Path, guide: str | Path, mode: str) -> str | None:
    """Why `guide` cannot steer `policy` token by token, or None: the guide reads and scores the
    policy's token ids, so both need the same tokenizer, and GenARM adds the guide's logits to
    the policy's, so its vocabulary must be as large. What a folder does not hold (an adapter
    has no config.json, a checkpoint may lack tokenizer.json) is not held against it."""
    mine, theirs = _tokens(policy), _tokens(guide)
    if mine is not None and theirs is not None and mine != theirs:
        differ = sum(1 for token, i in theirs.items() if mine.get(token) != i) + len(mine.keys() - theirs.keys())
        return (f"its tokenizer is not the policy's ({differ} of {max(len(mine), len(theirs))} tokens differ); "
                "a guide must share the policy's vocabulary")
    size, guide_size = _vocab_size(policy), _vocab_size(guide)
    if mode == "genarm" and size is not None and guide_size is not None and size != guide_size:
        return (f"its vocabulary has {guide_size} entries, the policy's {size}; GenARM adds the guide's logits "
                "to the policy's, token by token")
    return None


def _tokens(path: str | Path) -> dict[str, int] | None:
    """token -> id of a fast tokenizer's vocabulary (added tokens included), or None."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        vocab = {piece: i for i, (piece, _) in enumerate(vocab)}
    if not isinstance(vocab, dict):
        return None
    return {**vocab, **{t["content"]: t["id"] for t in data.get("added_tokens") or ()}}


def _vocab_size(path: str | Path) -> int | None:
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    config = json.loads(file.read_text())
    size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) else None
