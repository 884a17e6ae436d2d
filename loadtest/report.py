"""The load-test report: the reference's results-table columns plus cost per model-hour and
per million requests, the throughput-latency curve, the latency CDF and the load per server;
as report.json, report.md and PNGs (:mod:`tasks.report` publishes them to the store and as
Prefect artifacts). With an on-demand tier (or once an answer met a cold start) it shows warm
and cold latencies apart and the cold fraction next to the plan's promise."""

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
        **cold_summary(plan, main),
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


COLD_KEYS = (
    "cold_requests",
    "warm_requests",
    "cold_fraction",
    *(f"{side}_{q}_ms" for side in ("warm", "cold") for q in ("p50", "p90", "p99", "max")),
)


def has_on_demand_tier(plan: Plan) -> bool:
    return plan.cold_fraction > 0 or any(s.on_demand_model_ids for s in plan.servers)


def cold_summary(plan: Plan, main: dict) -> dict:
    """The main run's answers that met a cold start apart from the warm ones (count, fraction,
    P50/P90/P99 and the slowest), beside the plan's promise (``plan_cold_fraction``, the
    expected fraction of requests that meet a cold start; ``plan_cold_start_seconds``, the
    longest load of an on-demand model). Empty for a plan without an on-demand tier whose
    answers met none, so those reports keep their columns."""
    if not main.get("cold_requests") and not has_on_demand_tier(plan):
        return {}
    return {
        **{key: main.get(key) for key in COLD_KEYS},
        "plan_cold_fraction": plan.cold_fraction,
        "plan_cold_start_seconds": plan.cold_start_seconds,
    }


def results_row(summary: dict) -> dict:
    """The reference's results table, one row; with cold figures (see :func:`cold_summary`)
    the warm and cold P50/P90/P99 and the cold fraction against the plan's."""

    def span(low: float | None, high: float | None) -> str:
        return "-" if low is None else f"{low:.1f}-{high:.1f} ms"

    return {
        "instances": summary["instances"],
        "models": summary["models"],
        "sequential latency": span(summary["sequential_ms_min"], summary["sequential_ms_max"]),
        "random latency": span(summary["random_ms_min"], summary["random_ms_max"]),
        "throughput (requests/s)": format_value(summary["requests_per_s"]),
        "P90": "-" if summary["p90_ms"] is None else f"{summary['p90_ms']:.1f} ms",
        **_cold_columns(summary),
        f"{summary['price'].replace('_', '-')} cost per hour": f"${summary['cost_per_hour']:.2f}",
        "cost per model-hour": _money(summary["cost_per_model_hour"]),
        "cost per million requests": _money(summary["cost_per_million_requests"]),
    }


def _cold_columns(summary: dict) -> dict:
    if "cold_requests" not in summary:
        return {}

    def spread(side: str) -> str:
        values = [summary.get(f"{side}_p{p}_ms") for p in (50, 90, 99)]
        if values[0] is None:
            return "-"
        return " / ".join(f"{v:.1f}" for v in values) + " ms"

    fraction = summary.get("cold_fraction") or 0.0
    return {
        "warm P50 / P90 / P99": spread("warm"),
        "cold P50 / P90 / P99": spread("cold"),
        "cold fraction (plan)": f"{fraction:.2%} ({summary['plan_cold_fraction']:.2%})",
    }


def cold_rows(summary: dict) -> list[dict]:
    """Warm answers, cold answers and the plan's promise, one row each, for a table; empty
    without cold figures."""
    if "cold_requests" not in summary:
        return []
    fraction = summary.get("cold_fraction") or 0.0
    rows = []
    for side in ("warm", "cold"):
        rows.append(
            {
                "answers": side,
                "count": summary.get(f"{side}_requests"),
                "fraction": f"{fraction if side == 'cold' else 1.0 - fraction:.2%}",
                **{f"P{p} ms": summary.get(f"{side}_p{p}_ms") for p in (50, 90, 99)},
                "slowest ms": summary.get(f"{side}_max_ms"),
            }
        )
    cold_start = summary.get("plan_cold_start_seconds") or 0.0
    rows.append(
        {
            "answers": "plan's promise",
            "count": None,
            "fraction": f"{summary.get('plan_cold_fraction') or 0.0:.2%}",
            "P50 ms": None,
            "P90 ms": None,
            "P99 ms": None,
            # The plan bounds the load; a cold answer adds its wait and forward to it.
            "slowest ms": f"load <= {cold_start * 1000:.0f}" if cold_start else None,
        }
    )
    return rows


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
    if "cold_requests" in summary:
        lines += [
            "## Cold starts",
            "",
            "Answers that met a cold start (the server loaded their model for them), apart "
            "from the warm ones, beside what the plan promised: the fraction it expects "
            "under the fleet's traffic (a test drawn another way, as by --zipf, meets "
            "another) and the longest load of an on-demand model.",
            "",
        ]
        lines += _table(cold_rows(summary)) + [""]
    lines += ["## Figures", "", "| figure | value |", "|---|---|"]
    lines += [f"| {key} | {format_value(value)} |" for key, value in summary.items()]
    if load and load.get("sweep"):
        target_ms, max_error_rate = _settings(load)
        lines += [
            "",
            "## Throughput-latency sweep",
            "",
            f"Every level run, in order; the sweep stops at the first past the targets (P90 "
            f"{target_ms:g} ms, error rate {max_error_rate:.0%}).",
            "",
        ]
        lines += _table(sweep_rows(load))
    if load and load.get("slowest_models"):
        lines += ["", "## Slowest models (P90)", ""]
        lines += _table([{"model": m, **v} for m, v in load["slowest_models"].items()])
    errors = summary.get("errors") or {}
    if errors:
        lines += ["", "## Errors by cause", ""]
        lines += _table([{"cause": k, "count": v} for k, v in sorted(errors.items())])
    return "\n".join(lines) + "\n"


