"""The ``myriad-redeploy`` flow, for retrained models: find the models whose source changed
since they were traced (content hash against the store's manifests), re-trace only those, repack
the running plan incrementally (models stay put unless that costs more than the tolerance above a
fresh solve), roll out through the runtime's redeploy (only servers whose models or artifacts
changed are replaced, each new one ready before an old one stops), load-test briefly and report
what moved and what it cost."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.load_test import loadtest
from flows.params import EnginePrecision, Precision, check_catalog, check_fleet, trace_settings
from flows.results import result_options
from flows.stages import pack_profiles, trace_task_runner
from tasks.deploy import deployment_record, redeploy_servers
from tasks.documents import base_dir, open_plan
from tasks.trace import find_changed, read_profiles, submit_traces, trace_jobs


@flow(name="myriad-redeploy", task_runner=trace_task_runner(), log_prints=True, **result_options())
def redeploy(
    fleet: str = "examples/demo.yaml",
    catalog: str = "catalogs/aws.yaml",
    store: str | None = None,
    deployment: str = "myriad",
    repack_tolerance: float = 0.05,
    time_limit_s: float = 10.0,
    spot: bool = False,
    precision: Precision | None = None,
    minimal_profile: bool = False,
    engine: EnginePrecision | None = None,
    duration_s: float = 5.0,
    concurrency: int = 4,
    models: list[str] | None = None,
    model: str | None = None,
) -> dict:
    """Move deployment ``deployment`` to what ``fleet`` says now, touching only what changed.
    ``models`` / ``model``: the ids an update event named (the deployment trigger fills in
    ``model``); logged only, since detection checks every model and so also finds a retrained
    model nobody announced. ``duration_s`` 0 skips the load test."""
    logger = get_run_logger()
    started = time.perf_counter()
    fleet_spec = check_fleet(fleet)
    catalog_spec = check_catalog(catalog)
    if repack_tolerance < 0:
        raise ValueError(f"repack_tolerance must be at least 0, got {repack_tolerance}")
    announced = [*(models or []), *([model] if model else [])]
    if announced:
        logger.info("update announced for: %s", ", ".join(announced))
    running = deployment_record(deployment, store)
    # The plan's copy in the store where there is one: a redeploy on another machine (a
    # Kubernetes work pool's job) has no access to the deploying machine's files.
    current_uri = running.get("plan_uri") or running["plan_path"]
    current = open_plan(current_uri)

    settings = trace_settings(precision, minimal_profile)
    found = find_changed(fleet, store, settings)
    changed = set(found["changed"])
    fleet_models = {spec.id for spec in fleet_spec.all_models()}
    running_models = {m for s in current.servers for m in s.model_ids}
    if not changed and fleet_models == running_models:
        logger.info("nothing changed: every model matches its trace and the running plan")
        _report(deployment, current.plan_id, [], None, None, current.cost_per_hour, 0.0)
        return {"changed": [], "plan_id": current.plan_id, "kept": sorted(running["servers"])}

    jobs = [(spec, proc) for spec, proc in trace_jobs(fleet_spec) if f"{spec.id}/{proc}" in changed]
    traced = submit_traces(fleet_spec, store, settings, base_dir(fleet), jobs=jobs)
    reused = read_profiles(found["unchanged"], store)
    packed = pack_profiles(
        fleet_spec,
        traced + reused,
        catalog_spec,
        store,
        time_limit_s,
        spot,
        engine,
        current_plan_uri=current_uri,
        repack_tolerance=repack_tolerance,
    )
    rolled = redeploy_servers(packed["plan_uri"], store, deployment, engine)
    logger.info(
        "redeployed %s: kept %s, started %s, stopped %s",
        deployment,
        rolled["kept"],
        rolled["started"],
        rolled["stopped"],
    )
    load = None
    if duration_s > 0:
        load = loadtest(
            plan=packed["plan_uri"],
            deployment=deployment,
            store=store,
            duration_s=duration_s,
            concurrency=concurrency,
            modes=["closed"],
        )
    trace_seconds = sum(t["seconds"] for t in traced)
    summary = {
        "changed": sorted(changed),
        "retraced": sorted(f"{t['model_id']}/{t['processor']}" for t in traced),
        "plan_id": packed["plan_id"],
        "plan_uri": packed["plan_uri"],
        "previous_plan_id": current.plan_id,
        "moves": packed["moves"] or [],
        "kept": rolled["kept"],
        "started": rolled["started"],
        "stopped": rolled["stopped"],
        "cost_per_hour_before": current.cost_per_hour,
        "cost_per_hour": packed["cost_per_hour"],
        "fresh_cost_per_hour": packed["fresh_cost_per_hour"],
        "trace_seconds": round(trace_seconds, 3),
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    if load is not None:
        summary["error_rate"] = load["error_rate"]
        summary["requests_per_s"] = load["requests_per_s"]
        summary["p90_ms"] = load.get("p90_ms")
    _report(deployment, current.plan_id, sorted(changed), summary, rolled, current.cost_per_hour,
            trace_seconds)  # fmt: skip
    return summary


def _report(
    deployment: str,
    previous_plan_id: str,
    changed: list[str],
    summary: dict | None,
    rolled: dict | None,
    cost_before: float,
    trace_seconds: float,
) -> None:
    """The ``myriad-redeploy`` markdown artifact: what changed, each move, what was replaced,
    and the cost per hour before and after (and of a fresh solve)."""
    lines = [f"# Redeploy of `{deployment}`", ""]
    if summary is None or rolled is None:
        lines.append(f"Nothing changed: plan `{previous_plan_id}` keeps running, unchanged.")
    else:
        lines += [
            f"Plan `{previous_plan_id}` → `{summary['plan_id']}` ({summary['plan_uri']})",
            "",
            f"- models changed (re-traced): {', '.join(changed) or 'none'}",
            f"- trace time: {trace_seconds:.1f} s; redeploy wall time: "
            f"{summary['wall_seconds']:.1f} s",
            f"- servers kept: {len(rolled['kept'])} ({', '.join(rolled['kept']) or '-'})",
            f"- servers started: {', '.join(rolled['started']) or 'none'}",
            f"- servers stopped: {', '.join(rolled['stopped']) or 'none'}",
            f"- cost per hour: ${cost_before:.4f} → ${summary['cost_per_hour']:.4f}"
            + (
                f" (a fresh solve: ${summary['fresh_cost_per_hour']:.4f})"
                if summary["fresh_cost_per_hour"] is not None
                else ""
            ),
        ]
        if "error_rate" in summary:
            lines.append(
                f"- load test after: {summary['requests_per_s']:.1f} requests/s, "
                f"error rate {summary['error_rate']:.4f}, P90 {summary['p90_ms']} ms"
            )
        lines += ["", "## Moves", ""]
        if summary["moves"]:
            lines += ["| model | from | to |", "|---|---|---|"]
            lines += [
                f"| {m['model_id']} | {m['source'] or '(new)'} | {m['target'] or '(removed)'} |"
                for m in summary["moves"]
            ]
        else:
            lines.append("No replica changed server.")
    create_markdown_artifact(
        key="myriad-redeploy",
        markdown="\n".join(lines),
        description=f"Redeploy of {deployment}: what moved and what it cost",
    )
