"""The gateway in front of real model servers: routing by the plan, failover, 404, readiness."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from litestar.testing import TestClient

from packing.contracts import ModelSpec, Plan, PlannedInstance, PlannedServer
from serving.build.tracing import TraceSettings, trace_to_store
from serving.deployments import Deployment
from serving.routing.gateway import create_gateway
from serving.store import open_store
from tests.servers import free_port, model_server

pytestmark = pytest.mark.slow

SPECS = [ModelSpec(id=f"gw-{i}", source="synthetic:bert-tiny", num_labels=2) for i in range(2)]


def plan_of(servers: dict[str, list[str]]) -> Plan:
    return Plan(
        plan_id="plan-gw",
        created_at="2026-11-27T00:00:00Z",
        problem="gw",
        instances=[
            PlannedInstance(
                id=f"i00{k}-c5-large", type="c5.large", processor="cpu", price_per_hour=0.085
            )
            for k in range(len(servers))
        ],
        servers=[
            PlannedServer(
                id=f"i00{k}-c5-large-d0",
                instance=f"i00{k}-c5-large",
                device=0,
                processor="cpu",
                model_ids=ids,
                memory_bytes=1,
                memory_capacity_bytes=2,
                compute_utilization=0.0,
            )
            for k, ids in enumerate(servers.values())
        ],
        cost_per_hour=0.085 * len(servers),
        lower_bound_cost_per_hour=0.085 * len(servers),
        gap=0.0,
        solver_status="optimal",
        solve_seconds=0.0,
    )


def test_gateway_routes_fails_over_and_refuses_unknown_models(tmp_path: Path) -> None:
    store = f"file://{tmp_path}/store"
    for spec in SPECS:
        trace_to_store(spec, "cpu", open_store(store), TraceSettings(profile_batch_sizes=(1,)))
    with model_server(store, [s.id for s in SPECS], tmp_path / "server.log") as live_url:
        dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
        # gw-0 has a replica on the dead server too; gw-1 lives only on the live one.
        plan = plan_of({"a": ["gw-0"], "b": ["gw-0", "gw-1"]})
        deployment = Deployment(
            name="gw",
            plan_id=plan.plan_id,
            runtime="local",
            servers={"i000-c5-large-d0": dead_url, "i001-c5-large-d0": live_url},
        )
        with TestClient(create_gateway(plan, deployment)) as gateway:
            for _ in range(6):  # random replica order: the dead one is tried half the time
                answer = gateway.post("/predictions/gw-0", json={"text": "routed"})
                assert answer.status_code == 200, answer.text
                assert set(answer.json()) >= {"label", "probabilities"}
            direct = httpx.post(f"{live_url}/predictions/gw-1", json={"text": "same"}).json()
            assert gateway.post("/predictions/gw-1", json={"text": "same"}).json() == direct
            v2 = gateway.post(
                "/v2/models/gw-1/infer",
                json={
                    "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]
                },
            )
            assert v2.status_code == 200 and v2.json()["model_name"] == "gw-1"
            missing = gateway.post("/predictions/nope", json={"text": "x"})
            assert missing.status_code == 404 and "nope" in missing.json()["detail"]
            bad = gateway.post("/predictions/gw-1", json={"text": ""})
            assert bad.status_code == 400  # the server's answer, passed through
            readiness = gateway.get("/v2/health/ready")
            assert readiness.status_code == 503
            assert readiness.json()["not_ready"] == [dead_url]
