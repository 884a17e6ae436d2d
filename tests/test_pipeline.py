"""The whole pipeline on the demo fleet, on a temporary Prefect server: real traces, real server
processes, real HTTP load, a real report; and a second run that redoes no finished work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import pipeline

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_demo_pipeline_end_to_end(
    prefect_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client

    monkeypatch.setenv("MYRIAD_HOME", str(tmp_path / "home"))
    store = f"file://{tmp_path}/store"
    arguments = dict(
        fleet=str(ROOT / "examples/demo.yaml"),
        catalog=str(ROOT / "catalogs/aws.yaml"),
        store=store,
        duration_s=2.0,
        concurrency=4,
        time_limit_s=5.0,
    )
    first = pipeline(**arguments)
    assert first["traced"] == 13 and first["reused"] == 0
    assert first["models"] == 13
    assert first["servers"] >= 2  # minilm has two replicas, which must sit on two instances
    assert first["requests_per_s"] > 0 and first["error_rate"] == 0
    assert 0 < first["p50_ms"] <= first["p90_ms"] <= first["p95_ms"] <= first["p99_ms"]
    assert first["cost_per_hour"] >= first["lower_bound_cost_per_hour"] > 0
    assert first["cost_per_model_hour"] == pytest.approx(first["cost_per_hour"] / 13)
    report = Path(first["report_uri"].removeprefix("file://"))
    assert report.is_file() and report.with_name("report.md").is_file()
    assert report.with_name("latency_cdf.png").is_file()
    assert first["generator_saturated"] is not None

    # Nothing left running: teardown removed the deployment and every server process ended.
    deployments = tmp_path / "home" / "deployments"
    assert not (deployments / "pipeline.json").exists()
    for log in deployments.glob("pipeline/*.log"):
        assert log.stat().st_size >= 0
    assert not any(
        b"serving" in Path(f"/proc/{pid}/cmdline").read_bytes() and _alive(int(pid))
        for pid in os.listdir("/proc")
        if pid.isdigit()
        and Path(f"/proc/{pid}/cmdline").exists()
        and str(tmp_path).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    )

    assert "moves" not in first
    second = pipeline(**arguments, repack_tolerance=0.05)
    assert second["traced"] == 0 and second["reused"] == 13
    # Nothing changed, so the incremental repack keeps every replica where it was.
    assert second["moves"] == 0
    assert second["cost_per_hour"] == first["cost_per_hour"]

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    keys = {a.key for a in artifacts}
    assert {
        "myriad-summary",
        "myriad-results",
        "myriad-report",
        "myriad-load-test-progress",
        "myriad-images",
    } <= keys
