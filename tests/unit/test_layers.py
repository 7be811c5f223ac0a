"""The packages form layers that import downward only, and vLLM stays inside `decoding/`.

    bench -> server -> aligner -> decoding -> kernels

Every import counts, the ones inside functions too: a lazy import is still a dependency.
`python -m tests.unit.test_layers` prints the package graph.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["bench", "server", "aligner", "decoding", "kernels"]  # top to bottom
VLLM_ALLOWED = {"decoding"}


def imports() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported top-level module) -> ["file:line module", ...]."""
    edges: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top != package:
                        edges[(package, top)].append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    return edges


def test_layers_import_downward_only():
    upward = [
        f"{a} imports {b}: {where}"
        for (a, b), wheres in imports().items()
        if b in LAYERS and LAYERS.index(b) < LAYERS.index(a)
        for where in wheres
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_only_decoding_imports_vllm():
    outside = [
        f"{a}: {where}" for (a, b), wheres in imports().items() if b == "vllm" and a not in VLLM_ALLOWED
        for where in wheres
    ]
    assert not outside, "vLLM imported outside decoding/:\n" + "\n".join(outside)


def test_the_check_sees_lazy_imports():
    # The guard itself must catch an import written inside a function.
    edges = imports()
    assert any("vllm" in w for w in edges[("decoding", "vllm")])
    assert ("server", "aligner") in edges and ("aligner", "decoding") in edges


if __name__ == "__main__":
    for (a, b), wheres in sorted(imports().items()):
        if b in LAYERS or b == "vllm":
            print(f"{a:>8} -> {b:<8} {len(wheres):3d} imports")
