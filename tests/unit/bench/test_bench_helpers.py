"""The pure parts of the benchmarks: prompt files, the statistics of the quality report."""

from __future__ import annotations

import numpy as np
import pytest

from bench.load import load_prompts
from bench.quality import length_controlled_win_rate, win_rate_ci


def test_prompt_files_in_both_formats(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n{"turns": ["b", "c"]}\n')
    sharegpt = tmp_path / "p.json"
    sharegpt.write_text('[{"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}]')
    assert load_prompts(jsonl) == ["a", "b"] and load_prompts(sharegpt) == ["x"]


def test_statistics():
    assert win_rate_ci(np.array([0.0, 1.0] * 50))[0] == 0.5
    low, high = win_rate_ci(np.array([0.0, 1.0] * 50))[1:]
    assert 0.35 < low < 0.5 < high < 0.65
    # Wins explained entirely by length: at equal length, a coin flip.
    diff = np.array([30.0, 25.0, 40.0, -30.0, -25.0, -40.0, 28.0, -28.0])
    wins = (diff > 0).astype(float)
    assert length_controlled_win_rate(wins, diff) == pytest.approx(0.5, abs=0.05)
    # Wins regardless of length: stays high.
    assert length_controlled_win_rate(np.ones(8), diff) > 0.9
