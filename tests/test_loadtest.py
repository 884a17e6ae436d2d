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


def start(*latency_ms: float) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests/sleep_server.py"), str(port), *map(str, latency_ms)]
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


def test_every_mode_and_the_report_files(uniform_server: str, tmp_path: Path) -> None:
    plan = Plan(
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
            )
        ],
        cost_per_hour=0.085,
        lower_bound_cost_per_hour=0.085,
        gap=0.0,
        solver_status="optimal",
        solve_seconds=0.1,
    )
    deployment = Deployment(
        name="t", plan_id="plan-load", runtime="local", servers={"i000-c5-large-d0": uniform_server}
    )
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
    assert summary["cost_per_million_requests"] == pytest.approx(
        0.085 / (summary["requests_per_s"] * 3600) * 1e6
    )
