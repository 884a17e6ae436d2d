"""Load-test a deployment of a plan: the modes of :mod:`loadtest.generator` in sequence and the
figures the report needs (no Prefect here: :mod:`tasks.loadtest` is the task over it)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import msgspec

from loadtest import generator as loadgen
from packing.contracts import Plan
from serving.deployments import Deployment
from serving.routing.client import Router

MODES = ("sequential", "random", "closed", "sweep", "rate")


class LoadSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    modes: list[str] = msgspec.field(default_factory=lambda: ["sequential", "random", "closed"])
    duration_s: float = 10.0  # per closed/rate run and per sweep step
    concurrency: int = 8  # closed loop
    sweep_levels: list[int] = msgspec.field(default_factory=lambda: [2**k for k in range(9)])
    latency_target_ms: float = 100.0  # the sweep stops past this P90
    max_error_rate: float = 0.01  # ... or this error rate
    rate: float = 50.0  # open loop, requests per second
    zipf: float = 0.0
    tokens: int = 16
    random_requests: int = 200  # single random requests (bounded by duration_s as well)
    processes: int = 1
    seed: int = 0
    timeout_s: float = 30.0
    max_requests: int | None = None  # per closed/rate run, besides duration_s

    def __post_init__(self) -> None:
        unknown = sorted(set(self.modes) - set(MODES))
        if unknown or not self.modes:
            raise ValueError(f"modes {unknown or '[]'}: choose from {', '.join(MODES)}")
        for name in ("duration_s", "rate", "timeout_s", "latency_target_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be above 0, got {getattr(self, name)}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, got {self.max_requests}")
        if self.concurrency < 1 or self.processes < 1 or self.tokens < 1:
            raise ValueError("concurrency, processes and tokens must be at least 1")
        if not self.sweep_levels or min(self.sweep_levels) < 1:
            raise ValueError(
                f"sweep_levels must be concurrency levels >= 1, got {self.sweep_levels}"
            )
        if self.zipf < 0:
            raise ValueError(f"zipf must be 0 (uniform) or positive, got {self.zipf}")


def targets_for(plan: Plan, deployment: Deployment) -> loadgen.Targets:
    router = Router(plan, deployment)
    return loadgen.Targets(
        routes={
            m: [router.prediction_url(m, url) for url in router.urls_for(m)]
            for m in router.model_ids
        }
    )


def by_server_id(plan: Plan, deployment: Deployment, per_url: Mapping[str, int]) -> dict:
    """Requests answered per plan server id, every server of the plan included (a server that
    answered none shows as 0), from the generator's counts per base URL. Servers that share an
    address (behind one gateway) cannot be told apart: they are named together, joined by
    " + ". A URL no server of the plan has keeps its URL."""
    ids_by_url: dict[str, list[str]] = {}
    for server in plan.servers:
        url = deployment.servers.get(server.id)
        if url is not None:
            ids_by_url.setdefault(url.rstrip("/"), []).append(server.id)
    counts = {" + ".join(ids): 0 for ids in ids_by_url.values()}
    for url, count in per_url.items():
        ids = ids_by_url.get(url.rstrip("/"))
        name = " + ".join(ids) if ids else url
        counts[name] = counts.get(name, 0) + count
    return counts


def run_load_test(
    plan: Plan,
    deployment: Deployment,
    settings: LoadSettings,
    progress: Callable[[str, float], None] | None = None,
) -> dict:
    """Every requested mode in order; returns their summaries, the sweep curve, per-model and
    per-server figures and the latency CDF of the main run (closed, else rate, else random),
    with the CDFs of its warm and its cold answers apart once any answer met a cold start."""
    targets = targets_for(plan, deployment)
    shape = loadgen.Shape(zipf=settings.zipf, tokens=settings.tokens, seed=settings.seed)
    bounds = loadgen.Bounds(
        duration_s=settings.duration_s,
        timeout_s=settings.timeout_s,
        max_requests=settings.max_requests,
    )
    steps = len(settings.modes) + (
        len(settings.sweep_levels) - 1 if "sweep" in settings.modes else 0
    )
    done = 0

    def advance(label: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(label, done / steps)

    figures: dict = {"settings": msgspec.to_builtins(settings)}
    recorders: dict[str, loadgen.Recorder] = {}
    for mode in settings.modes:
        if mode == "sequential":
            recorder = asyncio.run(loadgen.sequential(targets, bounds))
            figures["sequential"] = recorder.summary("sequential", concurrency=1)
            figures["sequential_ms_by_model"] = {
                m: v["min_ms"] for m, v in recorder.per_model_ms().items()
            }
        elif mode == "random":
            single = msgspec.structs.replace(bounds, max_requests=settings.random_requests)
            recorder = asyncio.run(loadgen.closed_loop(targets, shape, single, 1))
            figures["random"] = recorder.summary("random", concurrency=1)
            figures["random_ms_range_by_model"] = {
                m: [v["min_ms"], v["max_ms"]] for m, v in recorder.per_model_ms().items()
            }
        elif mode == "closed":
            recorder = loadgen.run(
                "closed", targets, shape, bounds, settings.concurrency, settings.processes
            )
            figures["closed"] = recorder.summary("closed", concurrency=settings.concurrency)
        elif mode == "rate":
            recorder = loadgen.run(
                "rate", targets, shape, bounds, settings.rate, settings.processes
            )
            figures["rate"] = recorder.summary("rate", rate=settings.rate)
        else:
            figures["sweep"], best, recorder = _sweep(targets, shape, bounds, settings, advance)
            figures["sweep_best"] = best
        recorders[mode] = recorder
        advance(mode)
    if progress and done < steps:
        progress("finished early", 1.0)  # the sweep stopped before its last level
    main = next((m for m in ("closed", "rate", "sweep", "random") if m in recorders), None)
    if main is not None:
        chosen = recorders[main]
        figures["main"] = main
        figures["cdf_ms"] = chosen.cdf_ms()
        if chosen.cold_requests:
            figures["cdf_ms_warm"] = chosen.cdf_ms(side="warm")
            figures["cdf_ms_cold"] = chosen.cdf_ms(side="cold")
        figures["per_server_requests"] = by_server_id(plan, deployment, chosen.per_server)
        slowest = sorted(chosen.per_model_ms().items(), key=lambda kv: -kv[1]["p90_ms"])
        figures["slowest_models"] = dict(slowest[:10])
    return figures


def _sweep(
    targets: loadgen.Targets,
    shape: loadgen.Shape,
    bounds: loadgen.Bounds,
    settings: LoadSettings,
    advance: Callable[[str], None],
) -> tuple[list[dict], dict, loadgen.Recorder]:
    """Closed loop at each level until the error rate or the P90 target breaks. Returns every
    level's point, the level the report quotes (the highest throughput within the targets,
    else the last level run) and that level's recorder."""
    points: list[dict] = []
    best: tuple[dict, loadgen.Recorder] | None = None
    last: loadgen.Recorder | None = None
    for i, level in enumerate(settings.sweep_levels):
        last = loadgen.run("closed", targets, shape, bounds, level, settings.processes)
        point = last.summary("closed", concurrency=level)
        ok = (
            point["error_rate"] <= settings.max_error_rate
            and point.get("p90_ms", float("inf")) <= settings.latency_target_ms
        )
        point["within_target"] = ok
        points.append(point)
        if not ok:
            break
        if best is None or point["requests_per_s"] > best[0]["requests_per_s"]:
            best = (point, last)
        if i < len(settings.sweep_levels) - 1:
            advance(f"sweep {level}")
    assert last is not None
    if best is None:
        return points, points[-1], last
    return points, best[0], best[1]
