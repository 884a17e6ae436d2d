"""Rebalancing on observed traffic, on plans (no servers): the reference fleet (3,000 bert-base
classifiers, the packing benchmark's modelled profiles) planned for its uniform guess of
6,230 requests/s, then served Zipf traffic at the same total.

    python benchmarks/rebalance.py --models 3000 --time-limit 30 --out /tmp/rebalance

For each Zipf exponent: how many servers of the uniform plan the skewed load drives past their
compute limit and the share of requests they carry; the plan rebalanced for the observed rates
(an incremental repack of the uniform plan, as ``myriad rebalance`` does): servers past the
limit (none: the validator checks it), its cost against the uniform plan and a fresh solve, and
the replicas it moved. Then rebalance quality: a drift that moves 10% of the traffic between
models, repacked within 2% of a fresh solve: its cost against the fresh solve and the share of
replicas it moved. Figures go to stdout as JSON lines and to DIR/figures.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.packing import profiles_for  # noqa: E402
from packing.contracts import Catalog, Limits, Plan, Problem, ProblemModel  # noqa: E402
from packing.io import load  # noqa: E402
from packing.repack import pack  # noqa: E402
from packing.solver import solve  # noqa: E402
from packing.traffic import TrafficSettings, with_traffic  # noqa: E402

TOTAL_RPS = 6230.0  # the reference architecture's load


def reference_problem(models: int, catalog: Catalog) -> Problem:
    profiles = profiles_for("bert-base", catalog)
    rate = TOTAL_RPS / models
    return Problem(
        name=f"reference-{models}",
        catalog=catalog,
        limits=Limits(),
        models=[
            ProblemModel(id=f"bert-{i:04d}", traffic_rps=rate, profiles=profiles)
            for i in range(models)
        ],
    )


def zipf_rates(ids: list[str], exponent: float, seed: int) -> dict[str, float]:
    """Rates ∝ 1/rank^exponent over a seeded shuffle of the models, summing to the total."""
    order = ids[:]
    random.Random(seed).shuffle(order)
    weights = [1.0 / (rank + 1) ** exponent for rank in range(len(order))]
    scale = TOTAL_RPS / sum(weights)
    return {model: w * scale for model, w in zip(order, weights, strict=True)}


def overload(problem: Problem, plan: Plan, rates: dict[str, float]) -> tuple[int, float]:
    """Servers of ``plan`` whose compute under ``rates`` passes the limit, and the share of
    all requests their models' replicas there carry."""
    types = {t.name: t for t in problem.catalog.instance_types}
    instances = {i.id: types[i.type] for i in plan.instances}
    models = {m.id: m for m in problem.models}
    replicas = {m: sum(1 for s in plan.servers if m in s.model_ids) for m in models}
    limit = problem.limits.max_compute_utilization
    over, carried = 0, 0.0
    for server in plan.servers:
        itype = instances[server.instance]
        load_s = (
            sum(
                rates[m] / replicas[m] * models[m].profile_for(itype).seconds_per_request
                for m in server.model_ids
            )
            / itype.compute_capacity
        )
        if load_s > limit * (1 + 1e-9):
            over += 1
            carried += sum(rates[m] / replicas[m] for m in server.model_ids)
    return over, carried / TOTAL_RPS


def drifted(rates: dict[str, float], share: float, seed: int) -> dict[str, float]:
    """Move ``share`` of the total traffic: take it from random models in proportion to their
    rate and give it to other random models."""
    rng = random.Random(seed)
    ids = sorted(rates)
    losers = set(rng.sample(ids, len(ids) // 10))
    taken_from = sum(rates[m] for m in losers)
    cut = min(1.0, share * TOTAL_RPS / taken_from)
    out = {m: r * (1 - cut) if m in losers else r for m, r in rates.items()}
    moved = sum(rates[m] - out[m] for m in losers)
    gainers = rng.sample([m for m in ids if m not in losers], len(ids) // 10)
    weights = [rng.random() for _ in gainers]
    for model, weight in zip(gainers, weights, strict=True):
        out[model] += moved * weight / sum(weights)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=3000)
    parser.add_argument("--time-limit", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--zipf", type=float, nargs="+", default=[0.8, 1.0, 1.2])
    parser.add_argument("--catalog", type=Path, default=ROOT / "catalogs/aws.yaml")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    catalog = load(args.catalog, Catalog)
    uniform = reference_problem(args.models, catalog)
    ids = [m.id for m in uniform.models]
    started = time.perf_counter()
    uniform_plan = solve(uniform, time_limit_s=args.time_limit)
    rows: list[dict] = [
        {
            "case": "uniform plan",
            "cost_per_hour": uniform_plan.cost_per_hour,
            "gap": round(uniform_plan.gap, 4),
            "servers": len(uniform_plan.servers),
            "solve_s": round(time.perf_counter() - started, 1),
        }
    ]
    print(json.dumps(rows[-1]), flush=True)
    for exponent in args.zipf:
        rates = zipf_rates(ids, exponent, args.seed)
        observed = with_traffic(uniform, rates, TrafficSettings(headroom=1.0), window_s=3600)
        over, carried = overload(observed, uniform_plan, rates)
        started = time.perf_counter()
        plan, repacked = pack(
            observed, current=uniform_plan, tolerance=0.05, time_limit_s=args.time_limit * 2
        )
        seconds = time.perf_counter() - started
        over_after, _ = overload(observed, plan, rates)
        replicas = sum(len(s.model_ids) for s in plan.servers)
        rows.append(
            {
                "case": f"zipf {exponent}",
                "servers_past_limit_before": over,
                "of_servers": len(uniform_plan.servers),
                "share_of_requests_on_them": round(carried, 4),
                "servers_past_limit_after": over_after,
                "cost_uniform": uniform_plan.cost_per_hour,
                "cost_rebalanced": plan.cost_per_hour,
                "cost_fresh_solve": repacked.fresh_cost_per_hour,
                "lower_bound": plan.lower_bound_cost_per_hour,
                "incremental": repacked.incremental,
                "replicas": replicas,
                "replicas_moved": len(repacked.moves),
                "moved_share": round(len(repacked.moves) / replicas, 4),
                "rebalance_s": round(seconds, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        if exponent == 1.0:
            # The drift starts from a plan solved for this traffic, as a steady state would be.
            base_problem, base_rates = observed, rates
            base_plan = solve(observed, time_limit_s=args.time_limit)
    if "base_plan" in locals():
        moved_rates = drifted(base_rates, 0.10, args.seed)
        target = with_traffic(base_problem, moved_rates, TrafficSettings(headroom=1.0), 3600)
        over, carried = overload(target, base_plan, moved_rates)
        started = time.perf_counter()
        plan, repacked = pack(
            target, current=base_plan, tolerance=0.02, time_limit_s=args.time_limit * 2
        )
        replicas = sum(len(s.model_ids) for s in base_plan.servers)
        rows.append(
            {
                "case": "drift of 10% of the traffic from a plan solved for zipf 1.0, tolerance 2%",
                "servers_past_limit_before": over,
                "share_of_requests_on_them": round(carried, 4),
                "cost_before": base_plan.cost_per_hour,
                "cost_rebalanced": plan.cost_per_hour,
                "cost_fresh_solve": repacked.fresh_cost_per_hour,
                "over_fresh": round(plan.cost_per_hour / repacked.fresh_cost_per_hour - 1, 4),
                "incremental": repacked.incremental,
                "replicas_moved": len(repacked.moves),
                "moved_share": round(len(repacked.moves) / replicas, 4),
                "rebalance_s": round(time.perf_counter() - started, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "figures.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
