"""Packing benchmark: a seeded fleet of mixed sizes and rates on the AWS catalog.

    python benchmarks/packing.py --models 3000 --seed 1 --time-limit 30 --out /tmp/pack-3000

writes DIR/problem.yaml and DIR/plan.json, validates the plan independently and prints cost,
lower bound, gap, solve time and the peak resident memory of generating and solving.
``--deterministic`` bounds the search by work instead of the clock (``--time-limit`` is then a
budget of CP-SAT deterministic seconds, one worker per solve, fixed seeds, SCIP by nodes), so a
row repeats exactly however loaded the machine is; the mode is printed with the figures. The
profiles are modelled on measured figures (DESIGN.md for the GPU, the reference's 19 bert-base
per Inferentia chip), scaled per accelerator.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from packing.contracts import Catalog, Limits, Problem, ProblemModel, Profile  # noqa: E402
from packing.io import load, save  # noqa: E402
from packing.report import plan_table  # noqa: E402
from packing.solver import solve  # noqa: E402
from packing.validate import check  # noqa: E402

MIB = 2**20

# architecture: (share of the fleet, resident MiB on cpu / gpu / inf, seconds per request on
# one CPU core, a T4, an inf1 chip)
ARCHITECTURES = {
    "bert-tiny": (0.25, (40, 30, 25), (0.002, 0.0008, 0.001)),
    "minilm-l6": (0.30, (150, 110, 95), (0.012, 0.0015, 0.002)),
    "bert-base": (0.35, (520, 300, 380), (0.060, 0.0045, 0.020)),
    "bert-large": (0.10, (1450, 800, 1100), (0.200, 0.0120, 0.050)),
}
# Requests per second per model: most models are quiet, a few are hot.
RATES = ((0.1, 0.35), (0.5, 0.30), (2.0, 0.20), (5.0, 0.10), (20.0, 0.05))
REPLICAS = ((1, 0.75), (2, 0.20), (3, 0.05))
# Seconds per request relative to a T4, per GPU accelerator in the catalog.
GPU_SPEED = {
    "nvidia-t4": 1.0,
    "nvidia-a10g": 0.65,
    "nvidia-l4": 0.7,
    "nvidia-l40s": 0.4,
    "nvidia-a100-40gb": 0.35,
    "nvidia-h100-80gb": 0.2,
}
INF_SPEED = {"inferentia": 1.0, "inferentia2": 0.4}


def _pick(rng: random.Random, table: tuple[tuple[float, float], ...]) -> float:
    return rng.choices([v for v, _ in table], weights=[w for _, w in table])[0]


def profiles_for(arch: str, catalog: Catalog) -> list[Profile]:
    """The modelled profiles of one architecture on every processor the catalog has."""
    by_accelerator: dict[str, list[str]] = {}
    for t in catalog.instance_types:
        if t.accelerator:
            by_accelerator.setdefault(t.accelerator, []).append(t.name)
    _, (cpu_mib, gpu_mib, inf_mib), (cpu_s, gpu_s, inf_s) = ARCHITECTURES[arch]
    profiles = [Profile(processor="cpu", memory_bytes=cpu_mib * MIB, seconds_per_request=cpu_s)]
    for processor, speeds, mib, seconds in (
        ("gpu", GPU_SPEED, gpu_mib, gpu_s),
        ("inf", INF_SPEED, inf_mib, inf_s),
    ):
        for accelerator, speed in speeds.items():
            if accelerator in by_accelerator:
                profiles.append(
                    Profile(
                        processor=processor,
                        memory_bytes=mib * MIB,
                        seconds_per_request=seconds * speed,
                        instance_types=sorted(by_accelerator[accelerator]),
                    )
                )
    return profiles


def generate(models: int, seed: int, catalog: Catalog) -> Problem:
    rng = random.Random(seed)
    names = list(ARCHITECTURES)
    by_arch = {name: profiles_for(name, catalog) for name in names}
    fleet = []
    for i in range(models):
        arch = rng.choices(names, weights=[ARCHITECTURES[n][0] for n in names])[0]
        profiles = by_arch[arch]
        fleet.append(
            ProblemModel(
                id=f"{arch}-{i:05d}",
                traffic_rps=_pick(rng, RATES),
                replicas=int(_pick(rng, REPLICAS)),
                profiles=profiles,
            )
        )
    return Problem(
        name=f"bench-{models}-seed{seed}", catalog=catalog, limits=Limits(), models=fleet
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="bound the search by work (deterministic seconds) instead of the clock",
    )
    parser.add_argument("--catalog", type=Path, default=ROOT / "catalogs/aws.yaml")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    problem = generate(args.models, args.seed, load(args.catalog, Catalog))
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        plan = solve(
            problem,
            time_limit_s=args.time_limit,
            workers=args.workers,
            deterministic=args.deterministic,
        )
    finally:
        wall = time.perf_counter() - started
        # The process's peak so far: the problem and the solve, before PyYAML's emitter (which
        # holds gigabytes for a 100,000-model problem) writes the problem out.
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        save(problem, args.out / "problem.yaml")
    check(problem, plan)
    save(plan, args.out / "plan.json")
    for row in plan_table(problem, plan):
        print("  ".join(f"{k}: {v}" for k, v in row.items()))
    figures = {
        "models": args.models,
        "seed": args.seed,
        "replicas": sum(m.replicas for m in problem.models),
        "instances": len(plan.instances),
        "cost_per_hour": plan.cost_per_hour,
        "lower_bound_cost_per_hour": plan.lower_bound_cost_per_hour,
        "gap": plan.gap,
        "solver_status": plan.solver_status,
        "solve_seconds": round(wall, 2),
        "peak_rss_gib": round(peak_gib, 2),
        "time_limit": args.time_limit,
        "mode": "deterministic" if args.deterministic else "wall-clock",
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
