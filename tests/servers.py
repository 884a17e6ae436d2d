"""Start real model-server processes on loopback ports for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def model_server(
    store_uri: str,
    model_ids: list[str],
    log_path: Path,
    wait_for: str = "ready",
    timeout_s: float = 120,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Run ``python -m serving`` for ``model_ids``; yields its base URL once ``wait_for``
    ("ready": every model loaded, "finished": loading ended, even with failures)."""
    port = free_port()
    log = log_path.open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving",
            "--models",
            ",".join(model_ids),
            "--store",
            store_uri,
            "--port",
            str(port),
            *extra_args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MYRIAD_LOG_LEVEL": "warning", **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
            try:
                models = httpx.get(f"{url}/models", timeout=2).json()
                states = {m["state"] for m in models["models"]}
                if wait_for == "ready" and models["ready"]:
                    break
                if wait_for == "finished" and not states & {"pending", "loading"}:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"server not {wait_for} in {timeout_s} s: {log_path.read_text()[-2000:]}"
                )
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
