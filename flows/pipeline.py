"""The pipeline flow: build → trace → pack → deploy → load test → report."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from packing.contracts import Catalog, Fleet, Limits
from packing.io import load, to_json
from tasks.build import build_image
from tasks.deploy import deploy_servers, teardown_servers
from tasks.loadtest import load_test
from tasks.pack import build_problem, pack_models
from tasks.report import publish_report
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
) -> dict:
    logger = get_run_logger()
    fleet_spec = load(fleet, Fleet)
    catalog_spec = load(catalog, Catalog)
    builds = [build_image(processor, runtime) for processor in fleet_spec.processors]
    logger.info(
        "environments: %s", ", ".join(f"{b['processor']}={b['digest'][:19]}" for b in builds)
    )

    settings = {"precision": precision} if precision else None
    traces = submit_traces(fleet_spec, store, settings, Path(fleet).resolve().parent)
    fresh = sum(not t["cached"] for t in traces)
    logger.info("traced %d artifacts, %d reused from the store", fresh, len(traces) - fresh)

    problem = build_problem(
        fleet_spec, traces, catalog_spec, Limits(), "spot" if spot else "on_demand"
    )
    packed = pack_models(to_json(problem).decode(), store, time_limit_s)
    plan_json = to_json_plan(packed["plan"])
    logger.info(
        "plan %s: %d instances, %d servers, $%.4f/h (lower bound $%.4f/h)",
        packed["plan"]["plan_id"],
        len(packed["plan"]["instances"]),
        len(packed["plan"]["servers"]),
        packed["plan"]["cost_per_hour"],
        packed["plan"]["lower_bound_cost_per_hour"],
    )
    deployment = deploy_servers(plan_json, store, runtime, deployment_name)
    try:
        load_figures = load_test(plan_json, deployment, duration_s, concurrency)
        summary = publish_report(plan_json, load_figures, store)
    finally:
        if not keep_running:
            teardown_servers(deployment_name)
    summary["traced"] = fresh
    summary["reused"] = len(traces) - fresh
    return summary


def to_json_plan(plan: dict) -> str:
    import json

    return json.dumps(plan)
