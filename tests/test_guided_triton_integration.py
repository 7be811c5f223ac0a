"""The guided-decoding integration tests again, with the Triton kernels switched on in the
engine (Triton's interpreter on a CPU; compiled kernels on a GPU)."""

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
    running = start_guide_server(tmp_path_factory, guide_dirs, "triton-server",
                                 env={"ALIGNER_KERNELS": "triton", "TRITON_INTERPRET": "1"})
    yield running
    stop_server(running)



def test_the_switch_selects_triton(monkeypatch):
    """The engine process chooses kernels with this same function and environment."""
    import torch

    from kernels._dispatch import use_triton

    monkeypatch.setenv("ALIGNER_KERNELS", "triton")
    assert use_triton(torch.empty(1))
    monkeypatch.setenv("ALIGNER_KERNELS", "torch")
    assert not use_triton(torch.empty(1))
    monkeypatch.setenv("ALIGNER_KERNELS", "auto")
    assert use_triton(torch.empty(1)) == torch.cuda.is_available()