# The percentiles the CDF marks and labels its axis with.
CDF_PERCENTILES = (50, 90, 99, 99.9)


def _settings(load: dict) -> tuple[float, float]:
    """The sweep's latency target (P90, ms) and error-rate bound the load test ran with."""
    settings = load.get("settings") or {}
    return settings.get("latency_target_ms", 100.0), settings.get("max_error_rate", 0.01)


def point_flags(point: dict, load: dict) -> dict[str, str]:
    """Why a sweep level's figures are not to be quoted, keyed by kind: ``past_target`` (its
    error rate or P90 broke the bound the sweep ran with) and ``saturated`` (the load
    generator, not the servers, was the bottleneck); empty for a sound level."""
    target_ms, max_error_rate = _settings(load)
    past = []
    if point.get("error_rate", 0.0) > max_error_rate:
        past.append(f"errors {point['error_rate']:.1%} > {max_error_rate:.0%}")
    p90 = point.get("p90_ms")
    if p90 is None:
        past.append("no request answered")
    elif p90 > target_ms:
        past.append(f"P90 {p90:.1f} ms > target {target_ms:g} ms")
    flags = {"past_target": "; ".join(past)} if past else {}
    generator = point.get("generator") or {}
    if generator.get("saturated"):
        reasons = ", ".join(generator.get("reasons") or []) or "see report.json"
        flags["saturated"] = f"generator saturated ({reasons})"
    return flags


def sweep_rows(load: dict) -> list[dict]:
    """The whole throughput-latency curve, one row per concurrency level the sweep ran, for a
    table: concurrency, requests/s, P50/P90/P99 ms, error rate and a status: "ok" or "past
    target: <why>", "quoted in the summary" for the level the summary's figures come from (the
    highest throughput within the targets), and "generator saturated (<why>)" where the load
    generator, not the servers, was the bottleneck. Empty without a sweep."""
    best = load.get("sweep_best") or {}
    rows = []
    for point in load.get("sweep") or []:
        flags = point_flags(point, load)
        parts = [f"past target: {flags['past_target']}" if "past_target" in flags else "ok"]
        if point.get("concurrency") == best.get("concurrency"):
            parts.append("quoted in the summary")
        if "saturated" in flags:
            parts.append(flags["saturated"])
        status = "; ".join(parts)
        rows.append(
            {
                "concurrency": point["concurrency"],
                "requests/s": point.get("requests_per_s"),
                "P50 ms": point.get("p50_ms"),
                "P90 ms": point.get("p90_ms"),
                "P99 ms": point.get("p99_ms"),
                "error rate": point.get("error_rate"),
                "status": status,
            }
        )
    return rows


