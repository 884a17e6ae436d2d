"""``myriad-observe`` (on a schedule: each model's observed traffic into the store, and a
``myriad.traffic.drifted`` event when a model leaves its planned band or a server passes its
planned compute) and ``myriad-rebalance`` (repack for the observed traffic under a move budget,
redeploy only what changed, load-test, report)."""

from __future__ import annotations

import time

import msgspec
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.load_test import loadtest
from flows.params import EnginePrecision, check_catalog, check_fleet, check_positive
from flows.results import result_options
from packing.traffic import TrafficSettings
from serving import settings
from serving.deployments import read_deployment
from serving.observe import Observation
from serving.rebalance import (
    DriftSettings,
    RebalanceSettings,
    apply_rebalance,
    drift,
    rebalance_running,
    running_problem,
)
from serving.runtimes.base import deploy_options
from tasks.documents import open_plan
from tasks.observe import emit_drift, observe_traffic


def _running(deployment: str, store: str | None):
    record = read_deployment(deployment, store)
    return record, open_plan(record.plan_uri or record.plan_path or ""), store or record.store_uri


@flow(name="myriad-observe", log_prints=True, **result_options())
def observe(
    deployment: str = "myriad",
    fleet: str = "examples/demo.yaml",
    catalog: str = "catalogs/aws.yaml",
    store: str | None = None,
    window_s: float = 60.0,
    interval_s: float = 5.0,
    quantile: float = 0.9,
    prometheus_url: str | None = None,
    drift_ratio: float = 2.0,
    drift_min_rps: float = 0.5,
    drift_compute_ratio: float = 1.2,
) -> dict:
    """Observe ``deployment`` (from Prometheus with ``prometheus_url`` or the settings', else
    by scraping its servers) and check the observation against the traffic its plan was made
    for; on drift, emit ``myriad.traffic.drifted`` for this deployment."""
    logger = get_run_logger()
    check_positive(window_s=window_s, interval_s=interval_s)
    _, current, store_uri = _running(deployment, store)
    url = prometheus_url or settings.current().observe.prometheus_url
    observed = observe_traffic(deployment, store, window_s, interval_s, quantile, url)
    observation = msgspec.convert(observed["observation"], Observation)
    problem = running_problem(current, store_uri, check_fleet(fleet), check_catalog(catalog))
    found = drift(
        current,
        problem,
        observation,
        DriftSettings(ratio=drift_ratio, min_rps=drift_min_rps, compute_ratio=drift_compute_ratio),
    )
    busiest = sorted(observation.models.items(), key=lambda item: -item[1].rate_rps)[:25]
    planned = {m.id: m.traffic_rps for m in problem.models}
    create_table_artifact(
        key="myriad-observation",
        table=[
            {
                "model": model,
                "planned_rps": planned.get(model),
                "observed_rps": round(t.rate_rps, 3),
                "high_rps": round(t.rate_high_rps, 3),
                "errors": t.errors,
                "p90_ms": t.p90_ms,
            }
            for model, t in busiest
        ],  # fmt: skip
        description=f"{deployment}: {observation.total_rps():.1f} requests/s over "
        f"{observation.window_s:.0f} s, the 25 busiest models",
    )
    summary = {
        "observation_uri": observed["observation_uri"],
        "plan_id": current.plan_id,
        "total_rps": round(observation.total_rps(), 3),
        "drifted": found.drifted,
        "drifted_models": [m.model_id for m in found.models],
        "overloaded_servers": found.servers,
        "event_id": None,
    }
    if found.drifted:
        payload = {
            "plan_id": current.plan_id,
            "observation_uri": observed["observation_uri"],
            "models": [msgspec.to_builtins(m) for m in found.models[:50]],
            "servers": found.servers,
        }
        summary["event_id"] = emit_drift(deployment, payload)
        logger.info(
            "%s drifted: %d models out of their band, servers past their compute: %s",
            deployment, len(found.models), found.servers or "none",
        )  # fmt: skip
    return summary


