"""The pipeline flow: build → trace → pack → deploy → load test → report."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.loadtest import loadtest
from packing.contracts import Catalog, Fleet, Limits
from packing.io import load, to_json
from tasks.build import build_image
from tasks.deploy import deploy_servers, teardown_servers
from tasks.pack import build_problem, pack_models
from tasks.trace import submit_traces


# Two workers: the embedded SQLite server and a 2-core machine both saturate beyond that.
@flow(name="myriad-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def pipeline(
    fleet: str = "examples/demo.yaml",
    catalog: str = "catalogs/aws.yaml",
    store: str | None = None,
    runtime: str = "local",
    duration_s: float = 10.0,
    concurrency: int = 8,
    time_limit_s: float = 10.0,
    spot: bool = False,
    precision: str | None = None,
    deployment_name: str = "pipeline",
    keep_running: bool = False,
    repack_tolerance: float | None = None,
    load_modes: list[str] | None = None,
    zipf: float = 0.0,
    engine: str | None = None,
) -> dict:
    """``engine`` (fp32, bf16, fp16, int8): serve on the cross-model engine, and pack with its
    bytes per model and batched cost per request."""
    logger = get_run_logger()
    fleet_spec = load(fleet, Fleet)
    catalog_spec = load(catalog, Catalog)
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
    traces = submit_traces(fleet_spec, store, settings, Path(fleet).resolve().parent)
    fresh = sum(not t["cached"] for t in traces)
    logger.info("traced %d artifacts, %d reused from the store", fresh, len(traces) - fresh)

    problem = build_problem(
        fleet_spec, traces, catalog_spec, Limits(), "spot" if spot else "on_demand", engine
    )
    packed = pack_models(
        to_json(problem).decode(), store, time_limit_s, repack_tolerance=repack_tolerance
    )
    if packed["moves"] is not None:
        logger.info("repacked the running plan: %d replica moves", packed["moves"])
    plan_json = to_json_plan(packed["plan"])
    logger.info(
        "plan %s: %d instances, %d servers, $%.4f/h (lower bound $%.4f/h)",
        packed["plan"]["plan_id"],
        len(packed["plan"]["instances"]),
        len(packed["plan"]["servers"]),
        packed["plan"]["cost_per_hour"],
        packed["plan"]["lower_bound_cost_per_hour"],
    )
    images = {b["processor"]: b["image"] for b in builds if b.get("image")}
    deployment = deploy_servers(plan_json, store, runtime, deployment_name, engine, images)
    try:
        settings = {"duration_s": duration_s, "concurrency": concurrency, "zipf": zipf}
        if load_modes:
            settings["modes"] = load_modes
        summary = loadtest(plan_json, deployment, settings, store)
    finally:
        if not keep_running:
            teardown_servers(deployment_name)
    if packed["moves"] is not None:
        summary["moves"] = packed["moves"]
    summary["traced"] = fresh
    summary["reused"] = len(traces) - fresh
    return summary


def to_json_plan(plan: dict) -> str:
    import json

    return json.dumps(plan)
