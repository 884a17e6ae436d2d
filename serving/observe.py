"""Observed traffic: each model's request rate (the mean over a window and a high quantile of
its per-interval rates), errors and latency percentiles, for a running deployment, read from a
Prometheus server that scrapes it or by scraping the servers' ``/metrics`` directly. The result
is a typed, versioned :class:`Observation`, kept in the store beside the deployment record
(``deployments/<name>/observations/``), which a rebalance plans from.

The deployment record publishes its servers as Prometheus ``file_sd`` targets
(:func:`serving.deployments.write_targets`), which is what a Prometheus server scrapes."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import msgspec
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from packing.errors import MyriadError
from serving.dataplane.dashboard import LATENCY as LATENCY_SECONDS
from serving.dataplane.dashboard import REQUESTS
from serving.dataplane.metrics import UNKNOWN_MODEL
from serving.deployments import Deployment, targets_path
from serving.store import latest_observation_key, observation_key, open_store

SCHEMA_VERSION = 1
LATENCY = f"{LATENCY_SECONDS}_bucket"


class ObserveError(MyriadError):
    """The deployment could not be observed: no server answered, or Prometheus did not."""


class ModelTraffic(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    rate_rps: float  # mean over the window, every replica together
    rate_high_rps: float  # the quantile of its per-interval rates (Observation.quantile)
    requests: int
    errors: int  # answered with a status other than 200
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None


class ServerTraffic(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    rate_rps: float
    requests: int
    answered: bool = True  # False: it could not be scraped for part of the window


class Observation(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    schema_version: int = SCHEMA_VERSION
    deployment: str
    plan_id: str
    source: str  # scrape | prometheus
    started_at: str
    ended_at: str
    window_s: float
    interval_s: float
    quantile: float
    models: dict[str, ModelTraffic]
    servers: dict[str, ServerTraffic]

    def total_rps(self) -> float:
        return sum(m.rate_rps for m in self.models.values())


# ------------------------------------------------------------------------------ from /metrics


class Sample(msgspec.Struct, kw_only=True):
    """One server's counters at one moment: requests per (model, status), latency buckets per
    model (upper bound in seconds -> cumulative count)."""

    requests: dict[str, dict[str, float]]
    buckets: dict[str, dict[float, float]]


def parse_metrics(text: str) -> Sample:
    requests: dict[str, dict[str, float]] = {}
    buckets: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            model = sample.labels.get("model")
            if model is None or model == UNKNOWN_MODEL:
                continue
            if sample.name == REQUESTS:
                requests.setdefault(model, {})[sample.labels.get("status", "")] = sample.value
            elif sample.name == LATENCY:
                buckets.setdefault(model, {})[float(sample.labels["le"])] = sample.value
    return Sample(requests=requests, buckets=buckets)


def _increase(first: float, last: float) -> float:
    """A counter's increase; a reset (a restarted server) counts from zero, as Prometheus."""
    return last - first if last >= first else last


def bucket_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """``histogram_quantile`` over cumulative bucket counts (linear within a bucket, the
    highest finite bound past it), in seconds; None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values``, linear between samples; 0 for none."""
    return float(np.quantile(values, q)) if values else 0.0


def scrape(client: httpx.Client, url: str) -> Sample | None:
    try:
        answer = client.get(f"{url.rstrip('/')}/metrics", timeout=5.0)
        answer.raise_for_status()
    except httpx.HTTPError:
        return None
    return parse_metrics(answer.text)


