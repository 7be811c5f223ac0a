"""The guided-decoding integration tests again, on servers whose guides run differently:
- `triton`: the Triton kernels switched on in the engine (Triton's interpreter on a CPU,
  compiled kernels on a GPU);
- `int8`: the guides' projections in int8 (`--guide-quantization int8`, vLLM's oneDNN int8
  GEMM; that the flag reaches the guide runners is checked in-process by
  `tests/unit/decoding/test_guided_processor.py::test_int8_reaches_the_guide_runners`)."""

from __future__ import annotations

import pytest

from tests.conftest import start_guide_server, stop_server
from tests.integration.test_guided_integration import (  # noqa: F401 - collected here against this module's server
    test_args_reward_picks_the_preferred_candidate,
    test_genarm_guide_moves_decoding_to_its_token,
    test_zero_strength_reproduces_plain_greedy_decoding,
)

pytestmark = pytest.mark.integration


VARIANTS = {
    "triton": ((), {"ALIGNER_KERNELS": "triton", "TRITON_INTERPRET": "1"}),
    "int8": (("--guide-quantization", "int8"), None),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def server(request, tmp_path_factory, guide_dirs):
    extra, env = VARIANTS[request.param]
    running = start_guide_server(tmp_path_factory, guide_dirs, f"{request.param}-server", *extra, env=env)
    yield running
    stop_server(running)
