"""Prometheus metrics of one model server.

The ``model`` label only ever takes the ids this server hosts (bounded by its slice of the plan)
or ``_unknown`` for requests to models it does not serve, so a scan over thousands of ids cannot
blow up the series count.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from serving.process import resident_bytes

UNKNOWN_MODEL = "_unknown"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, repository: object, planned: dict | None = None) -> None:
        """``planned``: for a server started from a plan, its id, planned compute
        (``compute_utilization``) and its share of its instance's price (``cost_per_hour``),
        exported so that dashboards put observed load and cost beside the plan."""
        self.repository = repository
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "myriad_requests",
            "Prediction requests by model and HTTP status",
            ["model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "myriad_request_seconds",
            "Prediction latency in the server, by model",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch = Histogram(
            "myriad_batch_size",
            "Texts per model call formed by the batcher",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.load_seconds = Histogram(
            "myriad_model_load_seconds",
            "Seconds each load of a model took (at start, and every on-demand load)",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )
        self.loads = Counter(
            "myriad_model_loads", "Loads of each model", ["model"], registry=self.registry
        )
        self.evictions = Counter(
            "myriad_model_evictions",
            "On-demand models evicted to keep within the memory budget",
            ["model"],
            registry=self.registry,
        )
        self.cold_starts = Counter(
            "myriad_cold_start_requests",
            "Requests that waited for their on-demand model to load",
            ["model"],
            registry=self.registry,
        )
        self.loaded_bytes = Gauge(
            "myriad_models_loaded_bytes",
            "Bytes of the models in memory now, as the on-demand ledger counts them",
            registry=self.registry,
        )
        self.budget_bytes = Gauge(
            "myriad_memory_budget_bytes",
            "The memory budget on-demand models are loaded under (absent: none)",
            registry=self.registry,
        )
        self.models = Gauge("myriad_models", "Models by state", ["state"], registry=self.registry)
        self.queue_depth = Gauge(
            "myriad_queue_depth",
            "Texts waiting in the batcher and the cross-model engines' queues",
            registry=self.registry,
        )
        self.memory = Gauge(
            "myriad_process_resident_bytes",
            "Resident memory of the server process",
            registry=self.registry,
        )
        if planned is not None:
            Gauge(
                "myriad_planned_compute_utilization",
                "Device-seconds per second the plan gives this server's traffic",
                ["server"],
                registry=self.registry,
            ).labels(planned["server"]).set(planned["compute_utilization"])
            Gauge(
                "myriad_server_cost_per_hour",
                "This server's share of its instance's price per hour, as planned",
                ["server"],
                registry=self.registry,
            ).labels(planned["server"]).set(planned["cost_per_hour"])

        # Label lookups take a lock and hash the label values; the children of the models
        # served are kept here (bounded by the models this server hosts, never by the ids
        # requested).
        self._children: dict[tuple[str, int], tuple[Counter, Histogram | None]] = {}
        self._batch_children: dict[str, Histogram] = {}
        # Loads, evictions and cold starts are reported by the repository and its tier.
        if hasattr(repository, "observer"):
            repository.observer = self
        tier = getattr(repository, "tier", None)
        if tier is not None:
            tier.listener = self
            if tier.budget_bytes is not None:
                self.budget_bytes.set(tier.budget_bytes)

    def label(self, model_id: str) -> str:
        return model_id if model_id in self.repository.models else UNKNOWN_MODEL  # type: ignore[attr-defined]

    def observe(self, model_id: str, status: int, seconds: float, texts: int) -> None:
        children = self._children.get((model_id, status))
        if children is None:
            label = self.label(model_id)
            # A latency series only for answered requests, as before the cache.
            latency = self.latency.labels(label) if status == 200 else None
            children = (self.requests.labels(label, str(status)), latency)
            if label != UNKNOWN_MODEL:
                self._children[(model_id, status)] = children
        counter, latency = children
        counter.inc()
        if latency is not None:
            latency.observe(seconds)

    def observe_many(self, model_id: str, status: int, seconds: float, requests: int) -> None:
        """``requests`` requests of one model answered with ``status`` together (a front end's
        frame), each after ``seconds``: one counter increment and one histogram update for
        them all."""
        if requests == 1:
            self.observe(model_id, status, seconds, 0)
            return
        children = self._children.get((model_id, status))
        if children is None:
            self.observe(model_id, status, seconds, 0)
            requests -= 1
            children = self._children.get((model_id, status))
            if children is None:  # an unknown model's series are not cached
                for _ in range(requests):
                    self.observe(model_id, status, seconds, 0)
                return
        counter, latency = children
        counter.inc(requests)
        if latency is not None:
            observe_repeated(latency, seconds, requests)

    def observe_batch(self, model_id: str, texts: int) -> None:
        child = self._batch_children.get(model_id)
        if child is None:
            label = self.label(model_id)
            child = self.batch.labels(label)
            if label != UNKNOWN_MODEL:
                self._batch_children[model_id] = child
        child.observe(texts)

    def model_loaded(self, model_id: str, seconds: float) -> None:
        label = self.label(model_id)
        self.loads.labels(label).inc()
        self.load_seconds.labels(label).observe(seconds)

    def model_evicted(self, model_id: str) -> None:
        self.evictions.labels(self.label(model_id)).inc()

    def observe_cold_start(self, model_id: str, requests: int = 1) -> None:
        self.cold_starts.labels(self.label(model_id)).inc(requests)

    def exposition(self) -> bytes:
        """Refresh the gauges read at scrape time and render the text format."""
        states: dict[str, int] = {}
        for model in self.repository.models.values():  # type: ignore[attr-defined]
            states[model.state.value] = states.get(model.state.value, 0) + 1
        for state in ("pending", "loading", "ready", "failed", "unloaded"):
            self.models.labels(state).set(states.get(state, 0))
        tier = getattr(self.repository, "tier", None)
        if tier is not None:
            self.loaded_bytes.set(tier.loaded_bytes)
        else:
            self.loaded_bytes.set(
                sum(m.memory_bytes for m in self.repository.models.values() if m.ready)  # type: ignore[attr-defined]
            )
        self.queue_depth.set(self.repository.queue_depth())  # type: ignore[attr-defined]
        self.memory.set(resident_bytes())
        return generate_latest(self.registry)


def observe_repeated(histogram: Histogram, value: float, count: int) -> None:
    """``count`` observations of ``value`` as one update of the histogram's bucket and sum.
    prometheus_client has no call for it; its children keep ``_upper_bounds``, ``_buckets``
    (non-cumulative) and ``_sum`` (all its versions since 0.4), and where they do not, the
    observations are made one by one."""
    try:
        bounds, buckets, total = histogram._upper_bounds, histogram._buckets, histogram._sum  # type: ignore[attr-defined]
    except AttributeError:
        for _ in range(count):
            histogram.observe(value)
        return
    total.inc(value * count)
    for bound, bucket in zip(bounds, buckets, strict=True):
        if value <= bound:
            bucket.inc(count)
            return
