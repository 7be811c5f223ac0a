"""The guided-decoding integration tests again, with the guides' projections in int8
(`--guide-quantization int8`, vLLM's oneDNN int8 GEMM in the engine process)."""

from __future__ import annotations

import pytest

from tests.conftest import start_guide_server, stop_server
from tests.test_guided_integration import (  # noqa: F401 - collected here against this module's server
    test_args_reward_picks_the_preferred_candidate,
    test_genarm_guide_moves_decoding_to_its_token,
    test_zero_strength_reproduces_plain_greedy_decoding,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory, guide_dirs):
    # Unbuffered, so that the engine process's log lines are in the file when the test reads it.
    running = start_guide_server(tmp_path_factory, guide_dirs, "int8-server", "--guide-quantization", "int8",
                                 env={"PYTHONUNBUFFERED": "1"})
    yield running
    stop_server(running)


def test_the_engine_runs_the_int8_guides(server):
    log = server.log_path.read_text()
    assert "guide prefers-second (args, int8 projections) loaded" in log
    assert "guide prefers-banana (genarm, int8 projections) loaded" in log
