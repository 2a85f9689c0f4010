"""A real `mlx-sd serve` process on a free loopback port, over tiny random-weight model folders, for the server tests.

Every server test talks to a listening socket, as a client would. The models are the tiny SD1 pipelines of
`tiny_pipelines` (64x64 images in a fraction of a second), converted to mlx-sd folders once per session.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
# Two models, so that switching between them is observable (different weights, different hashes).
TINY_MODELS = {"tiny-a": (0, "a1" * 32), "tiny-b": (7, "b2" * 32)}


def require_serve_extra() -> None:
    """Skip the calling test module unless the server's optional dependencies are installed."""
    for module in ("fastapi", "uvicorn", "multipart"):
        pytest.importorskip(module, reason="the server's optional dependencies: pip install '.[serve]'")


def build_models(tmp: Path) -> Path:
    """A --models-dir holding the tiny models; returns it."""
    from tiny_pipelines import mlx_folder, tiny_components

    models = tmp / "models"
    for name, (seed, sha256) in TINY_MODELS.items():
        parts = tiny_components(tmp / f"parts-{name}", "sd1", seed=seed)
        mlx_folder(parts, models / name, "sd1", sha256=sha256)
    return models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running server process: `url`, `get`/`post` helpers, `stop(sig)`."""

    def __init__(self, process: subprocess.Popen, port: int, log: Path, auth=None):
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.session = requests.Session()
        self.session.auth = auth

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.session.get(self.url + path, timeout=kwargs.pop("timeout", 60), **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return self.session.post(self.url + path, timeout=kwargs.pop("timeout", 60), **kwargs)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Send `sig` and wait for the process to exit; returns its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                message = f"server did not stop within {timeout} s after {sig!r}:\n{self.output()}"
                raise AssertionError(message) from None
        return self.process.returncode


@contextmanager
def running_server(models: Path, tmp: Path, *args: str, auth=None):
    """Start `mlx-sd serve --models-dir models *args` and wait until /health answers; stop it afterwards."""
    port = free_port()
    log = tmp / f"server-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLX_SD_API_KEY", None)
    env.pop("MLX_SD_API_AUTH", None)
    command = [sys.executable, "-m", "mlx_sd_apps.cli", "serve", "--models-dir", str(models), "--port", str(port),
               "--log-level", "warning", *args]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    server = Server(process, port, log, auth)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited with {process.returncode}:\n{server.output()}")
            try:
                if requests.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not start within {START_TIMEOUT_S} s:\n{server.output()}")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            server.stop(signal.SIGTERM)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate()` until it returns something truthy; returns that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