@flow(name="myriad-rebalance", log_prints=True, **result_options())
def rebalance(
    deployment: str = "myriad",
    fleet: str = "examples/demo.yaml",
    catalog: str = "catalogs/aws.yaml",
    store: str | None = None,
    tolerance: float = 0.05,
    max_moves: int | None = None,
    headroom: float = 1.2,
    floor_rps: float = 0.01,
    min_window_s: float = 60.0,
    rate: str = "high",
    time_limit_s: float = 10.0,
    engine: EnginePrecision | None = None,
    dry_run: bool = False,
    duration_s: float = 5.0,
) -> dict:
    """Repack ``deployment`` for its latest observation, move only the servers whose models
    changed, load-test for ``duration_s`` (0: none), and report cost before and after, the
    moves, and planned against observed traffic. ``dry_run``: report, change nothing."""
    started = time.perf_counter()
    options = RebalanceSettings(
        traffic=TrafficSettings(floor_rps=floor_rps, headroom=headroom, min_window_s=min_window_s),
        tolerance=tolerance,
        max_moves=max_moves,
        time_limit_s=time_limit_s,
        rate=rate,
    )
    record, result, store_uri = rebalance_running(
        deployment, store, check_fleet(fleet), check_catalog(catalog), options, engine
    )
    moved = None
    if not dry_run and not result.unchanged:
        moved = apply_rebalance(result, record, deploy_options(deployment, store_uri, engine))
    summary = {
        "plan_before": result.plan_before,
        "plan_id": result.plan.plan_id,
        "cost_per_hour_before": result.cost_before,
        "cost_per_hour": result.cost_after,
        "fresh_cost_per_hour": result.fresh_cost,
        "moves": [msgspec.to_builtins(m) for m in result.moves],
        "changed_servers": result.changed_servers,
        "dry_run": dry_run,
        "kept": moved.kept if moved else [],
        "started": moved.started if moved else [],
        "stopped": moved.stopped if moved else [],
    }
    if moved is not None and duration_s > 0:
        load = loadtest(
            plan=moved.deployment.plan_uri or moved.deployment.plan_path,
            deployment=deployment,
            store=store_uri,
            duration_s=duration_s,
            modes=["closed"],
        )
        summary |= {k: load.get(k) for k in ("requests_per_s", "error_rate", "p90_ms")}
    summary["wall_seconds"] = round(time.perf_counter() - started, 3)
    create_markdown_artifact(
        key="myriad-rebalance", markdown=rebalance_markdown(deployment, result, summary),
        description=f"Rebalance of {deployment}: cost before and after, moves, traffic",
    )  # fmt: skip
    return summary


def rebalance_markdown(deployment: str, result, summary: dict) -> str:
    lines = [
        f"# Rebalance of `{deployment}`" + (" (dry run)" if summary["dry_run"] else ""),
        "",
        f"Plan `{result.plan_before}` → `{result.plan.plan_id}`",
        "",
        f"- cost per hour: ${result.cost_before:.4f} → ${result.cost_after:.4f} "
        f"(a fresh solve: ${result.fresh_cost:.4f})",
        f"- replica moves: {len(result.moves)}; servers replaced: "
        f"{', '.join(result.changed_servers) or 'none'}",
    ]
    if "error_rate" in summary:
        lines.append(
            f"- load test after: {summary['requests_per_s']:.1f} requests/s, error rate "
            f"{summary['error_rate']:.4f}, P90 {summary['p90_ms']} ms"
        )
    lines += ["", "## Planned against observed", "", "| model | planned rps | observed rps |",
              "|---|---|---|"]  # fmt: skip
    seen: set[str] = set()
    for row in [*result.busiest, *result.most_misplanned]:
        if row.model_id not in seen:
            seen.add(row.model_id)
            lines.append(f"| {row.model_id} | {row.planned_rps:.3f} | {row.observed_rps:.3f} |")
    lines += ["", "## Moves", ""]
    if result.moves:
        lines += ["| model | from | to |", "|---|---|---|"]
        lines += [
            f"| {m.model_id} | {m.source or '(new)'} | {m.target or '(removed)'} |"
            for m in result.moves
        ]
    else:
        lines.append("No replica changed server.")
    return "\n".join(lines)
