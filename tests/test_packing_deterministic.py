"""The deterministic mode: the same problem and work budget give the same plan, byte for byte
(apart from when it was made and how long it took), however loaded the machine is."""

from __future__ import annotations

import hashlib
import random

import msgspec
import pytest

from packing.contracts import Catalog, InstanceType, Limits, Problem, ProblemModel, Profile
from packing.io import to_json
from packing.solver import bounds, cpsat, prepare, schedule, solve
from packing.validate import check

GIB = 2**30


def _type(name: str, price: float, devices: int, memory_gib: float, processor: str):
    return InstanceType(
        name=name,
        family=name.split(".")[0],
        processor=processor,
        devices=devices,
        device_memory_gib=memory_gib,
        host_memory_gib=memory_gib * devices * 2,
        vcpus=4,
        on_demand_per_hour=price,
        price_source="test",
    )


def _problem(models: int, seed: int) -> Problem:
    """A mixed fleet of two processor kinds, past the exact search's size, so the volume
    model, SCIP's starts and bound and the neighbourhood search all run."""
    rng = random.Random(seed)
    fleet = []
    for i in range(models):
        memory = rng.choice([0.3, 0.9, 1.7, 3.1])
        compute = rng.choice([0.01, 0.05, 0.2])
        fleet.append(
            ProblemModel(
                id=f"m{i:03d}",
                traffic_rps=compute * 100,
                replicas=rng.choice([1, 1, 2]),
                profiles=[
                    Profile(processor=kind, memory_bytes=int(gib * GIB), seconds_per_request=s)
                    for kind, gib, s in (("gpu", memory, 0.01), ("cpu", memory * 1.5, 0.08))
                ],
            )
        )
    catalog = Catalog(
        name="test",
        region="test-1",
        prices_as_of="2026-12-01",
        source="test",
        instance_types=[
            _type("g.x", 1.0, 1, 16, "gpu"),
            _type("g.4x", 3.7, 4, 16, "gpu"),
            _type("c.x", 0.2, 1, 8, "cpu"),
            _type("c.2x", 0.38, 1, 16, "cpu"),
        ],
    )
    return Problem(name="det", catalog=catalog, limits=Limits(), models=fleet)


def _blanked(plan) -> bytes:
    # Wall-clock fields differ run to run; the placement, cost and bound must not.
    return to_json(
        msgspec.structs.replace(plan, created_at="", solve_seconds=0.0, solve_trajectory=[])
    )


def test_deterministic_mode_repeats_the_plan_byte_for_byte() -> None:
    problem = _problem(150, 5)
    first = solve(problem, time_limit_s=1.5, workers=2, deterministic=True)
    check(problem, first)
    second = solve(problem, time_limit_s=1.5, workers=2, deterministic=True)
    assert _blanked(first) == _blanked(second)
    assert first.plan_id == second.plan_id


def test_deterministic_mode_on_a_small_problem_is_optimal_and_repeats() -> None:
    problem = _problem(6, 2)
    first = solve(problem, time_limit_s=2, deterministic=True)
    second = solve(problem, time_limit_s=2, deterministic=True)
    check(problem, first)
    assert first.solver_status == "optimal"
    assert _blanked(first) == _blanked(second)


def test_deterministic_mode_keeps_the_whole_instance_bound() -> None:
    """The bound that runs to its node limit before the search is the one reported (at
    least), as the bound beside the search is on the wall clock."""
    problem = _problem(150, 5)
    kinds = prepare.types_of(problem)
    classes = prepare.classes_of(problem, kinds)
    prepare.check_feasible(problem, kinds, classes)
    kinds = prepare.drop_dominated(kinds, classes)
    deadline = max(1.5 * schedule.SEARCH_SHARE - schedule.PLAN_SECONDS, 0.1)
    bound = bounds.WholeInstanceBound(kinds, classes, deadline, cpsat.Clock(True)).result()
    assert bound > 0
    plan = solve(problem, time_limit_s=1.5, deterministic=True)
    assert plan.lower_bound_cost_per_hour >= bound - 1e-9


# sha256 of the blanked plan JSON the code before the on-demand tier (commit b19c527) made for
# _problem(models, 7) at these budgets: a plan without the tier must stay the same to the byte.
GOLDEN = {
    (100, 1.5): "43ce249261d77009ba33fa9bc76fd760660c2680cd91b77c4e879986200a4ada",
    (1000, 3.0): "8113eea20b34c33876d55b1cd29e9bb3ccdd79075704d304d4115ad2a6487f57",
    (3000, 5.0): "a2b7ca33d5e4017461f1e4b2f2439b7ea936fdb1dabedc62f915de7a424575d7",
}


@pytest.mark.parametrize(
    ("models", "budget"),
    [
        (100, 1.5),
        (1000, 3.0),
        pytest.param(3000, 5.0, marks=pytest.mark.slow),
    ],
)
def test_plans_without_the_on_demand_tier_are_those_made_before_it(
    models: int, budget: float
) -> None:
    plan = solve(_problem(models, 7), time_limit_s=budget, workers=2, deterministic=True)
    assert b'"on_demand_model_ids":' not in to_json(plan) and b'"cold_' not in to_json(plan)
    assert hashlib.sha256(_blanked(plan)).hexdigest() == GOLDEN[models, budget]
