"""The load-test report: the reference's results-table columns plus cost per model-hour and
per million requests, the throughput-latency curve, the latency CDF and the load per server;
as report.json, report.md and PNGs (:mod:`tasks.report` publishes them to the store and as
Prefect artifacts)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from packing.contracts import Plan


def summarize(plan: Plan, load: dict) -> dict:
    models = plan.model_ids()
    per_server = [len(s.model_ids) for s in plan.servers]
    main_mode = load.get("main")
    main = load.get(main_mode) if main_mode in ("closed", "rate", "random") else None
    if main_mode == "sweep":
        # The level the runner chose and took its CDF and per-server figures from.
        main = {**load["sweep_best"], "mode": "sweep"}
    main = main or {}
    seq = load.get("sequential", {})
    rnd = load.get("random", {})
    rps = main.get("requests_per_s") or 0.0
    cost = plan.cost_per_hour
    generator = main.get("generator", {})
    return {
        "plan_id": plan.plan_id,
        "instances": len(plan.instances),
        "instance_types": sorted({i.type for i in plan.instances}),
        "servers": len(plan.servers),
        "models": len(models),
        "models_per_server_min": min(per_server) if per_server else 0,
        "models_per_server_max": max(per_server) if per_server else 0,
        "sequential_ms_min": seq.get("min_ms"),
        "sequential_ms_max": seq.get("max_ms"),
        "random_ms_min": rnd.get("min_ms"),
        "random_ms_max": rnd.get("max_ms"),
        "load_mode": main.get("mode"),
        "concurrency": main.get("concurrency"),
        "rate": main.get("rate"),
        "requests_per_s": rps,
        "p50_ms": main.get("p50_ms"),
        "p90_ms": main.get("p90_ms"),
        "p95_ms": main.get("p95_ms"),
        "p99_ms": main.get("p99_ms"),
        "error_rate": main.get("error_rate"),
        "errors": main.get("errors", {}),
        "duration_s": main.get("duration_s"),
        "generator_saturated": generator.get("saturated"),
        "generator_reasons": generator.get("reasons") or None,
        "price": plan.price,
        "cost_per_hour": cost,
        "lower_bound_cost_per_hour": plan.lower_bound_cost_per_hour,
        "cost_per_model_hour": cost / len(models) if models else None,
        # At the measured rate, sustained for an hour.
        "cost_per_million_requests": cost / (rps * 3600) * 1e6 if rps else None,
    }


def results_row(summary: dict) -> dict:
    """The reference's results table, one row."""

    def span(low: float | None, high: float | None) -> str:
        return "-" if low is None else f"{low:.1f}-{high:.1f} ms"

    return {
        "instances": summary["instances"],
        "models": summary["models"],
        "sequential latency": span(summary["sequential_ms_min"], summary["sequential_ms_max"]),
        "random latency": span(summary["random_ms_min"], summary["random_ms_max"]),
        "throughput (requests/s)": format_value(summary["requests_per_s"]),
        "P90": "-" if summary["p90_ms"] is None else f"{summary['p90_ms']:.1f} ms",
        f"{summary['price'].replace('_', '-')} cost per hour": f"${summary['cost_per_hour']:.2f}",
        "cost per model-hour": _money(summary["cost_per_model_hour"]),
        "cost per million requests": _money(summary["cost_per_million_requests"]),
    }


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}"


def format_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_value(r.get(c)) for c in columns) + " |" for r in rows]
    return lines


