"""The soak's traffic covers every registered strategy, so a new one is soaked the day it lands."""

from __future__ import annotations

from aligner.alignment import resolve_alignment
from aligner.strategies import strategy_names
from bench.soak import MIX, strategy_of


def test_the_soak_mix_runs_every_strategy_with_valid_alignment():
    seen = set()
    for alignment, weight in MIX:
        assert weight > 0
        resolved = resolve_alignment(alignment, None, None, "none", None)  # the request path, at load
        seen.add(strategy_of(alignment))
        if "pipeline" in alignment:
            seen.update(stage["strategy"] for stage in alignment["pipeline"])
        assert resolved.strategy.name == strategy_of(alignment)
    assert set(strategy_names()) <= seen, sorted(set(strategy_names()) - seen)
