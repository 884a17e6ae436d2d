"""A real Prometheus server for tests (Debian's ``prometheus`` package, ``make system`` installs
it): on a free loopback port, a temporary data path, scraping every second whatever the
runtimes publish as ``file_sd`` targets under ``<home>/prometheus/``."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serving.runtimes.local import free_port

CONFIG = """global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: myriad
    scrape_interval: 1s
    scrape_timeout: 900ms
    file_sd_configs:
      - files: ["{targets}/*.json"]
        refresh_interval: 1s
"""


@dataclass
class PrometheusServer:
    url: str
    home: Path  # MYRIAD_HOME whose prometheus/ folder it watches
    process: subprocess.Popen

    def targets_up(self, deployment: str) -> int:
        answer = httpx.get(f"{self.url}/api/v1/targets", timeout=5).json()
        return sum(
            1
            for target in answer["data"]["activeTargets"]
            if target["labels"].get("myriad_deployment") == deployment and target["health"] == "up"
        )


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if found is None:
        pytest.fail(
            "the Prometheus tests need Debian's prometheus package: apt-get install -y "
            "prometheus (or `make system`)",
            pytrace=False,
        )
    return found


@contextmanager
def prometheus_server(root: Path) -> Iterator[PrometheusServer]:
    home = root / "home"
    (home / "prometheus").mkdir(parents=True, exist_ok=True)
    config = root / "prometheus.yml"
    config.write_text(CONFIG.format(targets=home / "prometheus"))
    port = free_port()
    log = open(root / "prometheus.log", "w")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen(
        [
            prometheus_binary(),
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={root / 'data'}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(root / 'prometheus.log').read_text()}")
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("prometheus did not get ready in 60 s")
            time.sleep(0.3)
        yield PrometheusServer(url=url, home=home, process=process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
