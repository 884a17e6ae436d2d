"""Start real model-server processes on loopback ports for tests, through the local runtime."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from packing.contracts import Plan, PlannedInstance, PlannedServer
from packing.io import save
from serving.runtimes.base import DeployOptions
from serving.runtimes.local import LocalRuntime, free_port

__all__ = ["free_port", "model_server", "one_server_plan"]


def one_server_plan(model_ids: list[str], processor: str = "cpu") -> Plan:
    instance = PlannedInstance(id="i000", type="test", processor=processor, price_per_hour=0.0)
    server = PlannedServer(
        id="i000-d0",
        instance=instance.id,
        device=0,
        processor=processor,
        model_ids=model_ids,
        memory_bytes=0,
        memory_capacity_bytes=0,
        compute_utilization=0.0,
    )
    return Plan(
        plan_id="plan-test-server",
        created_at="2026-11-24T00:00:00Z",
        problem="test",
        instances=[instance],
        servers=[server],
        cost_per_hour=0.0,
        lower_bound_cost_per_hour=0.0,
        gap=0.0,
        solver_status="test",
        solve_seconds=0.0,
    )


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
    """Run one server for ``model_ids``; yields its base URL once ``wait_for`` ("ready": every
    model loaded, "finished": loading ended, even with failures). Its log is ``log_path``'s
    folder, named by server and port."""
    plan = one_server_plan(model_ids)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    plan_file = save(plan, log_path.with_suffix(".plan.json"))
    runtime = LocalRuntime(log_dir=log_path.parent)
    options = DeployOptions(
        store_uri=store_uri,
        server_args=list(extra_args),
        env={"MYRIAD_LOG_LEVEL": "warning", **(env or {})},
    )
    url, handle = runtime.start_server(plan.servers[0], plan_file, options)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            reason = runtime.exit_reason(handle)
            if reason is not None:
                raise RuntimeError(f"server exited: {reason}")
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
                log = runtime.log_file(handle).read_text()[-2000:]
                raise RuntimeError(f"server not {wait_for} in {timeout_s} s: {log}")
            time.sleep(0.2)
        yield url
    finally:
        runtime.stop_server(handle)
