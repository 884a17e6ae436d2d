"""The pipeline's report: the reference's results-table columns plus cost per model-hour and
per million requests, as a Prefect table artifact, markdown, and JSON in the store."""

from __future__ import annotations

import json
import time

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from packing.contracts import Plan
from serving.store import open_store


def summarize(plan: Plan, load: dict) -> dict:
    models = plan.model_ids()
    per_server = [len(s.model_ids) for s in plan.servers]
    rnd = load["random"]
    seq = load["sequential"]
    rps = rnd["requests_per_s"]
    cost = plan.cost_per_hour
    return {
        "plan_id": plan.plan_id,
        "instances": len(plan.instances),
        "instance_types": sorted({i.type for i in plan.instances}),
        "servers": len(plan.servers),
        "models": len(models),
        "models_per_server_min": min(per_server) if per_server else 0,
        "models_per_server_max": max(per_server) if per_server else 0,
        "sequential_ms_min": seq["min_ms"],
        "sequential_ms_max": seq["max_ms"],
        "random_ms_min": rnd["min_ms"],
        "random_ms_max": rnd["max_ms"],
        "requests_per_s": rps,
        "p50_ms": rnd.get("p50_ms"),
        "p90_ms": rnd.get("p90_ms"),
        "p95_ms": rnd.get("p95_ms"),
        "p99_ms": rnd.get("p99_ms"),
        "error_rate": rnd["error_rate"],
        "errors": rnd["errors"],
        "concurrency": rnd["concurrency"],
        "duration_s": rnd["duration_s"],
        "cost_per_hour": cost,
        "lower_bound_cost_per_hour": plan.lower_bound_cost_per_hour,
        "cost_per_model_hour": cost / len(models) if models else None,
        # At the measured rate, sustained for an hour.
        "cost_per_million_requests": cost / (rps * 3600) * 1e6 if rps else None,
    }


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def to_markdown(summary: dict) -> str:
    lines = ["# Myriad pipeline report", "", "| figure | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in summary.items()]
    return "\n".join(lines) + "\n"


@task(name="publish-report", cache_policy=NO_CACHE)
def publish_report(plan_json: str, load: dict, store_uri: str | None) -> dict:
    import msgspec

    plan = msgspec.json.decode(plan_json, type=Plan)
    summary = summarize(plan, load)
    create_table_artifact(
        key="myriad-summary",
        table=[{"figure": k, "value": _fmt(v)} for k, v in summary.items()],
        description=f"Load test of plan {plan.plan_id}",
    )
    create_markdown_artifact(key="myriad-report", markdown=to_markdown(summary))
    store = open_store(store_uri)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    store.put_bytes(
        f"reports/{run_id}/report.json",
        json.dumps({"summary": summary, "load": load}, indent=2).encode(),
    )
    store.put_bytes(f"reports/{run_id}/report.md", to_markdown(summary).encode())
    summary["report_uri"] = store.url_for(f"reports/{run_id}/report.json")
    return summary
