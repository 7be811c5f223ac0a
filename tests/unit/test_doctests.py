"""Every docstring example in the package runs: an example that drifted from the code fails here."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for package in ("aligner", "decoding", "kernels", "server", "bench")
    for path in (ROOT / package).rglob("*.py")
    if ">>>" in path.read_text()
)


def test_examples_are_found():
    assert "aligner.strategies.selection" in MODULES and "server.serve" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
