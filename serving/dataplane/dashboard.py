"""The Grafana dashboard of a deployment, generated from the metric names the servers export
(:mod:`serving.dataplane.metrics`), so the two cannot drift apart: per-model request rate,
latency and errors as top-K (a 3,000-model fleet stays readable), per-server load against its
plan, and cost per model-hour and per million requests. ``infra/grafana/myriad.json`` is its
output (kept in step by a test); import it into Grafana with a Prometheus data source that
scrapes the servers (labels ``myriad_deployment`` and ``myriad_server``, as the runtimes'
``file_sd`` targets carry)."""

from __future__ import annotations

import json
from typing import Any

REQUESTS = "myriad_requests_total"
LATENCY = "myriad_request_seconds"
PLANNED_COMPUTE = "myriad_planned_compute_utilization"
COST = "myriad_server_cost_per_hour"
MODELS = "myriad_models"
QUEUE = "myriad_queue_depth"
MEMORY = "myriad_process_resident_bytes"
# Every metric a panel reads: a test checks the servers export each one.
METRICS = (REQUESTS, LATENCY, PLANNED_COMPUTE, COST, MODELS, QUEUE, MEMORY)

SELECTOR = 'myriad_deployment="$deployment"'


def queries(top_k: int = 15, window: str = "5m") -> dict[str, list[str]]:
    """Each panel's PromQL, by panel title."""
    s = SELECTOR
    ok = f'{s},status="200"'
    return {
        f"Busiest {top_k} models: requests/s": [
            f"topk({top_k}, sum by (model) (rate({REQUESTS}{{{s}}}[{window}])))"
        ],
        f"Slowest {top_k} models: P90 latency (s)": [
            f"topk({top_k}, histogram_quantile(0.9, sum by (model, le) "
            f"(rate({LATENCY}_bucket{{{s}}}[{window}]))))"
        ],
        f"Top {top_k} models by errors/s": [
            f'topk({top_k}, sum by (model) (rate({REQUESTS}{{{s},status!="200"}}[{window}])))'
        ],
        "Per server: requests/s": [f"sum by (myriad_server) (rate({REQUESTS}{{{s}}}[{window}]))"],
        "Per server: request-seconds per second against planned compute": [
            f"sum by (myriad_server) (rate({LATENCY}_sum{{{s}}}[{window}]))",
            f"sum by (myriad_server) ({PLANNED_COMPUTE}{{{s}}})",
        ],
        "Cost per model-hour ($)": [f'sum({COST}{{{s}}}) / sum({MODELS}{{{s},state="ready"}})'],
        "Cost per million requests ($)": [
            f"sum({COST}{{{s}}}) / (sum(rate({REQUESTS}{{{ok}}}[{window}])) * 3600) * 1e6"
        ],
        "Queue depth and resident memory (GiB) per server": [
            f"sum by (myriad_server) ({QUEUE}{{{s}}})",
            f"sum by (myriad_server) ({MEMORY}{{{s}}}) / 2^30",
        ],
    }


def dashboard(top_k: int = 15, window: str = "5m") -> dict[str, Any]:
    panels = []
    for index, (title, exprs) in enumerate(queries(top_k, window).items()):
        stat = title.startswith("Cost")
        panels.append(
            {
                "id": index + 1,
                "title": title,
                "type": "stat" if stat else "timeseries",
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"x": (index % 2) * 12, "y": (index // 2) * 8, "w": 12, "h": 8},
                "targets": [
                    {
                        "refId": chr(ord("A") + n),
                        "expr": expr,
                        "legendFormat": "{{model}}{{myriad_server}}",
                    }
                    for n, expr in enumerate(exprs)
                ],
            }
        )
    return {
        "title": "Myriad: models, servers and cost",
        "uid": "myriad-deployment",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {
                    "name": "deployment",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": f"label_values({REQUESTS}, myriad_deployment)",
                    "refresh": 2,
                },
            ]
        },
        "panels": panels,
    }


def dashboard_json(top_k: int = 15) -> str:
    return json.dumps(dashboard(top_k), indent=2) + "\n"