def observe_by_scraping(
    deployment: Deployment,
    window_s: float = 60.0,
    interval_s: float = 5.0,
    quantile: float = 0.9,
    sleep: Callable[[float], None] = time.sleep,
) -> Observation:
    """Scrape every server at the start of the window and every ``interval_s`` to its end;
    rates from the counters' increases (all replicas of a model together), latency percentiles
    from the histograms' increases over the window."""
    if window_s <= 0 or interval_s <= 0 or interval_s > window_s:
        raise ObserveError(
            f"window {window_s} s and interval {interval_s} s: both above 0, interval <= window"
        )
    steps = max(1, round(window_s / interval_s))
    started = datetime.now(UTC)
    samples: list[dict[str, Sample | None]] = []
    moments: list[float] = []
    with httpx.Client() as client:
        for step in range(steps + 1):
            if step:
                sleep(max(0.0, moments[0] + step * interval_s - time.monotonic()))
            moments.append(time.monotonic())
            samples.append(
                {sid: scrape(client, url) for sid, url in sorted(deployment.servers.items())}
            )
    answered = {sid for sid in deployment.servers if all(s[sid] is not None for s in samples)}
    if not any(samples[0][sid] is not None for sid in deployment.servers):
        raise ObserveError(
            f"deployment {deployment.name}: no server answered /metrics "
            f"({', '.join(sorted(deployment.servers.values())[:3])})"
        )
    per_model_rates: dict[str, list[float]] = {}
    totals: dict[str, list[float]] = {}  # model -> [requests, errors]
    server_requests: dict[str, float] = {}
    latency: dict[str, dict[float, float]] = {}
    for step in range(1, len(samples)):
        seconds = moments[step] - moments[step - 1]
        step_counts: dict[str, float] = {}
        for sid in deployment.servers:
            before, after = samples[step - 1][sid], samples[step][sid]
            if before is None or after is None:
                continue
            for model, statuses in after.requests.items():
                earlier = before.requests.get(model, {})
                for status, value in statuses.items():
                    added = _increase(earlier.get(status, 0.0), value)
                    step_counts[model] = step_counts.get(model, 0.0) + added
                    row = totals.setdefault(model, [0.0, 0.0])
                    row[0] += added
                    row[1] += added if status != "200" else 0.0
                    server_requests[sid] = server_requests.get(sid, 0.0) + added
            for model, counts in after.buckets.items():
                earlier_buckets = before.buckets.get(model, {})
                merged = latency.setdefault(model, {})
                for bound, value in counts.items():
                    added = _increase(earlier_buckets.get(bound, 0.0), value)
                    merged[bound] = merged.get(bound, 0.0) + added
        for model in set(step_counts) | set(per_model_rates):
            per_model_rates.setdefault(model, [0.0] * (step - 1)).append(
                step_counts.get(model, 0.0) / seconds
            )
    elapsed = moments[-1] - moments[0]
    models = {}
    for model, (requests, errors) in sorted(totals.items()):
        buckets = latency.get(model, {})
        models[model] = ModelTraffic(
            rate_rps=requests / elapsed,
            rate_high_rps=_quantile(per_model_rates.get(model, []), quantile),
            requests=round(requests),
            errors=round(errors),
            **_percentiles(buckets),
        )
    servers = _server_traffic(deployment, server_requests, elapsed, answered)
    return Observation(
        deployment=deployment.name,
        plan_id=deployment.plan_id,
        source="scrape",
        started_at=started.isoformat(timespec="seconds"),
        ended_at=datetime.now(UTC).isoformat(timespec="seconds"),
        window_s=round(elapsed, 3),
        interval_s=interval_s,
        quantile=quantile,
        models=models,
        servers=servers,
    )


def _server_traffic(
    deployment: Deployment, requests: dict[str, float], seconds: float, answered: set
) -> dict[str, ServerTraffic]:
    return {
        sid: ServerTraffic(
            rate_rps=requests.get(sid, 0.0) / seconds,
            requests=round(requests.get(sid, 0.0)),
            answered=sid in answered,
        )
        for sid in sorted(deployment.servers)
    }