def _main_summary(load: dict) -> dict:
    """The summary of the run the CDF and per-server figures were taken from."""
    main = load.get("main")
    if main == "sweep":
        return load.get("sweep_best") or {}
    return load.get(main) or {} if main else {}


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot, imported late (it is slow to import)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_latency_figure(load: dict):  # noqa: ANN201 - a matplotlib Figure
    """The sweep: P50, P90 and P99 against requests/s, one point per concurrency level
    (annotated), the P90 target as a horizontal line, and the levels not to be quoted marked:
    past the target (error rate or P90) and generator-saturated."""
    plt = _pyplot()
    points = load["sweep"]
    target_ms, max_error_rate = _settings(load)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    xs = [p["requests_per_s"] for p in points]
    for key, style in (("p50_ms", "o-"), ("p90_ms", "s-"), ("p99_ms", "^-")):
        shown = [(x, p[key]) for x, p in zip(xs, points, strict=True) if p.get(key) is not None]
        if shown:
            axis.plot(*zip(*shown, strict=True), style, markersize=4, label=key[:-3].upper())
    axis.axhline(target_ms, color="red", linestyle="--", linewidth=1)
    axis.plot([], [], "r--", linewidth=1, label=f"P90 target {target_ms:g} ms")
    flagged = {"past_target": [], "saturated": []}
    for x, p in zip(xs, points, strict=True):
        y = p.get("p90_ms") or 0.0
        axis.annotate(
            f"c={p['concurrency']}",
            (x, y),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=7,
        )
        for kind in point_flags(p, load):
            flagged[kind].append((x, y))
    if flagged["past_target"]:
        axis.scatter(
            *zip(*flagged["past_target"], strict=True),
            marker="X",
            s=90,
            color="red",
            zorder=3,
            label=f"past target (P90 > {target_ms:g} ms or errors > {max_error_rate:.0%})",
        )
    if flagged["saturated"]:
        axis.scatter(
            *zip(*flagged["saturated"], strict=True),
            marker="o",
            s=160,
            facecolors="none",
            edgecolors="black",
            linewidths=1.5,
            zorder=3,
            label="load generator saturated",
        )
    axis.set_ylim(bottom=0)
    axis.set_xlabel("throughput, requests/s")
    axis.set_ylabel("latency, ms")
    axis.set_title("throughput-latency sweep (c = concurrent clients; marks on P90)")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def _percentile_ms(load: dict, percentile: float) -> float | None:
    """The latency at ``percentile`` of the main run: its summary's figure where it has one,
    else read off the CDF (the first point at or past it)."""
    summary = _main_summary(load)
    key = f"p{percentile:g}_ms".replace(".", "_")
    if summary.get(key) is not None:
        return summary[key]
    for ms, fraction in load.get("cdf_ms") or []:
        if fraction >= percentile / 100 - 1e-9:
            return ms
    return None


