"""The guided-decoding integration tests again, on one server whose guides run differently
from the main server's in both ways at once (one engine start instead of two; the defaults
are the main server's):
- the Triton kernels switched on in the engine (Triton's interpreter on a CPU, compiled
  kernels on a GPU);
- the guides' projections in int8 (`--guide-quantization int8`, vLLM's oneDNN int8 GEMM;
  that the flag reaches the guide runners is checked in-process by
  `tests/unit/decoding/test_guided_processor.py::test_int8_reaches_the_guide_runners`)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import start_guide_server, stop_server
from tests.integration.test_guided_integration import (  # noqa: F401 - collected here against this module's server
    test_args_reward_picks_the_preferred_candidate,
    test_genarm_guide_moves_decoding_to_its_token,
    test_zero_strength_reproduces_plain_greedy_decoding,
)

pytestmark = pytest.mark.integration


ON_GPU = torch.cuda.is_available()
# On a GPU the kernels compile (the interpreter would also interpret vLLM's own Triton kernels),
# and int8 guides are left out: they are a CPU feature (oneDNN's int8 GEMM) that `aligner serve`
# refuses on CUDA at start.
TRITON = {"ALIGNER_KERNELS": "triton", **({} if ON_GPU else {"TRITON_INTERPRET": "1"})}
INT8 = () if ON_GPU else ("--guide-quantization", "int8")


@pytest.fixture(scope="module")
def server(tmp_path_factory, guide_dirs):
    running = start_guide_server(tmp_path_factory, guide_dirs, "triton-int8-server", *INT8, env=TRITON)
    yield running
    stop_server(running)