def _percentiles(buckets: dict[float, float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, q in (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99)):
        value = bucket_quantile(q, buckets)
        out[name] = None if value is None else round(value * 1000, 3)
    return out


# ---------------------------------------------------------------------------- from Prometheus


def _query(client: httpx.Client, url: str, path: str, params: dict) -> list[dict]:
    try:
        answer = client.get(f"{url.rstrip('/')}/api/v1/{path}", params=params, timeout=30.0)
    except httpx.HTTPError as exc:
        raise ObserveError(f"Prometheus at {url} did not answer: {exc}") from None
    body = (
        answer.json()
        if answer.headers.get("content-type", "").startswith("application/json")
        else {}
    )
    if answer.status_code != 200 or body.get("status") != "success":
        raise ObserveError(
            f"Prometheus at {url}: {body.get('error') or answer.text[:200]} ({params.get('query')})"
        )
    return body["data"]["result"]


def observe_from_prometheus(
    prometheus_url: str,
    deployment: Deployment,
    window_s: float = 60.0,
    interval_s: float = 5.0,
    quantile: float = 0.9,
    end: float | None = None,
) -> Observation:
    """The same figures from a Prometheus server that scrapes the deployment (its targets
    labelled ``myriad_deployment``): the window ending ``end`` (default now)."""
    end = end if end is not None else time.time()
    start = end - window_s
    selector = f'myriad_deployment="{deployment.name}"'
    window = f"{max(1, round(window_s))}s"
    step = f"{max(1, round(interval_s))}s"
    with httpx.Client() as client:
        increases = _query(
            client,
            prometheus_url,
            "query",
            {
                "query": f"sum by (model, status) (increase({REQUESTS}{{{selector}}}[{window}]))",
                "time": end,
            },
        )
        per_server = _query(
            client,
            prometheus_url,
            "query",
            {
                "query": f"sum by (myriad_server) (increase({REQUESTS}{{{selector}}}[{window}]))",
                "time": end,
            },
        )
        rates = _query(
            client,
            prometheus_url,
            "query_range",
            {
                "query": f"sum by (model) (rate({REQUESTS}{{{selector}}}[{step}]))",
                "start": start + interval_s,
                "end": end,
                "step": step,
            },
        )
        buckets = _query(
            client,
            prometheus_url,
            "query",
            {
                "query": f"sum by (model, le) (increase({LATENCY}{{{selector}}}[{window}]))",
                "time": end,
            },
        )
    totals: dict[str, list[float]] = {}
    for row in increases:
        model = row["metric"].get("model")
        if model is None or model == UNKNOWN_MODEL:
            continue
        value = float(row["value"][1])
        entry = totals.setdefault(model, [0.0, 0.0])
        entry[0] += value
        entry[1] += value if row["metric"].get("status") != "200" else 0.0
    series = {
        row["metric"].get("model"): [float(v) for _, v in row["values"]]
        for row in rates
        if row["metric"].get("model") not in (None, UNKNOWN_MODEL)
    }
    latency: dict[str, dict[float, float]] = {}
    for row in buckets:
        model = row["metric"].get("model")
        if model is None or model == UNKNOWN_MODEL:
            continue
        latency.setdefault(model, {})[float(row["metric"]["le"])] = float(row["value"][1])
    if not totals and not per_server:
        raise ObserveError(
            f"Prometheus at {prometheus_url} has no {REQUESTS} for deployment "
            f"{deployment.name}: is it scraping the targets in {targets_path(deployment.name)}?"
        )
    models = {
        model: ModelTraffic(
            rate_rps=requests / window_s,
            rate_high_rps=_quantile(series.get(model, []), quantile),
            requests=round(requests),
            errors=round(errors),
            **_percentiles(latency.get(model, {})),
        )
        for model, (requests, errors) in sorted(totals.items())
    }
    seen = {row["metric"].get("myriad_server"): float(row["value"][1]) for row in per_server}
    servers = _server_traffic(deployment, seen, window_s, set(seen))
    return Observation(
        deployment=deployment.name,
        plan_id=deployment.plan_id,
        source="prometheus",
        started_at=datetime.fromtimestamp(start, UTC).isoformat(timespec="seconds"),
        ended_at=datetime.fromtimestamp(end, UTC).isoformat(timespec="seconds"),
        window_s=window_s,
        interval_s=interval_s,
        quantile=quantile,
        models=models,
        servers=servers,
    )


# ------------------------------------------------------------------------------------ storage


def publish_observation(observation: Observation, store_uri: str | None) -> str:
    """Keep the observation (and as the deployment's latest) in the store; returns its URI."""
    store = open_store(store_uri)
    data = msgspec.json.encode(observation)
    stamp = observation.ended_at.replace(":", "").replace("+0000", "Z")
    key = observation_key(observation.deployment, stamp)
    store.put_bytes(key, data)
    store.put_bytes(latest_observation_key(observation.deployment), data)
    return store.url_for(key)


def latest_observation(name: str, store_uri: str | None) -> Observation | None:
    store = open_store(store_uri)
    key = latest_observation_key(name)
    if not store.exists(key):
        return None
    return msgspec.json.decode(store.get_bytes(key), type=Observation)


def observe_deployment(
    deployment: Deployment,
    window_s: float = 60.0,
    interval_s: float = 5.0,
    quantile: float = 0.9,
    prometheus_url: str | None = None,
) -> Observation:
    """From Prometheus when a URL is given (the window that ends now, at once), else by
    scraping the servers (the window that starts now: it takes ``window_s``)."""
    if not 0 < quantile <= 1:
        raise ObserveError(f"quantile {quantile}: between 0 (excluded) and 1")
    if prometheus_url:
        return observe_from_prometheus(prometheus_url, deployment, window_s, interval_s, quantile)
    return observe_by_scraping(deployment, window_s, interval_s, quantile)
