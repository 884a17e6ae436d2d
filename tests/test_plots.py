"""The report's and the packer's plots say what they show: servers by plan id, the latency
percentiles marked, the sweep's target and unquotable levels marked, the packing's resources
named; and the sweep as a table with every level."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from loadtest import generator as loadgen
from loadtest.report import (
    latency_cdf_figure,
    per_server_figure,
    plots,
    summarize,
    sweep_rows,
    throughput_latency_figure,
    to_markdown,
)
from loadtest.runner import LoadSettings, by_server_id
from packing.contracts import Plan, PlannedInstance, PlannedServer
from packing.plot import PER_ROW, plan_figure, plot_plan
from packing.solver import solve
from serving.deployments import Deployment
from tests.test_packing import instance_type, model, problem_of

SERVERS = ["i000-g4dn-xlarge-d0", "i001-inf1-6xlarge-d0", "i001-inf1-6xlarge-d1"]


@pytest.fixture(autouse=True)
def close_figures() -> Iterator[None]:
    yield
    plt.close("all")


def plan_of(server_ids: list[str]) -> Plan:
    instances = sorted({s.rsplit("-d", 1)[0] for s in server_ids})
    return Plan(
        plan_id="plan-plots",
        created_at="2026-11-27T00:00:00Z",
        problem="plots",
        instances=[
            PlannedInstance(id=i, type="x.large", processor="gpu", price_per_hour=1.0)
            for i in instances
        ],
        servers=[
            PlannedServer(
                id=s,
                instance=s.rsplit("-d", 1)[0],
                device=int(s.rsplit("-d", 1)[1]),
                processor="gpu",
                model_ids=[f"m{k}-{n}" for k in range(n + 1)],
                memory_bytes=1,
                memory_capacity_bytes=2,
                compute_utilization=0.1,
            )
            for n, s in enumerate(server_ids)
        ],
        cost_per_hour=2.0,
        lower_bound_cost_per_hour=2.0,
        gap=0.0,
        solver_status="optimal",
        solve_seconds=0.1,
    )


def recorder(latencies_ms: list[float], servers: list[str]) -> loadgen.Recorder:
    """A run as the generator records it: each request's model, server base URL, latency."""
    rec = loadgen.Recorder(duration_s=10.0)
    for i, ms in enumerate(latencies_ms):
        rec.record(f"m{i % 7}", servers[i % len(servers)], ms / 1000)
    return rec


def load_dict(
    plan: Plan, deployment: Deployment, *, sweep: list[dict] | None = None, target: float = 100
) -> dict:
    """A load dict as :func:`loadtest.runner.run_load_test` makes it, from a recorder fed a
    lognormal latency distribution (median 20 ms, a long tail)."""
    rng = random.Random(1)
    latencies = [rng.lognormvariate(3.0, 0.6) for _ in range(20_000)]
    # The last server of the plan answers nothing: it must still be in the figure.
    urls = [deployment.servers[s] for s in SERVERS[:-1]]
    rec = recorder(latencies, urls)
    settings = LoadSettings(modes=["closed"], latency_target_ms=target)
    load = {
        "settings": {
            "latency_target_ms": settings.latency_target_ms,
            "max_error_rate": settings.max_error_rate,
        },
        "closed": rec.summary("closed", concurrency=8),
        "main": "closed",
        "cdf_ms": rec.cdf_ms(),
        "per_server_requests": by_server_id(plan, deployment, rec.per_server),
    }
    if sweep is not None:
        load["sweep"] = sweep
        load["sweep_best"] = max(
            (p for p in sweep if p["within_target"]), key=lambda p: p["requests_per_s"]
        )
    return load


def point(concurrency: int, rps: float, p90: float, errors: float = 0.0, saturated=False):
    return {
        "mode": "closed",
        "concurrency": concurrency,
        "requests_per_s": rps,
        "p50_ms": p90 / 2,
        "p90_ms": p90,
        "p99_ms": p90 * 1.5,
        "error_rate": errors,
        "within_target": p90 <= 100 and errors <= 0.01,
        "generator": {
            "saturated": saturated,
            "reasons": ["scheduling lag p99 12.0 ms"] if saturated else [],
        },
    }


