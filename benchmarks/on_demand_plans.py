"""The on-demand tier on plans (no servers): the reference fleet (3,000 bert-base classifiers,
the packing benchmark's modelled profiles) under three traffic shapes, each packed with every
model resident and with the tier at a cold-fraction limit of 1% and 5%.

    python benchmarks/on_demand_plans.py --time-limit 60 --out /tmp/on-demand

Shapes, all at the reference's 6,230 requests/s in total:

- ``uniform``: 2.08 requests/s per model (the tier must keep every model resident);
- ``zipf``: Zipf 1.0 over the 3,000 models (ranks shuffled by seed 1);
- ``tenant``: 1,000 active models sharing 6,230 requests/s under Zipf 1.0 and 2,000 that see
  one request per 10 minutes.

A model busier than one replica can serve gets the replicas it needs (as ``myriad rebalance``
plans observed rates). Load times are modelled from the model's size, not measured: a cold
start from the server's local cache is 0.5 s plus its bytes at 500 MB/s (about 1.1 s on a GPU
for bert-base in fp16, 1.6 s on a CPU in fp32), and from the store 0.5 s plus its bytes at
100 MB/s. Every plan is validated. Figures go to stdout as JSON lines and to DIR/figures.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.packing import profiles_for  # noqa: E402
from packing.cold import hit_probability  # noqa: E402
from packing.contracts import (  # noqa: E402
    Catalog,
    Limits,
    OnDemandLimits,
    Plan,
    Problem,
    ProblemModel,
    Profile,
)
from packing.io import load, save  # noqa: E402
from packing.solver import solve  # noqa: E402
from packing.traffic import TrafficSettings, with_traffic  # noqa: E402
from packing.validate import check  # noqa: E402

TOTAL_RPS = 6230.0
MODELS = 3000
ACTIVE = 1000
TAIL_RPS = 1 / 600


def modelled_load(profile: Profile) -> Profile:
    size = profile.memory_bytes
    return msgspec.structs.replace(
        profile,
        load_seconds=round(0.5 + size / 500e6, 3),
        store_load_seconds=round(0.5 + size / 100e6, 3),
    )


def zipf(count: int, total: float, seed: int) -> list[float]:
    weights = [1.0 / (rank + 1) for rank in range(count)]
    random.Random(seed).shuffle(weights)
    scale = total / sum(weights)
    return [w * scale for w in weights]


def shape_rates(shape: str) -> list[float]:
    if shape == "uniform":
        return [TOTAL_RPS / MODELS] * MODELS
    if shape == "zipf":
        return zipf(MODELS, TOTAL_RPS, 1)
    return zipf(ACTIVE, TOTAL_RPS, 1) + [TAIL_RPS] * (MODELS - ACTIVE)


def problem_for(shape: str, catalog: Catalog) -> Problem:
    profiles = [modelled_load(p) for p in profiles_for("bert-base", catalog)]
    rates = shape_rates(shape)
    ids = [f"bert-{i:04d}" for i in range(MODELS)]
    problem = Problem(
        name=f"reference-{shape}",
        catalog=catalog,
        limits=Limits(),
        models=[ProblemModel(id=m, traffic_rps=1.0, profiles=profiles) for m in ids],
    )
    # Replicas for the models one replica cannot serve, as a rebalance plans observed rates.
    settings = TrafficSettings(floor_rps=0.0, headroom=1.0, min_window_s=0.0)
    return with_traffic(problem, dict(zip(ids, rates, strict=True)), settings, 3600.0)


def cached_share(problem: Problem, plan: Plan, t: float) -> float:
    """The expected share of models in memory: resident ones, and on-demand ones by Che at the
    tier's characteristic time (estimated from each server's cold fraction where needed)."""
    on_demand = {m for s in plan.servers for m in s.on_demand_model_ids}
    if not on_demand:
        return 1.0
    held = 0.0
    for model in problem.models:
        if model.id in on_demand:
            held += hit_probability(model.traffic_rps / model.replicas, t)
        else:
            held += 1.0
    return held / len(problem.models)


def figures_of(shape: str, limit: float | None, problem: Problem, plan: Plan, wall: float) -> dict:
    from packing.solver.tier import choose_tier

    on_demand = {m for s in plan.servers for m in s.on_demand_model_ids}
    tier = choose_tier(problem) if limit is not None else None
    return {
        "shape": shape,
        "max_cold_fraction": limit,
        "replicas": sum(m.replicas for m in problem.models),
        "instances": len(plan.instances),
        "servers": len(plan.servers),
        "cost_per_hour": plan.cost_per_hour,
        "lower_bound_cost_per_hour": plan.lower_bound_cost_per_hour,
        "gap": plan.gap,
        "on_demand_models": len(on_demand),
        "cache_gib": round(sum(s.cache_memory_bytes for s in plan.servers) / 2**30, 2),
        "memory_gib": round(sum(s.memory_bytes for s in plan.servers) / 2**30, 2),
        "cold_fraction": plan.cold_fraction,
        "cold_start_seconds": plan.cold_start_seconds,
        "characteristic_time_s": None if tier is None else round(tier.characteristic_time, 2),
        "models_cached": round(
            cached_share(problem, plan, tier.characteristic_time) if tier else 1.0, 4
        ),
        "instance_types": sorted({i.type for i in plan.instances}),
        "solve_seconds": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shapes", default="uniform,zipf,tenant")
    parser.add_argument("--limits", default="0.01,0.05")
    parser.add_argument("--catalog", type=Path, default=ROOT / "catalogs/aws.yaml")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    catalog = load(args.catalog, Catalog)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shapes.split(","):
        base = problem_for(shape, catalog)
        for limit in [None, *(float(v) for v in args.limits.split(","))]:
            tier = None if limit is None else OnDemandLimits(max_cold_fraction=limit)
            problem = msgspec.structs.replace(base, limits=Limits(on_demand=tier))
            started = time.perf_counter()
            plan = solve(problem, time_limit_s=args.time_limit, workers=args.workers)
            wall = time.perf_counter() - started
            check(problem, plan)
            name = f"{shape}-{'resident' if limit is None else limit}"
            save(plan, args.out / f"{name}.json")
            row = figures_of(shape, limit, problem, plan, wall)
            rows.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "figures.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
