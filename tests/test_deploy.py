"""The local runtime: real server processes from a plan, routing with failover, teardown."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from packing.contracts import ModelSpec, Plan, PlannedInstance, PlannedServer
from packing.io import save
from serving.client import Client, Router, RoutingError
from serving.store import open_store
from serving.tracing import TraceSettings, trace_to_store
from tasks.deploy import DeployError, deploy, deployment_path, teardown_local

pytestmark = pytest.mark.slow

FAST = TraceSettings(profile_batch_sizes=(1,), profile_repeats=1)


def _plan(servers: dict[str, list[str]]) -> Plan:
    instances = [
        PlannedInstance(
            id=f"i{n:03d}-c5-large", type="c5.large", processor="cpu", price_per_hour=0.085
        )
        for n in range(len(servers))
    ]
    return Plan(
        plan_id="plan-test",
        created_at="2026-11-24T00:00:00Z",
        problem="test",
        instances=instances,
        servers=[
            PlannedServer(
                id=f"{inst.id}-d0",
                instance=inst.id,
                device=0,
                processor="cpu",
                model_ids=models,
                memory_bytes=0,
                memory_capacity_bytes=4 << 30,
                compute_utilization=0.0,
            )
            for inst, models in zip(instances, servers.values(), strict=True)
        ],
        cost_per_hour=0.085 * len(servers),
        lower_bound_cost_per_hour=0.0,
        gap=1.0,
        solver_status="test",
        solve_seconds=0.0,
    )


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"file://{tmp_path_factory.mktemp('deploy')}/store"
    for name in ("shared", "only-a"):
        trace_to_store(
            ModelSpec(id=name, source="synthetic:bert-tiny", max_length=32),
            "cpu",
            open_store(uri),
            FAST,
        )
    return uri


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_deploy_route_failover_and_teardown(
    store_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MYRIAD_HOME", str(tmp_path))
    plan = _plan({"a": ["only-a", "shared"], "b": ["shared"]})
    plan_path = save(plan, tmp_path / "plan.json")
    deployment = deploy(plan_path, store_uri, "local", "t")
    try:
        assert deployment_path("t").is_file()
        assert len(deployment.servers) == 2
        router = Router(plan, deployment)
        assert len(router.urls_for("shared")) == 2
        with Client(router) as client:
            assert client.predict("only-a", "hello")["label"].startswith("LABEL_")
            # Kill one replica of "shared": the client must fail over to the other.
            os.kill(deployment.pids["i001-c5-large-d0"], signal.SIGKILL)
            for _ in range(5):
                assert client.predict("shared", ["x", "y"])[1]["label"].startswith("LABEL_")
            with pytest.raises(RoutingError, match="'nope' is not in plan plan-test"):
                client.predict("nope", "x")
    finally:
        stopped = teardown_local("t")
    assert stopped == ["i000-c5-large-d0", "i001-c5-large-d0"]
    assert not deployment_path("t").exists()
    assert not any(_alive(pid) for pid in deployment.pids.values())


def test_a_server_that_cannot_load_fails_the_deploy_and_leaves_nothing(
    store_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MYRIAD_HOME", str(tmp_path))
    plan_path = save(_plan({"a": ["shared", "never-traced"]}), tmp_path / "plan.json")
    with pytest.raises(DeployError, match="failed to load models: never-traced"):
        deploy(plan_path, store_uri, "local", "bad")
    assert not deployment_path("bad").exists()


@pytest.mark.parametrize(
    ("runtime", "message"), [("docker", "not available"), ("k8s", "unknown runtime 'k8s'")]
)
def test_runtimes_that_cannot_run_here_say_so(tmp_path: Path, runtime: str, message: str) -> None:
    plan_path = save(_plan({"a": ["shared"]}), tmp_path / "plan.json")
    with pytest.raises(DeployError, match=message):
        deploy(plan_path, None, runtime, "x")


def test_teardown_of_unknown_deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYRIAD_HOME", str(tmp_path))
    with pytest.raises(DeployError, match="no deployment named 'ghost'"):
        teardown_local("ghost")
