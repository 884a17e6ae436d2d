"""The load generator against real HTTP servers whose latency is known."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtest import generator as loadgen
from loadtest.report import write_report
from loadtest.runner import LoadSettings, run_load_test
from packing.contracts import Plan, PlannedInstance, PlannedServer
from serving.deployments import Deployment
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
MODELS = [f"m{i}" for i in range(10)]


def start(
    *latency_ms: float, cold_models: tuple[str, ...] = (), cold_ms: float = 0
) -> Iterator[str]:
    port = free_port()
    cold = (
        ["--cold-models", ",".join(cold_models), "--cold-ms", str(cold_ms)] if cold_models else []
    )
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests/sleep_server.py"),
            str(port),
            *map(str, latency_ms),
            *cold,
        ]
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/ping", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("sleep server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def uniform_server() -> Iterator[str]:
    """Answers after a uniform 10-50 ms."""
    yield from start(10, 50)


@pytest.fixture(scope="module")
def fast_server() -> Iterator[str]:
    yield from start()


# Models m0 and m1 meet a cold start on every request: 200 ms more, and the header says so.
COLD_MODELS = ("m0", "m1")


@pytest.fixture(scope="module")
def cold_server() -> Iterator[str]:
    yield from start(10, 50, cold_models=COLD_MODELS, cold_ms=200)


def targets(url: str) -> loadgen.Targets:
    return loadgen.Targets(routes={m: [f"{url}/predictions/{m}"] for m in MODELS})


def test_percentiles_match_a_known_distribution(uniform_server: str) -> None:
    bounds = loadgen.Bounds(duration_s=3.0)
    recorder = asyncio.run(
        loadgen.closed_loop(targets(uniform_server), loadgen.Shape(), bounds, concurrency=8)
    )
    summary = recorder.summary("closed")
    assert summary["completed"] > 300 and summary["errors"] == {}
    # Uniform on [10, 50] ms: the p-th percentile is 10 + 40 p / 100. Measured latency adds
    # the loopback round trip and timer slack (a few ms on a busy 2-core machine), never less.
    for p, slack in ((50, 6), (90, 6), (99, 12)):
        expected = 10 + 40 * p / 100
        assert expected - 0.5 <= summary[f"p{p}_ms"] <= expected + slack, (p, summary)
    assert summary["min_ms"] >= 10 * 0.999
    assert len(recorder.per_model) == len(MODELS)
    assert sum(recorder.per_server.values()) == summary["completed"]


def test_histograms_merge_across_processes_exactly() -> None:
    halves = [loadgen.Recorder(), loadgen.Recorder()]
    for ms in range(1, 1001):
        halves[ms % 2].record(f"m{ms % 3}", "s", ms / 1000)
    merged = loadgen.Recorder()
    for half in halves:
        merged.merge(json.loads(json.dumps(half.encode())))
    assert merged.completed == 1000
    assert merged.histogram.get_value_at_percentile(50) / 1000 == pytest.approx(500, rel=1e-3)
    assert merged.histogram.get_value_at_percentile(99) / 1000 == pytest.approx(990, rel=1e-3)
    assert sum(h.get_total_count() for h in merged.per_model.values()) == 1000


def test_runs_stop_at_their_request_bound(fast_server: str) -> None:
    bounds = loadgen.Bounds(duration_s=30.0, max_requests=50)
    started = time.perf_counter()
    closed = asyncio.run(loadgen.closed_loop(targets(fast_server), loadgen.Shape(), bounds, 4))
    opened = asyncio.run(loadgen.open_loop(targets(fast_server), loadgen.Shape(), bounds, 200.0))
    assert closed.summary("closed")["requests"] == 50
    assert opened.summary("rate")["requests"] == 50
    assert time.perf_counter() - started < 10  # the count, not the 30 s, ended both


def test_several_generator_processes(uniform_server: str) -> None:
    recorder = loadgen.run(
        "closed",
        targets(uniform_server),
        loadgen.Shape(),
        loadgen.Bounds(duration_s=1.5),
        4,
        processes=2,
    )
    summary = recorder.summary("closed")
    assert recorder.processes == 2 and summary["completed"] > 50
    # Four clients with ~30 ms each: about 130 requests/s, whichever process sent them.
    assert 60 < summary["requests_per_s"] < 200


def test_open_loop_exposes_a_stall_that_closed_loop_hides(fast_server: str) -> None:
    def stall_after(delay: float) -> threading.Thread:
        def run() -> None:
            time.sleep(delay)
            httpx.post(f"{fast_server}/stall?seconds=1", timeout=5)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    bounds = loadgen.Bounds(duration_s=3.0)
    thread = stall_after(1.0)
    closed = asyncio.run(loadgen.closed_loop(targets(fast_server), loadgen.Shape(), bounds, 2))
    thread.join()
    thread = stall_after(1.0)
    opened = asyncio.run(loadgen.open_loop(targets(fast_server), loadgen.Shape(), bounds, 100.0))
    thread.join()
    closed_summary, open_summary = closed.summary("closed"), opened.summary("rate")
    # Closed loop: two clients wait out the stall, so two slow requests among thousands.
    assert closed_summary["max_ms"] > 500
    assert closed_summary["p99_ms"] < 100
    # Open loop: every request scheduled during the stall counts its wait (a third of them).
    assert open_summary["p90_ms"] > 300
    assert 230 < open_summary["completed"] < 370  # Poisson: 300 ± 17, four deviations


def test_saturation_check_fires_when_the_generator_is_the_bottleneck(fast_server: str) -> None:
    bounds = loadgen.Bounds(duration_s=1.5)
    flooded = asyncio.run(
        loadgen.open_loop(targets(fast_server), loadgen.Shape(), bounds, 20_000.0)
    )
    check = flooded.summary("rate")["generator"]
    assert check["saturated"], check
    assert check["reasons"]
    gentle = asyncio.run(loadgen.open_loop(targets(fast_server), loadgen.Shape(), bounds, 20.0))
    assert not gentle.summary("rate")["generator"]["saturated"]


def test_zipf_skews_model_choice() -> None:
    routes = loadgen.Targets(routes={f"m{i:03d}": ["http://x"] for i in range(100)})
    skewed = loadgen._Chooser(routes, loadgen.Shape(zipf=1.2, seed=3), 0)
    uniform = loadgen._Chooser(routes, loadgen.Shape(zipf=0.0, seed=3), 0)
    draws = 20_000
    top = Counter(skewed.next()[0] for _ in range(draws)).most_common(1)[0][1] / draws
    flat = Counter(uniform.next()[0] for _ in range(draws)).most_common(1)[0][1] / draws
    harmonic = sum(1 / k**1.2 for k in range(1, 101))
    assert top == pytest.approx(1 / harmonic, rel=0.1)
    assert flat < 0.02


def test_weights_spread_requests_as_planned() -> None:
    """A plan's traffic: requests in proportion to each model's weight, none to a model
    weighted 0 or left out; weights that leave nothing to send are refused."""
    routes = loadgen.Targets(routes={f"m{i}": ["http://x"] for i in range(4)})
    shape = loadgen.Shape(weights={"m0": 6.0, "m1": 3.0, "m2": 1.0, "m3": 0.0}, seed=1)
    chooser = loadgen._Chooser(routes, shape, 0)
    draws = 20_000
    counts = Counter(chooser.next()[0] for _ in range(draws))
    assert counts["m3"] == 0
    assert counts["m0"] / draws == pytest.approx(0.6, abs=0.02)
    assert counts["m2"] / draws == pytest.approx(0.1, abs=0.01)
    with pytest.raises(ValueError, match="positive weight"):
        loadgen._Chooser(routes, loadgen.Shape(weights={"other": 1.0}), 0)


def test_text_length_follows_tokens() -> None:
    import random

    assert len(loadgen.text_of(64, random.Random(0)).split()) == 64


@pytest.mark.parametrize("vocab_size", [512, 1024])
def test_generated_words_are_one_token_each_for_synthetic_models(vocab_size: int) -> None:
    """Benchmarks on synthetic models see the sequence lengths a real vocabulary gives: a text
    of N generated words is N tokens plus [CLS] and [SEP], not one token per character."""
    import random

    from serving.build.modeling import synthetic_tokenizer

    tokenizer = synthetic_tokenizer(vocab_size)
    text = loadgen.text_of(12, random.Random(0))
    assert len(tokenizer.encode(text).ids) == 12 + 2
    # Words outside the vocabulary still tokenise, piece by piece.
    assert tokenizer.encode("zyzzyva").tokens[1:-1] == [
        "z",
        "##y",
        "##z",
        "##z",
        "##y",
        "##v",
        "##a",
    ]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"modes": ["bogus"]}, "bogus"),
        ({"rate": 0}, "rate"),
        ({"zipf": -1}, "zipf"),
        ({"concurrency": 0}, "concurrency"),
        ({"sweep_levels": []}, "sweep_levels"),
        ({"sweep_levels": [4, 0]}, "sweep_levels"),
        ({"max_requests": 0}, "max_requests"),
    ],
)
def test_bad_settings_are_refused(settings: dict, message: str) -> None:
    import msgspec

    with pytest.raises((ValueError, msgspec.ValidationError), match=message):
        msgspec.convert(settings, LoadSettings)


def one_server_plan(**tier: object) -> Plan:
    """A plan of one c5.large server holding every model; ``tier``: the on-demand tier's
    fields (the plan's ``cold_fraction``, ``cold_start_seconds``, the server's
    ``on_demand_model_ids``)."""
    on_demand = tier.pop("on_demand_model_ids", [])
    return Plan(
        plan_id="plan-load",
        created_at="2026-11-27T00:00:00Z",
        problem="load",
        instances=[
            PlannedInstance(
                id="i000-c5-large", type="c5.large", processor="cpu", price_per_hour=0.085
            )
        ],
        servers=[
            PlannedServer(
                id="i000-c5-large-d0",
                instance="i000-c5-large",
                device=0,
                processor="cpu",
                model_ids=MODELS,
                memory_bytes=1,
                memory_capacity_bytes=2,
                compute_utilization=0.1,
                on_demand_model_ids=on_demand,  # type: ignore[arg-type]
            )
        ],
        cost_per_hour=0.085,
        lower_bound_cost_per_hour=0.085,
        gap=0.0,
        solver_status="optimal",
        solve_seconds=0.1,
        **tier,  # type: ignore[arg-type]
    )


def deployment_at(url: str) -> Deployment:
    return Deployment(
        name="t", plan_id="plan-load", runtime="local", servers={"i000-c5-large-d0": url}
    )


def test_every_mode_and_the_report_files(uniform_server: str, tmp_path: Path) -> None:
    plan = one_server_plan()
    deployment = deployment_at(uniform_server)
    settings = LoadSettings(
        modes=["sequential", "random", "closed", "sweep", "rate"],
        duration_s=0.6,
        concurrency=4,
        sweep_levels=[1, 4, 16],
        latency_target_ms=45,
        rate=40,
        random_requests=20,
        zipf=1.0,
    )
    seen: list[float] = []
    figures = run_load_test(plan, deployment, settings, progress=lambda _, f: seen.append(f))
    assert seen[-1] == pytest.approx(1.0) and seen == sorted(seen)
    assert len(figures["sequential_ms_by_model"]) == len(MODELS)
    assert 0 < figures["random"]["completed"] <= 20  # bounded by count and by duration_s
    levels = [p["concurrency"] for p in figures["sweep"]]
    assert levels[0] == 1 and levels == sorted(levels)
    # P90 of uniform 10-50 ms is about 46 ms, past the 45 ms target: the sweep stops at once.
    assert not figures["sweep"][-1]["within_target"]
    summary = write_report(plan, figures, tmp_path)
    for name in (
        "report.json",
        "report.md",
        "throughput_latency.png",
        "latency_cdf.png",
        "per_server.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    markdown = (tmp_path / "report.md").read_text()
    for column in (
        "sequential latency",
        "random latency",
        "P90",
        "cost per model-hour",
        "Throughput-latency sweep",
        "Slowest models",
    ):
        assert column in markdown
    assert summary["models"] == len(MODELS) and summary["load_mode"] == "closed"
    # No on-demand tier and no answer met a cold start: the report keeps its old columns.
    assert "cold" not in markdown and "cold_requests" not in summary
    assert "cdf_ms_cold" not in figures
    assert summary["cost_per_million_requests"] == pytest.approx(
        0.085 / (summary["requests_per_s"] * 3600) * 1e6
    )


def test_cold_answers_are_counted_apart(cold_server: str) -> None:
    """m0 and m1 meet a cold start on every request (200 ms more, and the header): their
    answers, and only theirs, count as cold, with percentiles of their own."""
    bounds = loadgen.Bounds(duration_s=3.0)
    recorder = asyncio.run(
        loadgen.closed_loop(targets(cold_server), loadgen.Shape(), bounds, concurrency=8)
    )
    summary = recorder.summary("closed")
    assert summary["errors"] == {}
    per_model = recorder.per_model_ms()
    cold = sum(per_model[m]["count"] for m in COLD_MODELS)
    assert summary["cold_requests"] == cold > 20
    assert summary["warm_requests"] == summary["completed"] - cold > 100
    assert {m: v["cold"] for m, v in per_model.items() if v["cold"]} == {
        m: per_model[m]["count"] for m in COLD_MODELS
    }
    # Two models of ten, drawn uniformly whatever their latency: a fifth of the requests.
    assert summary["cold_fraction"] == pytest.approx(cold / summary["completed"])
    assert 0.1 < summary["cold_fraction"] < 0.3
    # The cold percentiles are those of m0's and m1's answers, the warm ones of the others'.
    for side, models in (("cold", COLD_MODELS), ("warm", MODELS[len(COLD_MODELS) :])):
        alone = loadgen.new_histogram()
        for m in models:
            alone.add(recorder.per_model[m])
        for p in (50, 90, 99):
            exact = alone.get_value_at_percentile(p) / 1000
            # Per-model histograms keep two significant digits: 1%.
            assert summary[f"{side}_p{p}_ms"] == pytest.approx(exact, rel=0.011), (side, p)
    # Warm: uniform on [10, 50] ms; cold: 200 ms more. The round trip and a busy machine add
    # to them, nothing takes from them.
    for side, low in (("warm", 10), ("cold", 210)):
        for p in (50, 90):
            assert summary[f"{side}_p{p}_ms"] >= low + 40 * p / 100 - 6, (side, p, summary)
    assert summary["cold_p50_ms"] > summary["warm_p50_ms"] + 150


def test_cold_counts_merge_across_processes_exactly() -> None:
    halves = [loadgen.Recorder(), loadgen.Recorder()]
    for ms in range(1, 1001):
        halves[ms % 2].record(f"m{ms % 4}", "s", ms / 1000, cold=ms % 4 == 0)
    merged = loadgen.Recorder()
    for half in halves:
        merged.merge(json.loads(json.dumps(half.encode())))
    figures = merged.cold_figures()
    assert figures["cold_requests"] == 250 and figures["warm_requests"] == 750
    assert figures["cold_fraction"] == 0.25
    assert merged.cold_per_model == Counter({"m0": 250})
    # Cold: 4, 8, ..., 1000 ms; its median is 500 ms, its 90th percentile 900 ms.
    assert figures["cold_p50_ms"] == pytest.approx(500, rel=1e-2)
    assert figures["cold_p90_ms"] == pytest.approx(900, rel=1e-2)
    assert figures["warm_p50_ms"] == pytest.approx(500, rel=1e-2)


@pytest.mark.parametrize("tiered", [True, False])
def test_the_report_shows_cold_answers_beside_the_plans_promise(
    cold_server: str, tmp_path: Path, tiered: bool
) -> None:
    """With an on-demand tier the report shows warm and cold figures and the plan's promise;
    without one it shows them too once an answer met a cold start (the promise then 0)."""
    tier = (
        {"cold_fraction": 0.2, "cold_start_seconds": 0.25, "on_demand_model_ids": list(COLD_MODELS)}
        if tiered
        else {}
    )
    plan = one_server_plan(**tier)
    settings = LoadSettings(modes=["sequential", "closed"], duration_s=1.0, concurrency=4)
    figures = run_load_test(plan, deployment_at(cold_server), settings)
    assert figures["sequential"]["cold_requests"] == len(COLD_MODELS)
    assert figures["cdf_ms_cold"] and figures["cdf_ms_warm"]
    summary = write_report(plan, figures, tmp_path)
    closed = figures["closed"]
    assert summary["cold_requests"] == closed["cold_requests"] > 0
    assert summary["cold_fraction"] == closed["cold_fraction"]
    assert summary["cold_p90_ms"] == closed["cold_p90_ms"] > summary["warm_p90_ms"]
    assert summary["plan_cold_fraction"] == (0.2 if tiered else 0.0)
    assert summary["plan_cold_start_seconds"] == (0.25 if tiered else 0.0)
    markdown = (tmp_path / "report.md").read_text()
    promised = "20.00%" if tiered else "0.00%"
    assert f"{closed['cold_fraction']:.2%} ({promised})" in markdown
    for text in ("warm P50 / P90 / P99", "cold P50 / P90 / P99", "## Cold starts"):
        assert text in markdown
    assert ("load <= 250" in markdown) is tiered
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["summary"]["cold_requests"] == closed["cold_requests"]
    assert (tmp_path / "latency_cdf.png").stat().st_size > 0


def test_a_tiered_plan_shows_cold_columns_before_any_cold_answer(
    uniform_server: str, tmp_path: Path
) -> None:
    plan = one_server_plan(cold_fraction=0.01, cold_start_seconds=2.0, on_demand_model_ids=["m9"])
    settings = LoadSettings(modes=["closed"], duration_s=0.5, concurrency=2)
    summary = write_report(
        plan, run_load_test(plan, deployment_at(uniform_server), settings), tmp_path
    )
    assert summary["cold_requests"] == 0 and summary["cold_fraction"] == 0.0
    assert summary["cold_p90_ms"] is None and summary["warm_p90_ms"] > 0
    markdown = (tmp_path / "report.md").read_text()
    assert "0.00% (1.00%)" in markdown and "| cold | 0 |" in markdown


def test_the_gateway_passes_the_cold_start_header_on(cold_server: str) -> None:
    """A load test through the gateway counts cold answers as one sent straight to the server."""
    from litestar.testing import TestClient

    from serving.routing.client import met_cold_start
    from serving.routing.gateway import create_gateway

    plan = one_server_plan()
    with TestClient(create_gateway(plan, deployment_at(cold_server))) as gateway:
        cold = gateway.post("/predictions/m0", json={"text": "x"})
        warm = gateway.post("/predictions/m5", json={"text": "x"})
    assert cold.status_code == warm.status_code == 200
    assert met_cold_start(cold.headers) and not met_cold_start(warm.headers)
    assert "x-myriad-cold-start" not in warm.headers
