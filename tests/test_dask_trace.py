"""The trace fan-out on a Dask cluster (prefect-dask): ``$MYRIAD_DASK_ADDRESS`` makes the
trace flows' task runner a DaskTaskRunner, and the chunks run in the cluster's worker
processes, writing the same artifacts to the store."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from distributed import Client, LocalCluster, get_task_stream
from prefect.testing.utilities import prefect_test_harness
from prefect_dask import DaskTaskRunner

from flows.stages import trace, trace_task_runner
from serving.store import artifact_prefix, open_store, read_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_trace_chunks_run_on_a_dask_cluster(
    prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        yaml.safe_dump(
            {
                "schema_version": 1,
                "name": "dask",
                "processors": ["cpu"],
                "model_sets": [
                    {"prefix": "dk-", "count": 4, "source": "synthetic:bert-tiny",
                     "task": "sequence-classification", "max_length": 16}
                ],
            }
        )
    )  # fmt: skip
    store_uri = f"file://{tmp_path}/store"
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        monkeypatch.setenv("MYRIAD_DASK_ADDRESS", cluster.scheduler_address)
        runner = trace_task_runner()
        assert isinstance(runner, DaskTaskRunner)
        with get_task_stream(client) as stream:
            summary = trace.with_options(task_runner=runner)(
                fleet=str(fleet), store=store_uri, minimal_profile=True, max_task_runs=2
            )
        workers = {event["worker"] for event in stream.data}
    assert summary["traced"] == 4 and summary["reused"] == 0, summary
    # Two chunks of two models, each a task on the cluster's worker processes.
    assert len(stream.data) >= 2 and workers, stream.data
    store = open_store(store_uri)
    for i in range(4):
        assert read_manifest(store, artifact_prefix(f"dk-{i:04d}", "cpu")) is not None
