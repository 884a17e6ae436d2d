"""The pipeline flow: build → trace → pack → deploy → load test → report."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.load_test import loadtest
from flows.params import (
    EnginePrecision,
    LoadMode,
    Precision,
    Runtime,
    check_catalog,
    check_fleet,
    on_demand_limits,
)
from flows.results import result_options
from flows.stages import pack_profiles, trace_task_runner
from serving.store import latest_plan_uri
from tasks.build import build_image
from tasks.deploy import deploy_servers, teardown_servers
from tasks.documents import base_dir
from tasks.trace import submit_traces


# Two workers: the embedded SQLite server and a 2-core machine both saturate beyond that.
@flow(name="myriad-pipeline", task_runner=trace_task_runner(), log_prints=True, **result_options())
def pipeline(
    fleet: str = "examples/demo.yaml",
    catalog: str = "catalogs/aws.yaml",
    store: str | None = None,
    runtime: Runtime = "local",
    duration_s: float = 10.0,
    concurrency: int = 8,
    time_limit_s: float = 10.0,
    spot: bool = False,
    precision: Precision | None = None,
    deployment_name: str = "pipeline",
    keep_running: bool = False,
    repack_tolerance: float | None = None,
    load_modes: list[LoadMode] | None = None,
    zipf: float = 0.0,
    engine: EnginePrecision | None = None,
    on_demand: bool = False,
    max_cold_fraction: float = 0.01,
    max_cold_start_seconds: float = 5.0,
) -> dict:
    """``engine`` (fp32, bf16, fp16, int8): serve on the cross-model engine, and pack with its
    bytes per model and batched cost per request. ``on_demand``: let the packer load rarely
    used models on demand, with at most ``max_cold_fraction`` of requests expected to meet a
    cold start of at most ``max_cold_start_seconds``. Stages pass the plan's URI, not its
    JSON."""
    logger = get_run_logger()
    fleet_spec = check_fleet(fleet)
    catalog_spec = check_catalog(catalog)
    tier = on_demand_limits(on_demand, max_cold_fraction, max_cold_start_seconds)
    builds = [build_image(processor, runtime) for processor in fleet_spec.processors]
    logger.info(
        "environments: %s",
        ", ".join(f"{b['processor']}={(b['digest'] or 'not built')[:19]}" for b in builds),
    )
    create_table_artifact(
        key="myriad-images",
        table=[{k: b.get(k) for k in ("processor", "image", "digest", "pushed")} for b in builds],
        description="What the servers run: an image per processor (or the local environment)",
    )

    settings = {"precision": precision} if precision else None
    traces = submit_traces(fleet_spec, store, settings, base_dir(fleet))
    fresh = sum(not t["cached"] for t in traces)
    logger.info("traced %d artifacts, %d reused from the store", fresh, len(traces) - fresh)

    packed = pack_profiles(
        fleet_spec,
        traces,
        catalog_spec,
        store,
        time_limit_s,
        spot,
        engine,
        current_plan_uri=latest_plan_uri(store) if repack_tolerance is not None else None,
        repack_tolerance=repack_tolerance,
        on_demand=tier,
    )
    if packed["moves"] is not None:
        logger.info("repacked the running plan: %d replica moves", len(packed["moves"]))
    logger.info(
        "plan %s: %d instances, %d servers, $%.4f/h (lower bound $%.4f/h)",
        packed["plan_id"],
        packed["instances"],
        packed["servers"],
        packed["cost_per_hour"],
        packed["lower_bound_cost_per_hour"],
    )
    images = {b["processor"]: b["image"] for b in builds if b.get("image")}
    deploy_servers(packed["plan_uri"], store, runtime, deployment_name, engine, images)
    try:
        summary = loadtest(
            plan=packed["plan_uri"],
            deployment=deployment_name,
            store=store,
            duration_s=duration_s,
            concurrency=concurrency,
            modes=load_modes,
            zipf=zipf,
        )
    finally:
        if not keep_running:
            teardown_servers(deployment_name)
    if packed["moves"] is not None:
        summary["moves"] = len(packed["moves"])
    summary["plan_uri"] = packed["plan_uri"]
    summary["traced"] = fresh
    summary["reused"] = len(traces) - fresh
    return summary