def latency_cdf_figure(load: dict):  # noqa: ANN201 - a matplotlib Figure
    """The latency distribution of the main run with its tail stretched out: the y axis is the
    fraction of requests slower than x on a log scale, labelled by percentile (50% ... 99.9%),
    so P99 sits as far from P90 as P90 from P50; P50, P90 and P99 marked with their values.
    Where answers met cold starts, the warm and the cold ones are drawn apart too (dashed)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))

    # Fractions slower than each latency; the last point (the maximum, none slower) cannot
    # sit on a log scale and is marked on its own at the top.
    def slower(cdf: list) -> list[tuple[float, float]]:
        return [(ms, 1.0 - fraction) for ms, fraction in cdf if fraction < 1.0]

    points = slower(load["cdf_ms"])
    sides = {side: slower(load.get(f"cdf_ms_{side}") or []) for side in ("warm", "cold")}
    everything = points + sides["warm"] + sides["cold"]
    top = min([1 - CDF_PERCENTILES[-1] / 100, *(y for _, y in everything)]) / 2
    if points:
        axis.plot(*zip(*points, strict=True), color="tab:blue", label="latency distribution")
    for (side, side_points), colour in zip(sides.items(), ("tab:cyan", "tab:purple"), strict=True):
        if side_points:
            count = _main_summary(load).get(f"{side}_requests")
            axis.plot(
                *zip(*side_points, strict=True),
                color=colour,
                linestyle="--",
                label=f"{side} answers" + (f" ({count:,})" if count is not None else ""),
            )
    slowest = max(ms for ms, _ in load["cdf_ms"])
    axis.plot([slowest], [top], "^", color="black", label=f"slowest {slowest:.1f} ms")
    colours = {50: "tab:green", 90: "tab:orange", 99: "tab:red"}
    for percentile, colour in colours.items():
        ms = _percentile_ms(load, percentile)
        if ms is None:
            continue
        slower = 1 - percentile / 100
        axis.axvline(ms, color=colour, linestyle=":", linewidth=1)
        axis.plot([ms], [slower], "o", color=colour, label=f"P{percentile} {ms:.1f} ms")
        axis.annotate(
            f"P{percentile} {ms:.1f} ms",
            (ms, slower),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
            color=colour,
        )
    axis.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axis.xaxis.set_major_formatter(plain)
    # Labelled minor ticks at 2, 3 and 5 per decade: a narrow range gets numbers too.
    axis.xaxis.set_minor_locator(LogLocator(base=10, subs=(2, 3, 5)))
    axis.xaxis.set_minor_formatter(plain)
    axis.tick_params(axis="x", which="minor", labelsize=7)
    axis.set_yscale("log")
    ticks = [1 - p / 100 for p in CDF_PERCENTILES]
    axis.set_yticks(ticks)
    axis.set_yticklabels([f"{p:g}%" for p in CDF_PERCENTILES])
    axis.yaxis.set_minor_formatter(NullFormatter())
    axis.set_ylim(top / 1.5, 1.0)
    axis.invert_yaxis()
    axis.set_xlabel("latency, ms (log scale)")
    axis.set_ylabel("percentile (log scale of the fraction slower)")
    axis.set_title(f"latency distribution ({load.get('main')}): the tail reads upwards")
    axis.grid(True, which="major", alpha=0.3)
    axis.legend(fontsize=8, loc="upper left")
    return figure


# Past this many servers the per-server figure labels every n-th only.
MAX_SERVER_LABELS = 150


def per_server_figure(load: dict, plan: Plan | None = None):  # noqa: ANN201 - a matplotlib Figure
    """Requests each server answered in the main run, one horizontal bar per plan server id
    (in plan order, with its model count; a server that answered none shows as an empty bar),
    the mean as a line."""
    plt = _pyplot()
    counts: dict[str, int] = dict(load["per_server_requests"])
    models: dict[str, int] = {}
    if plan is not None:
        order = [s.id for s in plan.servers]
        models = {s.id: len(s.model_ids) for s in plan.servers}
        # Joined names (servers behind one address) and unknown addresses go last.
        names = [n for n in order if n in counts] + [n for n in counts if n not in models]
        names += [n for n in order if n not in counts]
        counts = {n: counts.get(n, 0) for n in names}
    else:
        names = sorted(counts)
    height = min(max(3.0, 0.2 * len(names) + 1.2), 60.0)
    figure, axis = plt.subplots(figsize=(7, height))
    ys = range(len(names))
    values = [counts[n] for n in names]
    bars = axis.barh(ys, values, color="tab:blue")
    if len(names) <= MAX_SERVER_LABELS:
        axis.bar_label(bars, labels=[f"{v:,}" for v in values], padding=2, fontsize=7)
        axis.set_xlim(0, max(values, default=0) * 1.12 or 1)
    step = max(1, -(-len(names) // MAX_SERVER_LABELS))
    labels = [
        f"{n} ({models[n]} model{'' if models[n] == 1 else 's'})" if n in models else n
        for n in names
    ]
    axis.set_yticks(list(ys)[::step])
    axis.set_yticklabels(labels[::step], fontsize=7)
    axis.set_ylim(len(names) - 0.5, -0.5)  # the plan's first server at the top
    mean = sum(values) / len(values) if values else 0.0
    axis.axvline(mean, color="black", linestyle="--", linewidth=1)
    axis.set_xlabel("requests answered")
    axis.set_ylabel("plan server id")
    plural = "" if len(names) == 1 else "s"
    axis.set_title(
        f"load per server ({load.get('main')}): {len(names)} server{plural}, "
        f"mean {mean:,.0f} (dashed)",
        fontsize=10,
    )
    return figure


def plots(load: dict, plan: Plan | None = None) -> dict[str, bytes]:
    """PNGs: the throughput-latency curve (with a sweep), the latency CDF, requests per
    server (named by the plan's server ids)."""
    plt = _pyplot()
    figures: dict[str, bytes] = {}

    def save(name: str, figure: object) -> None:
        buffer = io.BytesIO()
        figure.tight_layout()
        figure.savefig(buffer, format="png", dpi=100)
        plt.close(figure)
        figures[name] = buffer.getvalue()

    if load.get("sweep"):
        save("throughput_latency.png", throughput_latency_figure(load))
    if load.get("cdf_ms"):
        save("latency_cdf.png", latency_cdf_figure(load))
    if load.get("per_server_requests"):
        save("per_server.png", per_server_figure(load, plan))
    return figures


def report_files(plan: Plan, load: dict) -> tuple[dict, dict[str, bytes]]:
    summary = summarize(plan, load)
    files = {
        "report.json": json.dumps({"summary": summary, "load": load}, indent=2).encode(),
        "report.md": to_markdown(summary, load).encode(),
        **plots(load, plan),
    }
    return summary, files


def write_report(plan: Plan, load: dict, out: Path) -> dict:
    from packing.io import write_atomic

    summary, files = report_files(plan, load)
    for name, data in files.items():
        write_atomic(out / name, data)
    return summary
