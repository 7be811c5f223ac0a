"""Start and stop `aligner serve` as a subprocess (used by benchmarks and the test suite)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(process: subprocess.Popen, url: str, timeout_s: float, headers: dict | None = None,
                  ready: Callable[[httpx.Response], bool] | None = None) -> str:
    """Poll `url` once a second: "up" when `ready(response)` (default: a 200), "exited" when
    `process` ends first, "timeout" after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return "exited"
        try:
            response = httpx.get(url, headers=headers, timeout=2)
            if ready(response) if ready else response.status_code == 200:
                return "up"
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return "timeout"


@dataclass
class RunningServer:
    base_url: str
    process: subprocess.Popen
    log_path: Path
    api_key: str | None = None

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def start_server(log_dir: Path, *extra_args: str, api_key: str | None = None, env: dict | None = None,
                 ready_when: Callable[[httpx.Response], bool] | None = None) -> RunningServer:
    """Start the server on a free loopback port and wait until /ready says 200 (or, with
    `ready_when`, until that predicate holds for a /ready response)."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{port}.log"
    args = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), *extra_args]
    if api_key:
        args += ["--api-key", api_key]
    environment = {k: v for k, v in os.environ.items() if k != "ALIGNER_API_KEY"}
    environment.update(env or {})
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=environment)
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path, api_key)
    state = wait_until_up(process, f"{server.base_url}/ready", STARTUP_TIMEOUT_S, server.headers(), ready_when)
    if state == "exited":
        raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_tail()}")
    if state == "timeout":
        stop_server(server)
        raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S}s:\n{server.log_tail()}")
    return server


def stop_server(server: RunningServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


class PoolingServer:
    """vLLM's own OpenAI server in pooling mode (`--runner pooling`) on a free loopback port: a
    remote reward model for `--reward-model NAME=http://...`."""

    def __init__(self, model: Path, log_dir: Path, *extra_args: str, env: dict | None = None):
        self.model, self.log_dir, self.extra_args = Path(model), Path(log_dir), extra_args
        self.env = dict(env or {})
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> PoolingServer:
        """Start it (again, on the same port) and wait until its /health says 200."""
        return self.launch().wait(timeout_s)

    def launch(self) -> PoolingServer:
        """Start its process and return at once (`wait` waits for it): something else can
        start meanwhile."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"pooling-{self.port}-{time.monotonic_ns()}.log", "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
                 "--runner", "pooling", "--port", str(self.port), *self.extra_args],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        return self

    def wait(self, timeout_s: float = STARTUP_TIMEOUT_S) -> PoolingServer:
        """Wait until the launched server's /health says 200."""
        state = wait_until_up(self.process, f"{self.url}/health", timeout_s)
        if state == "exited":
            raise RuntimeError(f"vLLM pooling server exited with {self.process.returncode} (log in {self.log_dir})")
        if state == "timeout":
            self.kill()
            raise RuntimeError(f"vLLM pooling server not healthy after {timeout_s:.0f}s (log in {self.log_dir})")
        return self

    def kill(self) -> None:
        """SIGKILL the server and its engine process (what a crashed node does)."""
        import psutil

        if self.process is None or self.process.poll() is not None:
            return
        for child in psutil.Process(self.process.pid).children(recursive=True):
            child.kill()
        self.process.kill()
        self.process.wait()


@contextlib.contextmanager
def shipped_server(base_url: str | None, log_dir: Path) -> Iterator[str]:
    """`base_url` (a running server's `/v1`), or, for the block, a server started as `make serve`
    starts it (`--models-dir models`: the shipped reward models), logging under `log_dir`."""
    if base_url is not None:
        yield base_url
        return
    server = start_server(log_dir, "--models-dir", "models")
    try:
        yield server.v1
    finally:
        stop_server(server)
