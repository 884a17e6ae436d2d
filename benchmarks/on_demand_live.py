"""The on-demand tier live, on this machine: a per-tenant fleet of synthetic bert-mini
classifiers (a few active, most rarely used) packed twice, all resident and with the tier,
each plan served on the local runtime and driven with the fleet's own traffic.

    python benchmarks/on_demand_live.py --models 1000 --active 200 --rate 10 \\
        --rare-interval-s 3600 --warmup 30 --seconds 240 --out /tmp/on-demand-live

The active models share ``--rate`` requests/s under Zipf 1.0; every other model sees one
request per ``--rare-interval-s``. Prints (and writes DIR/figures.json), per plan: cost per
hour, servers, on-demand models, the plan's cold fraction; the servers' resident memory (RSS
of the server processes, summed) once ready and at the end; requests, failures, warm and cold
P50/P90/P99 and the measured cold fraction after ``--warmup`` seconds of the same traffic.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest.generator import Bounds, Shape, Targets, run  # noqa: E402
from packing.contracts import Catalog, Fleet, ModelSpec, OnDemandLimits, Plan  # noqa: E402
from packing.io import load, save  # noqa: E402
from packing.problems import build_problem  # noqa: E402
from packing.solver import solve  # noqa: E402
from serving.build.tracing import TraceSettings, trace_to_store  # noqa: E402
from serving.deployments import read_deployment  # noqa: E402
from serving.store import open_store, publish_plan  # noqa: E402

FAST = TraceSettings(profile_batch_sizes=(1,), profile_repeats=1)


def fleet_of(models: int, active: int, rate: float, rare_interval_s: float) -> Fleet:
    harmonic = sum(1 / k for k in range(1, active + 1))
    specs = []
    for i in range(models):
        traffic = rate / ((i + 1) * harmonic) if i < active else 1 / rare_interval_s
        specs.append(
            ModelSpec(
                id=f"tenant-{i:04d}",
                source="synthetic:bert-mini",
                max_length=32,
                traffic_rps=traffic,
            )
        )
    return Fleet(name="tenants", processors=["cpu"], models=specs)


def _trace(args: tuple[ModelSpec, str]) -> dict:
    spec, store = args
    return asdict(trace_to_store(spec, "cpu", open_store(store), FAST))


def server_rss_bytes(deployment_name: str) -> int:
    """Resident memory of the deployment's server processes (the supervisors' children)."""
    total = 0
    for handle in read_deployment(deployment_name).handles.values():
        pid = int(handle)
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in children:
            status = Path(f"/proc/{child}/status").read_text()
            rss_kib = next(line for line in status.splitlines() if line.startswith("VmRSS"))
            total += int(rss_kib.split()[1]) * 1024
    return total


def steady_state_requests(plan: Plan, fleet: Fleet, sizes: dict[str, int], cap: int) -> int:
    """Requests of the fleet's traffic that span the longest characteristic time of the plan's
    on-demand caches (0 without the tier), at most ``cap``."""
    from packing.cold import characteristic_time

    traffic = {m.id: m.traffic_rps for m in fleet.models}
    times = []
    for server in plan.servers:
        if not server.on_demand_model_ids:
            continue
        cached = [sizes[m] for m in server.on_demand_model_ids]
        rates = [traffic[m] for m in server.on_demand_model_ids]
        # The cache keeps room to load its largest model besides what LRU holds.
        times.append(characteristic_time(cached, rates, server.cache_memory_bytes - max(cached)))
    if not times:
        return 0
    return min(cap, int(max(times) * sum(traffic.values())))


def serve_and_drive(
    name: str,
    plan: Plan,
    plan_path: Path,
    store: str,
    fleet: Fleet,
    sizes: dict[str, int],
    args: argparse.Namespace,
) -> dict:
    from tasks.deploy import deploy, teardown

    started = time.perf_counter()
    deploy(plan_path, store, "local", name)
    figures: dict = {"deploy_s": round(time.perf_counter() - started, 1)}
    try:
        figures["rss_ready_mib"] = round(server_rss_bytes(name) / 2**20)
        urls = read_deployment(name).servers
        routes: dict[str, list[str]] = {}
        for server in plan.servers:
            for model_id in server.model_ids:
                routes.setdefault(model_id, []).append(f"{urls[server.id]}/predictions/{model_id}")
        targets = Targets(routes=routes)
        shape = Shape(weights={m.id: m.traffic_rps for m in fleet.models}, seed=7)
        rate = sum(m.traffic_rps for m in fleet.models)
        if args.warmup > 0:
            run("rate", targets, shape, Bounds(duration_s=args.warmup), rate)
        warm_requests = steady_state_requests(plan, fleet, sizes, args.max_warm_requests)
        if warm_requests:
            # An LRU cache reaches its steady state after about its characteristic time T of
            # traffic (here tens of minutes): the same traffic, sent as fast as the server
            # takes it, leaves the cache as T seconds of it would, so the measured window
            # starts where the plan's estimate applies rather than from an empty cache.
            started = time.perf_counter()
            run("closed", targets, shape, Bounds(duration_s=3600, max_requests=warm_requests), 8)
            figures["warm_requests"] = warm_requests
            figures["warm_s"] = round(time.perf_counter() - started, 1)
        measured = run("rate", targets, shape, Bounds(duration_s=args.seconds), rate)
        summary = measured.summary("rate")
        figures["rss_end_mib"] = round(server_rss_bytes(name) / 2**20)
        figures |= {
            key: round(value, 4) if isinstance(value, float) else value
            for key, value in summary.items()
            if key in (
                "requests", "requests_per_s", "p50_ms", "p90_ms", "p99_ms", "cold_requests",
                "cold_fraction", "warm_p50_ms", "warm_p90_ms", "warm_p99_ms", "cold_p50_ms",
                "cold_p90_ms", "cold_p99_ms",
            )
        }  # fmt: skip
        figures["failed"] = sum(measured.errors.values())
        figures["generator_saturated"] = bool(measured.saturation().get("saturated"))
    finally:
        teardown(name)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--active", type=int, default=200)
    parser.add_argument("--rate", type=float, default=10.0, help="requests/s over active models")
    parser.add_argument("--rare-interval-s", type=float, default=3600.0)
    parser.add_argument("--max-cold-fraction", type=float, default=0.01)
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds at the real rate")
    parser.add_argument(
        "--max-warm-requests", type=int, default=30_000,
        help="then up to this many requests as fast as served, to bring caches to steady state",
    )  # fmt: skip
    parser.add_argument("--seconds", type=float, default=240.0)
    parser.add_argument("--time-limit", type=float, default=20.0, help="solver seconds per plan")
    parser.add_argument("--only", choices=["tier", "resident"], help="serve one plan only")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["MYRIAD_HOME"] = str(args.out / "home")  # the benchmark's own records
    store = f"file://{args.out}/store"
    fleet = fleet_of(args.models, args.active, args.rate, args.rare_interval_s)
    figures: dict = {
        "models": args.models,
        "active": args.active,
        "rate": args.rate,
        "rare_interval_s": args.rare_interval_s,
        "max_cold_fraction": args.max_cold_fraction,
    }

    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=2) as pool:
        traces = list(pool.map(_trace, [(spec, store) for spec in fleet.models], chunksize=20))
    figures["trace_s"] = round(time.perf_counter() - started, 1)
    catalog = load(ROOT / "catalogs/aws.yaml", Catalog)
    plans: dict[str, tuple[Plan, Path]] = {}
    for kind, on_demand in (
        ("resident", None),
        ("tier", OnDemandLimits(max_cold_fraction=args.max_cold_fraction)),
    ):
        problem = build_problem(fleet, traces, catalog, on_demand=on_demand)
        sizes = {m.id: m.profiles[0].memory_bytes for m in problem.models}
        plan = solve(problem, time_limit_s=args.time_limit)
        publish_plan(plan, store, problem)
        plans[kind] = (plan, save(plan, args.out / f"plan-{kind}.json"))
        figures[kind] = {
            "cost_per_hour": plan.cost_per_hour,
            "lower_bound_cost_per_hour": plan.lower_bound_cost_per_hour,
            "servers": len(plan.servers),
            "instance_types": sorted({i.type for i in plan.instances}),
            "on_demand_models": sum(len(s.on_demand_model_ids) for s in plan.servers),
            "planned_memory_mib": round(sum(s.memory_bytes for s in plan.servers) / 2**20),
            "plan_cold_fraction": plan.cold_fraction,
            "plan_cold_start_seconds": plan.cold_start_seconds,
        }
    for kind in ("tier", "resident"):
        if args.only and kind != args.only:
            continue
        plan, path = plans[kind]
        figures[kind] |= serve_and_drive(f"live-{kind}", plan, path, store, fleet, sizes, args)
        print(json.dumps({kind: figures[kind]}, indent=2), flush=True)
    print(json.dumps(figures, indent=2))
    (args.out / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