SWEEP = [
    point(1, 50, 20),
    point(2, 95, 22),
    point(4, 180, 30, saturated=True),
    point(8, 300, 60),
    point(16, 320, 140, errors=0.02),
]


@pytest.fixture
def deployment() -> Deployment:
    return Deployment(
        name="t",
        plan_id="plan-plots",
        runtime="local",
        servers={s: f"http://127.0.0.1:{40001 + n}" for n, s in enumerate(SERVERS)},
    )


def test_requests_per_server_are_keyed_by_plan_server_id(deployment: Deployment) -> None:
    plan = plan_of(SERVERS)
    counts = by_server_id(
        plan, deployment, {"http://127.0.0.1:40001": 5, "http://127.0.0.1:40002": 7}
    )
    assert counts == {SERVERS[0]: 5, SERVERS[1]: 7, SERVERS[2]: 0}
    # Two servers behind one address are named together; a stray address keeps its URL.
    shared = Deployment(
        name="t",
        plan_id="plan-plots",
        runtime="local",
        servers={s: "http://gw:8080/" for s in SERVERS},
    )
    counts = by_server_id(plan, shared, {"http://gw:8080": 9, "http://elsewhere:1": 1})
    assert counts == {" + ".join(SERVERS): 9, "http://elsewhere:1": 1}


def test_per_server_plot_names_servers_by_plan_id(deployment: Deployment) -> None:
    plan = plan_of(SERVERS)
    load = load_dict(plan, deployment)
    figure = per_server_figure(load, plan)
    axis = figure.axes[0]
    labels = [t.get_text() for t in axis.get_yticklabels()]
    assert labels == [
        f"{SERVERS[0]} (1 model)",
        f"{SERVERS[1]} (2 models)",
        f"{SERVERS[2]} (3 models)",
    ]
    assert not any("127.0.0.1" in label or "40001" in label for label in labels)
    widths = [bar.get_width() for bars in axis.containers for bar in bars]
    assert widths[-1] == 0 and sum(widths) == 20_000  # the idle server is shown, empty
    # Without the plan the keys (server ids already) still label the bars.
    bare = per_server_figure(load)
    assert [t.get_text() for t in bare.axes[0].get_yticklabels()] == sorted(SERVERS)


def test_latency_cdf_marks_p50_p90_p99_and_labels_the_tail(deployment: Deployment) -> None:
    plan = plan_of(SERVERS)
    load = load_dict(plan, deployment)
    axis = latency_cdf_figure(load).axes[0]
    assert axis.get_yscale() == "log"
    assert [t.get_text() for t in axis.get_yticklabels()] == ["50%", "90%", "99%", "99.9%"]
    texts = {t.get_text() for t in axis.texts}
    for p in (50, 90, 99):
        ms = load["closed"][f"p{p}_ms"]
        assert f"P{p} {ms:.1f} ms" in texts
        # The mark sits where the curve is: at the latency, at the fraction slower.
        marks = [
            line
            for line in axis.lines
            if line.get_label().startswith(f"P{p} ") and line.get_marker() == "o"
        ]
        assert len(marks) == 1
        assert marks[0].get_xdata()[0] == pytest.approx(ms)
        assert marks[0].get_ydata()[0] == pytest.approx(1 - p / 100)
    # The tail reads upwards: 99.9% above 50%.
    low, high = axis.get_ylim()
    assert low > high


def test_sweep_plot_draws_the_target_and_marks_unquotable_levels(deployment: Deployment) -> None:
    plan = plan_of(SERVERS)
    load = load_dict(plan, deployment, sweep=SWEEP)
    axis = throughput_latency_figure(load).axes[0]
    targets = [
        line
        for line in axis.lines
        if list(line.get_ydata()) == [100, 100] and line.get_linestyle() == "--"
    ]
    assert targets, "no horizontal line at the 100 ms target"
    legend = [t.get_text() for t in axis.get_legend().get_texts()]
    assert "P90 target 100 ms" in legend
    assert any(label.startswith("past target") for label in legend)
    assert "load generator saturated" in legend
    past, saturated = (
        next(c for c in axis.collections if c.get_label().startswith(prefix))
        for prefix in ("past target", "load generator")
    )
    assert [tuple(xy) for xy in past.get_offsets()] == [(320, 140)]
    assert [tuple(xy) for xy in saturated.get_offsets()] == [(180, 30)]


