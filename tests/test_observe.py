"""Observed traffic: real servers on the local runtime publish their scrape targets, a real
Prometheus scrapes them, and observe reads the same per-model figures from Prometheus as from
the servers' /metrics directly."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from packing.contracts import ModelSpec
from packing.io import save
from serving.build.tracing import TraceSettings, trace_to_store
from serving.deployments import Deployment, read_deployment, targets_path
from serving.observe import (
    bucket_quantile,
    latest_observation,
    observe_by_scraping,
    observe_from_prometheus,
    parse_metrics,
    publish_observation,
)
from serving.store import open_store
from tasks.deploy import deploy, teardown
from tests.prometheus_server import PrometheusServer, prometheus_server
from tests.test_deploy import make_plan

FAST = TraceSettings(profile_batch_sizes=(1,), profile_repeats=1)
METRICS = """# TYPE myriad_requests counter
myriad_requests_total{model="a",status="200"} 7.0
myriad_requests_total{model="a",status="503"} 2.0
myriad_requests_total{model="_unknown",status="404"} 5.0
# TYPE myriad_request_seconds histogram
myriad_request_seconds_bucket{le="0.01",model="a"} 2.0
myriad_request_seconds_bucket{le="0.1",model="a"} 6.0
myriad_request_seconds_bucket{le="+Inf",model="a"} 7.0
myriad_request_seconds_count{model="a"} 7.0
myriad_request_seconds_sum{model="a"} 0.3
"""


def test_metrics_are_read_per_model() -> None:
    sample = parse_metrics(METRICS)
    assert sample.requests == {"a": {"200": 7.0, "503": 2.0}}
    assert sample.buckets["a"] == {0.01: 2.0, 0.1: 6.0, float("inf"): 7.0}


def test_bucket_quantile_as_prometheus_interpolates() -> None:
    buckets = {0.01: 2.0, 0.1: 6.0, float("inf"): 7.0}
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.01 + 0.09 * (3.5 - 2) / 4)
    assert bucket_quantile(0.99, buckets) == 0.1  # past the last finite bound
    assert bucket_quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Deployment, PrometheusServer]]:
    """Two local servers (``busy`` on both, ``calm`` and ``idle`` on one each) scraped by a
    real Prometheus through the targets the deployment publishes."""
    root = tmp_path_factory.mktemp("observe")
    store = f"file://{root}/store"
    for model_id in ("busy", "calm", "idle"):
        spec = ModelSpec(id=model_id, source="synthetic:bert-tiny", max_length=16)
        trace_to_store(spec, "cpu", open_store(store), FAST)
    plan = make_plan({"s0-d0": ["busy", "calm"], "s1-d0": ["busy", "idle"]}, "plan-observe")
    plan_path = save(plan, root / "plan.json")
    with prometheus_server(root) as prometheus, pytest.MonkeyPatch.context() as patch:
        patch.setenv("MYRIAD_HOME", str(prometheus.home))
        deployment = deploy(plan_path, store, "local", "observed")
        try:
            yield deployment, prometheus
        finally:
            teardown("observed")


def _send(
    deployment: Deployment,
    counts: dict[str, int],
    seconds: float,
    homes: dict[str, list[str]] | None = None,
) -> None:
    """``counts[model]`` requests per model, spread evenly over ``seconds``, to its replicas
    (``homes``: model -> server ids; default: this module's plan)."""
    default = {"busy": ["s0-d0", "s1-d0"], "calm": ["s0-d0"], "idle": []}
    homes = {m: [deployment.servers[s] for s in ids] for m, ids in (homes or default).items()}
    order = [m for m, n in counts.items() for _ in range(n)]
    random.Random(0).shuffle(order)
    gap = seconds / max(1, len(order))
    with httpx.Client(timeout=30) as client:
        for i, model in enumerate(order):
            url = homes[model][i % len(homes[model])]
            answer = client.post(f"{url}/predictions/{model}", json={"text": "a short text"})
            assert answer.status_code == 200, answer.text
            time.sleep(gap)


@pytest.mark.slow
def test_observe_by_scraping_and_from_prometheus_agree(
    served: tuple[Deployment, PrometheusServer],
) -> None:
    deployment, prometheus = served
    # The targets file names both servers, and Prometheus scrapes them.
    assert targets_path("observed", prometheus.home).is_file()
    deadline = time.monotonic() + 30
    while prometheus.targets_up("observed") < 2:
        assert time.monotonic() < deadline, "Prometheus never scraped the published targets"
        time.sleep(0.5)
    # Every series exists before the window (a counter's first value is not an increase).
    _send(deployment, {"busy": 2, "calm": 1}, 0.1)
    time.sleep(2.5)

    counts = {"busy": 40, "calm": 12}
    window_start = time.time()
    load = threading.Thread(target=_send, args=(deployment, counts, 4.0))
    timer = threading.Timer(0.5, load.start)
    timer.start()
    scraped = observe_by_scraping(deployment, window_s=8.0, interval_s=2.0, quantile=0.9)
    load.join()
    assert scraped.source == "scrape" and scraped.plan_id == "plan-observe"
    assert scraped.models["busy"].requests == 40
    assert scraped.models["calm"].requests == 12
    assert "idle" not in scraped.models or scraped.models["idle"].requests == 0
    assert scraped.models["busy"].rate_rps == pytest.approx(40 / scraped.window_s, rel=0.01)
    # The high quantile of per-interval rates is above the mean: the load took half the window.
    assert scraped.models["busy"].rate_high_rps > scraped.models["busy"].rate_rps
    assert scraped.models["busy"].p90_ms is not None and scraped.models["busy"].p90_ms > 0
    assert sum(s.requests for s in scraped.servers.values()) == 52
    assert scraped.servers["s0-d0"].requests > 12  # calm's 12 and half of busy's

    time.sleep(3.0)  # Prometheus scrapes the last counters
    window_end = time.time()
    observed = observe_from_prometheus(
        prometheus.url, deployment, window_s=window_end - window_start, interval_s=2.0,
        end=window_end,
    )  # fmt: skip
    assert observed.source == "prometheus"
    # increase() extrapolates to the window's edges: equal within a few percent.
    for model, sent in counts.items():
        assert observed.models[model].requests == pytest.approx(sent, rel=0.15), model
    assert observed.models["busy"].p90_ms == pytest.approx(scraped.models["busy"].p90_ms, rel=0.5)

    publish_observation(scraped, deployment.store_uri)
    kept = latest_observation("observed", deployment.store_uri)
    assert kept == scraped

    # Every panel of the dashboard reads real data from this Prometheus.
    from serving.dataplane.dashboard import queries

    for title, exprs in queries(window="30s").items():
        for expr in exprs:
            answer = httpx.get(
                f"{prometheus.url}/api/v1/query",
                params={"query": expr.replace("$deployment", "observed")},
                timeout=10,
            ).json()
            assert answer["status"] == "success", (title, answer)
            if "errors" not in title:
                assert answer["data"]["result"], (title, expr)


@pytest.mark.slow
def test_targets_follow_the_deployment_record(served: tuple[Deployment, PrometheusServer]) -> None:
    import json

    deployment, prometheus = served
    listed = json.loads(targets_path("observed", prometheus.home).read_text())
    assert {entry["labels"]["myriad_server"] for entry in listed} == {"s0-d0", "s1-d0"}
    addresses = {entry["targets"][0] for entry in listed}
    assert addresses == {url.removeprefix("http://") for url in deployment.servers.values()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MYRIAD_HOME", str(prometheus.home))
        assert read_deployment("observed").servers == deployment.servers


def test_observe_of_servers_that_do_not_answer_names_them(tmp_path: Path) -> None:
    from serving.observe import ObserveError

    gone = Deployment(
        name="gone", plan_id="p", runtime="local", servers={"s": "http://127.0.0.1:9"}
    )
    with pytest.raises(ObserveError, match="no server answered /metrics"):
        observe_by_scraping(gone, window_s=0.2, interval_s=0.1)


def test_the_dashboard_is_in_step_and_reads_only_exported_metrics() -> None:
    import re

    from serving.dataplane.dashboard import METRICS, dashboard_json, queries
    from serving.dataplane.metrics import ServerMetrics

    committed = Path(__file__).resolve().parent.parent / "infra" / "grafana" / "myriad.json"
    assert committed.read_text() == dashboard_json(), (
        "infra/grafana/myriad.json is stale: python -c 'from serving.dataplane.dashboard import "
        "dashboard_json; print(dashboard_json(), end=\"\")' > infra/grafana/myriad.json"
    )
    planned = {"server": "s", "compute_utilization": 0.1, "cost_per_hour": 0.1}
    exported = {family.name for family in ServerMetrics(None, planned).registry.collect()}
    used = {
        re.sub(r"_(total|bucket|sum|count)$", "", name)
        for exprs in queries().values()
        for expr in exprs
        for name in re.findall(r"\bmyriad_[a-z_]+", expr)
        if name != "myriad_deployment" and name != "myriad_server"
    }
    assert used <= exported, used - exported
    assert {re.sub(r"_total$", "", m) for m in METRICS} <= exported
