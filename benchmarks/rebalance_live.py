"""Rebalancing live, on this machine: N synthetic bert-tiny classifiers planned for a guess that
is wrong both ways (uniform, and several times the total that will come), served by local
server processes behind the gateway, driven by Zipf traffic; observe, then rebalance under that
load through the gateway.

    python benchmarks/rebalance_live.py --models 200 --guess-rps 5 --rate 100 --zipf 1.1 \\
        --seconds 60 --out /tmp/rebalance-live

Prints (and writes DIR/figures.json): requests that failed while the rebalance ran; for the
100 busiest models, the share whose planned traffic after the rebalance is within 20% of the
rate the load generator sent them; cost per hour before and after; P90 through the gateway
before and after; wall time of observe and of the rebalance (plan and move).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from loadtest.generator import Bounds, Shape, Targets, run  # noqa: E402
from packing.contracts import Catalog, Fleet, ModelSpec  # noqa: E402
from packing.io import load, save  # noqa: E402
from packing.problems import build_problem  # noqa: E402
from packing.solver import solve  # noqa: E402
from packing.traffic import TrafficSettings  # noqa: E402
from serving.build.tracing import TraceSettings, trace_to_store  # noqa: E402
from serving.deployments import deployment_path, read_deployment  # noqa: E402
from serving.observe import observe_by_scraping  # noqa: E402
from serving.rebalance import RebalanceSettings, apply_rebalance, plan_rebalance  # noqa: E402
from serving.runtimes import DeployOptions  # noqa: E402
from serving.runtimes.local import free_port  # noqa: E402
from serving.store import open_store, publish_plan  # noqa: E402

NAME = "live"


def gateway(port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.routing.gateway", "--deployment",
         str(deployment_path(NAME)), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError("the gateway did not start")


def drive(targets: Targets, rate: float, zipf: float, seconds: float, seed: int):
    return run("rate", targets, Shape(zipf=zipf, seed=seed), Bounds(duration_s=seconds), rate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--guess-rps", type=float, default=5.0, help="the fleet's guess, each")
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s actually sent")
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--seconds", type=float, default=60.0, help="each load phase")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["MYRIAD_HOME"] = str(args.out / "home")  # the benchmark's own records
    store = f"file://{args.out}/store"
    figures: dict = {"models": args.models, "guess_rps_each": args.guess_rps,
                     "rate": args.rate, "zipf": args.zipf}  # fmt: skip

    started = time.perf_counter()
    fleet = Fleet(
        name="live",
        processors=["cpu"],
        models=[
            ModelSpec(
                id=f"tiny-{i:04d}",
                source="synthetic:bert-tiny",
                max_length=32,
                traffic_rps=args.guess_rps,
            )
            for i in range(args.models)
        ],
    )
    fast = TraceSettings(profile_batch_sizes=(1,), profile_repeats=3)
    traces = [
        msgspec_to_dict(trace_to_store(spec, "cpu", open_store(store), fast))
        for spec in fleet.models
    ]
    figures["trace_s"] = round(time.perf_counter() - started, 1)
    catalog = load(ROOT / "catalogs/aws.yaml", Catalog)
    problem = build_problem(fleet, traces, catalog)
    plan = solve(problem, time_limit_s=20)
    publish_plan(plan, store, problem)
    plan_path = save(plan, args.out / "plan.json")
    from tasks.deploy import deploy, teardown

    deploy(plan_path, store, "local", NAME)
    port = free_port()
    gate = gateway(port)
    try:
        url = f"http://127.0.0.1:{port}"
        targets = Targets(routes={m.id: [f"{url}/predictions/{m.id}"] for m in fleet.models})
        # Before: the traffic that comes, on the plan for the guess.
        before = drive(targets, args.rate, args.zipf, args.seconds, seed=1)
        observed_box: dict = {}

        def observe_under_load() -> None:
            t0 = time.perf_counter()
            observed_box["observation"] = observe_by_scraping(
                read_deployment(NAME), window_s=args.seconds - 10, interval_s=5.0
            )
            observed_box["seconds"] = time.perf_counter() - t0

        watcher = threading.Thread(target=observe_under_load)
        threading.Timer(5.0, watcher.start).start()
        during_observe = drive(targets, args.rate, args.zipf, args.seconds, seed=2)
        watcher.join()
        observation = observed_box["observation"]
        sent = {m: h.get_total_count() / during_observe.duration_s
                for m, h in during_observe.per_model.items()}  # fmt: skip

        # Rebalance under the same load, through the gateway.
        settings = RebalanceSettings(
            traffic=TrafficSettings(headroom=1.0, min_window_s=10), tolerance=0.05, rate="mean",
            time_limit_s=20,
        )  # fmt: skip
        t0 = time.perf_counter()
        deployment = read_deployment(NAME)
        result = plan_rebalance(deployment, plan, problem, observation, settings)
        planned_s = time.perf_counter() - t0
        load_box: dict = {}
        loader = threading.Thread(
            target=lambda: load_box.setdefault(
                "recorder", drive(targets, args.rate, args.zipf, args.seconds, seed=3)
            )
        )
        loader.start()
        time.sleep(3)
        t1 = time.perf_counter()
        moved = apply_rebalance(result, deployment, DeployOptions(name=NAME, store_uri=store))
        moved_s = time.perf_counter() - t1
        loader.join()
        during = load_box["recorder"]
        after = drive(targets, args.rate, args.zipf, args.seconds, seed=4)

        planned = {m.id: m.traffic_rps for m in result.problem.models}
        busiest = sorted(sent, key=lambda m: -sent[m])[:100]
        within = sum(1 for m in busiest if abs(planned[m] - sent[m]) <= 0.2 * sent[m])
        figures |= {
            "servers_before": len(plan.servers),
            "servers_after": len(result.plan.servers),
            "cost_before": plan.cost_per_hour,
            "cost_after": result.cost_after,
            "replica_moves": len(result.moves),
            "servers_started": len(moved.started) if moved else 0,
            "servers_kept": len(moved.kept) if moved else len(plan.servers),
            "requests_during_rebalance": during.summary("rate")["requests"],
            "failed_during_rebalance": sum(during.errors.values()),
            "busiest_100_within_20pct": within,
            "p90_ms_before": round(before.summary("rate")["p90_ms"], 2),
            "p90_ms_after": round(after.summary("rate")["p90_ms"], 2),
            "rate_before": round(before.summary("rate")["requests_per_s"], 1),
            "rate_after": round(after.summary("rate")["requests_per_s"], 1),
            "generator_saturated": bool(
                before.saturation().get("saturated") or after.saturation().get("saturated")
            ),
            "observe_s": round(observed_box["seconds"], 1),
            "observe_window_s": observation.window_s,
            "rebalance_plan_s": round(planned_s, 1),
            "rebalance_move_s": round(moved_s, 1),
        }
    finally:
        gate.terminate()
        gate.wait(timeout=20)
        teardown(NAME)
    print(json.dumps(figures, indent=2))
    (args.out / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def msgspec_to_dict(result: object) -> dict:
    from dataclasses import asdict

    return asdict(result)


if __name__ == "__main__":
    raise SystemExit(main())
