"""The guided-decoding integration tests again, with the guides' projections in int8
(`--guide-quantization int8`, vLLM's oneDNN int8 GEMM in the engine process). That the flag
reaches the guide runners is checked in-process by
`tests/test_guided_processor.py::test_int8_reaches_the_guide_runners`."""

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
    running = start_guide_server(tmp_path_factory, guide_dirs, "int8-server", "--guide-quantization", "int8")
    yield running
    stop_server(running)

