"""The pipeline's stages as flows of their own, to run one at a time from the UI or
``prefect deployment run``: ``myriad-trace``, ``myriad-pack``, ``myriad-deploy`` (and
``myriad-loadtest`` in flows/load_test.py, ``myriad-redeploy`` in flows/redeploy.py). Each
takes and returns URIs (fleet, catalog, plan, store) and small figures, never a plan's JSON."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.params import (
    EnginePrecision,
    Precision,
    Runtime,
    check_catalog,
    check_fleet,
    check_positive,
    trace_settings,
)
from flows.results import result_options
from packing.contracts import Catalog, Fleet, Limits, OnDemandLimits
from packing.problems import build_problem
from serving import settings
from serving.store import publish_problem
from tasks.deploy import deploy_servers
from tasks.documents import base_dir, open_plan
from tasks.pack import pack_plan
from tasks.trace import MAX_TASK_RUNS, read_profiles, submit_traces, trace_jobs


def trace_task_runner():
    """Two threads on the embedded default (SQLite and a 2-core machine saturate beyond that);
    with ``$MYRIAD_DASK_ADDRESS`` (and prefect-dask installed) the chunks run on that Dask
    cluster instead, each worker tracing one chunk at a time."""
    trace = settings.current().trace
    if trace.dask_address:
        from prefect_dask import DaskTaskRunner  # optional: pip install prefect-dask

        return DaskTaskRunner(address=trace.dask_address)
    return ThreadPoolTaskRunner(max_workers=trace.workers)


@flow(name="myriad-trace", task_runner=trace_task_runner(), log_prints=True, **result_options())
def trace(
    fleet: str = "examples/demo.yaml",
    store: str | None = None,
    precision: Precision | None = None,
    minimal_profile: bool = False,
    max_task_runs: int = MAX_TASK_RUNS,
    force: bool = False,
) -> dict:
    """Trace every model of ``fleet`` for each of its processors into ``store``, in at most
    ``max_task_runs`` task runs; unchanged models are reused from the store."""
    fleet_spec = check_fleet(fleet)
    check_positive(max_task_runs=max_task_runs)
    jobs = trace_jobs(fleet_spec)
    results = submit_traces(
        fleet_spec,
        store,
        trace_settings(precision, minimal_profile),
        base_dir(fleet),
        jobs=jobs,
        max_task_runs=max_task_runs,
        force=force,
    )
    fresh = sum(not r["cached"] for r in results)
    get_run_logger().info("traced %d artifacts, %d reused from the store", fresh, len(jobs) - fresh)
    return {
        "fleet": fleet_spec.name,
        "jobs": len(jobs),
        "traced": fresh,
        "reused": len(jobs) - fresh,
        "trace_seconds": round(sum(r["seconds"] for r in results), 3),
    }


def plan_artifacts(plan_uri: str, problem=None) -> None:
    """The plan's table (one row per server), a link to it in the store and, with the
    problem, the packing picture: keyed, so the Artifacts page compares them across runs."""
    plan = open_plan(plan_uri)
    types = {i.id: i.type for i in plan.instances}
    create_table_artifact(
        key="myriad-plan",
        table=[
            {
                "server": s.id,
                "instance": s.instance,
                "type": types.get(s.instance),
                "models": len(s.model_ids),
                "memory_gib": round(s.memory_bytes / 2**30, 3),
                "capacity_gib": round(s.memory_capacity_bytes / 2**30, 3),
                "compute": round(s.compute_utilization, 3),
            }
            for s in plan.servers
        ],
        description=f"Plan {plan.plan_id}: ${plan.cost_per_hour:.4f}/h, "
        f"lower bound ${plan.lower_bound_cost_per_hour:.4f}/h, {plan.solver_status}",
    )
    if plan_uri.startswith(("s3://", "http://", "https://", "file://", "/")):
        create_link_artifact(
            key="myriad-plan-link",
            link=plan_uri if "://" in plan_uri else f"file://{plan_uri}",
            link_text=f"plan {plan.plan_id}",
        )
    if problem is not None:
        _plan_picture(problem, plan)


def _plan_picture(problem, plan) -> None:
    import base64
    import tempfile
    from pathlib import Path

    from packing.plot import plot_plan

    try:
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_plan(problem, plan, Path(tmp) / "plan.png").read_bytes()
    except Exception as exc:  # the picture is a nicety; the plan is already published
        get_run_logger().warning("no packing picture: %s", exc)
        return
    if len(png) > 400_000:  # keep the Prefect database small
        return
    create_markdown_artifact(
        key="myriad-plan-picture",
        markdown=f"![plan {plan.plan_id}](data:image/png;base64,{base64.b64encode(png).decode()})",
        description=f"Packing of plan {plan.plan_id}",
    )


def pack_profiles(
    fleet: Fleet,
    profiles: list[dict],
    catalog: Catalog,
    store: str | None,
    time_limit_s: float,
    spot: bool = False,
    engine: str | None = None,
    current_plan_uri: str | None = None,
    repack_tolerance: float | None = None,
    on_demand: OnDemandLimits | None = None,
) -> dict:
    """The pack stage of every flow: the problem from the traced profiles, published to the
    store; the pack task over its URI (a fresh solve, or a repack of ``current_plan_uri``);
    the plan's artifacts. Returns the pack task's figures."""
    problem = build_problem(
        fleet, profiles, catalog, Limits(), "spot" if spot else "on_demand", engine, on_demand
    )
    packed = pack_plan(
        publish_problem(problem, store),
        store,
        time_limit_s,
        current_plan_uri=current_plan_uri if repack_tolerance is not None else None,
        repack_tolerance=repack_tolerance,
        problem_name=fleet.name,
    )
    plan_artifacts(packed["plan_uri"], problem)
    return packed


@flow(name="myriad-pack", log_prints=True, **result_options())
def pack(
    fleet: str = "examples/demo.yaml",
    catalog: str = "catalogs/aws.yaml",
    store: str | None = None,
    time_limit_s: float = 10.0,
    spot: bool = False,
    engine: EnginePrecision | None = None,
    repack_plan: str | None = None,
    repack_tolerance: float | None = None,
) -> dict:
    """Pack the traced fleet onto the catalog's cheapest instances and publish the plan; with
    ``repack_plan`` (a plan URI) and ``repack_tolerance``, repack that plan incrementally.
    Returns the plan's URI and figures. An infeasible fleet fails at once, not retried."""
    fleet_spec = check_fleet(fleet)
    catalog_spec = check_catalog(catalog)
    check_positive(time_limit_s=time_limit_s)
    if repack_tolerance is not None and repack_tolerance < 0:
        raise ValueError(f"repack_tolerance must be at least 0, got {repack_tolerance}")
    jobs = [f"{spec.id}/{proc}" for spec, proc in trace_jobs(fleet_spec)]
    profiles = read_profiles(jobs, store)
    return pack_profiles(
        fleet_spec,
        profiles,
        catalog_spec,
        store,
        time_limit_s,
        spot,
        engine,
        current_plan_uri=repack_plan,
        repack_tolerance=repack_tolerance,
    )


@flow(name="myriad-deploy", log_prints=True, **result_options())
def deploy(
    plan: str,
    store: str | None = None,
    runtime: Runtime = "local",
    name: str = "myriad",
    engine: EnginePrecision | None = None,
) -> dict:
    """Start the servers of the plan at ``plan`` (a URI) on ``runtime`` as deployment ``name``;
    returns each server's URL. Servers keep running until ``myriad teardown --name``."""
    open_plan(plan)  # a bad URI fails here, before anything starts
    record = deploy_servers(plan, store, runtime, name, engine)
    create_table_artifact(
        key="myriad-deployment",
        table=[{"server": s, "url": u} for s, u in sorted(record["servers"].items())],
        description=f"Deployment {name} of plan {record['plan_id']} on {runtime}",
    )
    return {
        "name": name,
        "plan_id": record["plan_id"],
        "runtime": runtime,
        "servers": record["servers"],
    }