def test_sweep_plot_has_no_flag_marks_when_every_level_is_sound(deployment: Deployment) -> None:
    load = load_dict(plan_of(SERVERS), deployment, sweep=SWEEP[:2])
    axis = throughput_latency_figure(load).axes[0]
    assert not axis.collections


def test_sweep_rows_hold_every_level_and_say_which_to_distrust(deployment: Deployment) -> None:
    plan = plan_of(SERVERS)
    load = load_dict(plan, deployment, sweep=SWEEP)
    rows = sweep_rows(load)
    assert [r["concurrency"] for r in rows] == [1, 2, 4, 8, 16]
    assert list(rows[0]) == [
        "concurrency",
        "requests/s",
        "P50 ms",
        "P90 ms",
        "P99 ms",
        "error rate",
        "status",
    ]
    assert rows[3]["requests/s"] == 300 and rows[3]["P90 ms"] == 60
    assert rows[0]["status"] == "ok"
    assert rows[2]["status"].startswith("ok; generator saturated (scheduling lag")
    assert rows[3]["status"] == "ok; quoted in the summary"
    assert rows[4]["status"] == "past target: errors 2.0% > 1%; P90 140.0 ms > target 100 ms"
    assert sweep_rows({}) == []
    markdown = to_markdown(summarize(plan, load), load)
    for row in rows:
        assert f"| {row['status']} |" in markdown
    assert "P90 100 ms, error rate 1%" in markdown


def test_report_plots_are_pngs(deployment: Deployment) -> None:
    plan = plan_of(SERVERS)
    files = plots(load_dict(plan, deployment, sweep=SWEEP), plan)
    assert set(files) == {"throughput_latency.png", "latency_cdf.png", "per_server.png"}
    assert all(data[:8] == b"\x89PNG\r\n\x1a\n" for data in files.values())


def packed(models: int, devices: int = 2, processor: str = "gpu"):
    problem = problem_of(
        [
            model(f"m{i:03d}", 0.5 + (i % 5) * 0.4, compute=0.02 * (i % 7), processor=processor)
            for i in range(models)
        ],
        [instance_type("g.x", 1.0, devices, 4, processor=processor)],
    )
    return problem, solve(problem, time_limit_s=5)


def legend_of(figure) -> list[str]:  # noqa: ANN001
    return [t.get_text() for legend in figure.legends for t in legend.get_texts()]


def test_plan_plot_names_resources_servers_and_model_counts(tmp_path: Path) -> None:
    problem, plan = packed(12)
    figure = plan_figure(problem, plan)
    axis = figure.axes[0]
    legend = legend_of(figure)
    assert legend[:2] == ["device memory", "compute"]
    assert "memory cap 100%" in legend and "compute cap 100%" in legend
    assert "host memory of the instance" not in legend  # a GPU plan has none
    ids = [s.id for s in plan.servers]
    assert [t.get_text() for t in axis.get_xticklabels()] == ids
    counts = [t.get_text() for t in axis.texts if t.get_text().isdigit()]
    assert counts == [str(len(s.model_ids)) for s in plan.servers]
    # Colour is the resource, not the model: two colours of bar, however many models.
    colours = {bar.get_facecolor() for bars in axis.containers for bar in bars}
    assert len(colours) == 2
    assert axis.get_ylabel().startswith("share used")
    out = plot_plan(problem, plan, tmp_path / "plan.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_plot_shows_host_memory_where_the_plan_has_it() -> None:
    problem, plan = packed(12, devices=1, processor="cpu")
    assert any(s.host_memory_bytes for s in plan.servers)
    assert "host memory of the instance" in legend_of(plan_figure(problem, plan))


def test_plan_plot_wraps_many_servers_onto_rows() -> None:
    problem, plan = packed(200, devices=4)
    assert len(plan.servers) > PER_ROW
    figure = plan_figure(problem, plan)
    rows = -(-len(plan.servers) // PER_ROW)
    assert len(figure.axes) == rows
    labelled = [t.get_text() for axis in figure.axes for t in axis.get_xticklabels()]
    assert labelled == [s.id for s in plan.servers]
