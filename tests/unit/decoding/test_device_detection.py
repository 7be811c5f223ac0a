"""`decoding.vllm_config.detect_device` finds a GPU without initialising CUDA in the server's
process (vLLM forks its engine unless CUDA is initialised, and a forked child cannot use CUDA
after the parent called into the runtime), and `prefer_spawn` makes vLLM spawn on a GPU."""

from __future__ import annotations

import os

import pytest
import torch

from decoding import vllm_config


@pytest.fixture(autouse=True)
def fresh_cache():
    vllm_config.detect_device.cache_clear()
    yield
    vllm_config.detect_device.cache_clear()


def never(*_args, **_kwargs):
    raise AssertionError("this call would initialise CUDA in the server's process")


@pytest.fixture
def cuda_build(monkeypatch):
    """torch as a CUDA build whose runtime must not be called."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", never)
    monkeypatch.setattr(torch.cuda, "device_count", never)
    monkeypatch.setattr(torch.cuda, "init", never)
    return monkeypatch


@pytest.mark.parametrize(("visible", "device"), [(1, "cuda"), (8, "cuda"), (0, "cpu")])
def test_nvml_counts_the_devices_without_the_cuda_runtime(cuda_build, visible, device):
    cuda_build.setattr(torch.cuda, "_device_count_nvml", lambda: visible)
    cuda_build.setattr(vllm_config, "_device_count_in_child", never)
    assert vllm_config.detect_device() == device


def test_without_nvml_a_child_process_asks_the_runtime(cuda_build):
    cuda_build.setattr(torch.cuda, "_device_count_nvml", lambda: -1)  # no driver library, or MIG UUIDs
    asked = []
    cuda_build.setattr(vllm_config, "_device_count_in_child", lambda: asked.append(1) or 2)
    assert vllm_config.detect_device() == "cuda" and asked == [1]
    assert vllm_config.detect_device() == "cuda" and asked == [1]  # asked once per process


def test_the_child_process_really_runs_and_answers_here():
    # On this machine's CPU torch the child says 0 devices; a GPU box says how many it sees.
    assert vllm_config._device_count_in_child() == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_a_cpu_build_never_looks(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", never)
    monkeypatch.setattr(torch.cuda, "is_available", never)
    monkeypatch.setattr(vllm_config, "_device_count_in_child", never)
    assert vllm_config.detect_device() == "cpu"


def test_an_initialised_process_asks_the_runtime_directly(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", never)
    assert vllm_config.detect_device() == "cuda"


def test_spawn_on_a_gpu_unless_the_operator_chose(monkeypatch):
    env: dict[str, str] = {}
    monkeypatch.setattr(os, "environ", env)  # nothing leaks into the servers later tests start
    vllm_config.prefer_spawn("cpu")
    assert env == {}
    vllm_config.prefer_spawn("cuda")
    assert env == {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    env["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"
    vllm_config.prefer_spawn("cuda")
    assert env == {"VLLM_WORKER_MULTIPROC_METHOD": "fork"}
