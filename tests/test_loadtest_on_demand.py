"""The load tester against a real server with on-demand models: the answers it counts as cold
are the ones the server counted as cold starts, and the report puts them beside the plan."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from loadtest import generator as loadgen
from loadtest.report import summarize
from packing.contracts import ModelSpec
from serving.build.tracing import TraceSettings, trace_to_store
from serving.store import open_store
from tests.servers import model_server, one_server_plan

pytestmark = pytest.mark.slow

IDS = [f"lt-{i}" for i in range(5)]
RESIDENT, ON_DEMAND = IDS[0], IDS[1:]


def server_counter(url: str, name: str) -> dict[str, float]:
    """A per-model counter of the server's /metrics, by model label."""
    counts: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + "{") and 'model="' in line:
            model = line.split('model="', 1)[1].split('"', 1)[0]
            counts[model] = counts.get(model, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_cold_answers_are_the_servers_cold_starts(tmp_path: Path) -> None:
    store_uri = f"file://{tmp_path}/store"
    store = open_store(store_uri)
    fast = TraceSettings(profile_batch_sizes=(1,), profile_repeats=1)
    for model_id in IDS:
        spec = ModelSpec(id=model_id, source="synthetic:bert-tiny", num_labels=3, max_length=32)
        trace_to_store(spec, "cpu", store, fast)
    # The resident model and about two on-demand ones, as their profiles count them: the four
    # on-demand models evict one another under uniform traffic.
    sizes = [json.loads(store.local_path(f"models/{m}/cpu/profile.json").read_bytes()) for m in IDS]
    budget = int(3.5 * max(size["memory_bytes"] for size in sizes))
    args = ("--on-demand", *ON_DEMAND, "--memory-budget", str(budget))
    with model_server(store_uri, IDS, tmp_path / "server.log", extra_args=args) as url:
        targets = loadgen.Targets(routes={m: [f"{url}/predictions/{m}"] for m in IDS})
        bounds = loadgen.Bounds(duration_s=60.0, max_requests=120)
        recorder = asyncio.run(loadgen.closed_loop(targets, loadgen.Shape(seed=3), bounds, 4))
        served = server_counter(url, "myriad_cold_start_requests_total")
    summary = recorder.summary("closed")
    assert summary["errors"] == {} and summary["completed"] == 120
    assert 0 < summary["cold_requests"] < 120
    # Every answer the server counted as a cold start carried the header, and no other did.
    assert dict(recorder.cold_per_model) == {m: n for m, n in served.items() if n}
    assert RESIDENT not in recorder.cold_per_model
    assert summary["cold_p50_ms"] > 0 and summary["warm_p50_ms"] > 0

    plan = one_server_plan(IDS)
    plan.servers[0].on_demand_model_ids = list(ON_DEMAND)
    plan.cold_fraction, plan.cold_start_seconds = 0.5, 1.0
    report = summarize(plan, {"main": "closed", "closed": summary})
    assert report["cold_fraction"] == summary["cold_fraction"]
    assert report["plan_cold_fraction"] == 0.5 and report["plan_cold_start_seconds"] == 1.0