def to_markdown(summary: dict, load: dict | None = None) -> str:
    lines = ["# Myriad load-test report", ""]
    lines += _table([results_row(summary)]) + [""]
    if summary.get("generator_saturated"):
        reasons = {"reasons": summary.get("generator_reasons") or []}
        lines += [
            "**The load generator was saturated**: the figures measure the client, not the "
            f"servers ({'; '.join(reasons.get('reasons', [])) or 'see report.json'}). "
            "Use more --processes or a bigger machine.",
            "",
        ]
    lines += ["## Figures", "", "| figure | value |", "|---|---|"]
    lines += [f"| {key} | {format_value(value)} |" for key, value in summary.items()]
    if load and load.get("sweep"):
        lines += ["", "## Throughput-latency sweep", ""]
        lines += _table(
            [
                {
                    "concurrency": p["concurrency"],
                    "requests/s": p["requests_per_s"],
                    "P50 ms": p.get("p50_ms"),
                    "P90 ms": p.get("p90_ms"),
                    "P99 ms": p.get("p99_ms"),
                    "error rate": p["error_rate"],
                    "within target": p["within_target"],
                }
                for p in load["sweep"]
            ]
        )
    if load and load.get("slowest_models"):
        lines += ["", "## Slowest models (P90)", ""]
        lines += _table([{"model": m, **v} for m, v in load["slowest_models"].items()])
    errors = summary.get("errors") or {}
    if errors:
        lines += ["", "## Errors by cause", ""]
        lines += _table([{"cause": k, "count": v} for k, v in sorted(errors.items())])
    return "\n".join(lines) + "\n"


def plots(load: dict) -> dict[str, bytes]:
    """PNGs: the throughput-latency curve (with a sweep), the latency CDF, requests per
    server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: dict[str, bytes] = {}

    def save(name: str, figure: object) -> None:
        buffer = io.BytesIO()
        figure.tight_layout()
        figure.savefig(buffer, format="png", dpi=100)
        plt.close(figure)
        figures[name] = buffer.getvalue()

    if load.get("sweep"):
        figure, axis = plt.subplots(figsize=(6, 4))
        points = load["sweep"]
        for key, style in (("p50_ms", "o-"), ("p90_ms", "s-"), ("p99_ms", "^-")):
            axis.plot(
                [p["requests_per_s"] for p in points],
                [p.get(key) or 0 for p in points],
                style,
                label=key.removesuffix("_ms").upper(),
            )
        for p in points:
            axis.annotate(str(p["concurrency"]), (p["requests_per_s"], p.get("p90_ms") or 0))
        axis.set_xlabel("requests/s")
        axis.set_ylabel("latency, ms")
        axis.set_title("throughput-latency (labels: concurrent clients)")
        axis.legend()
        save("throughput_latency.png", figure)
    if load.get("cdf_ms"):
        figure, axis = plt.subplots(figsize=(6, 4))
        xs, ys = zip(*load["cdf_ms"], strict=True)
        axis.plot(xs, ys)
        axis.set_xscale("log")
        axis.set_xlabel("latency, ms")
        axis.set_ylabel("fraction of requests")
        axis.set_title(f"latency CDF ({load.get('main')})")
        axis.grid(True, which="both", alpha=0.3)
        save("latency_cdf.png", figure)
    if load.get("per_server_requests"):
        figure, axis = plt.subplots(figsize=(max(6, 0.3 * len(load["per_server_requests"])), 4))
        names = sorted(load["per_server_requests"])
        axis.bar(range(len(names)), [load["per_server_requests"][n] for n in names])
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels([n.rsplit(":", 1)[-1] for n in names], rotation=90, fontsize=7)
        axis.set_xlabel("server (port)")
        axis.set_ylabel("requests answered")
        axis.set_title(f"load per server ({load.get('main')})")
        save("per_server.png", figure)
    return figures


def report_files(plan: Plan, load: dict) -> tuple[dict, dict[str, bytes]]:
    summary = summarize(plan, load)
    files = {
        "report.json": json.dumps({"summary": summary, "load": load}, indent=2).encode(),
        "report.md": to_markdown(summary, load).encode(),
        **plots(load),
    }
    return summary, files


def write_report(plan: Plan, load: dict, out: Path) -> dict:
    from packing.io import write_atomic

    summary, files = report_files(plan, load)
    for name, data in files.items():
        write_atomic(out / name, data)
    return summary
