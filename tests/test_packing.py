"""The packer: every plan passes the independent validator; small problems match brute force."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from packing.contracts import (
    Catalog,
    InstanceType,
    Limits,
    Problem,
    ProblemModel,
    Profile,
)
from packing.io import load
from packing.plot import plot_plan
from packing.repack import repack
from packing.report import plan_table
from packing.solver import (
    InfeasibleError,
    assemble,
    bounds,
    exact,
    fill,
    neighbourhood,
    prepare,
    realise,
    schedule,
    solve,
)
from packing.solver.model import Device, Instance
from packing.validate import PlanError, check, violations

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def instance_type(
    name: str, price: float, devices: int = 1, memory_gib: float = 8, processor: str = "gpu"
) -> InstanceType:
    return InstanceType(
        name=name,
        family=name.split(".")[0],
        processor=processor,
        devices=devices,
        device_memory_gib=memory_gib,
        host_memory_gib=memory_gib * devices,
        vcpus=2,
        on_demand_per_hour=price,
        price_source="test",
    )


def problem_of(
    models: list[ProblemModel], types: list[InstanceType], quotas: dict | None = None
) -> Problem:
    catalog = Catalog(
        name="test",
        region="test-1",
        prices_as_of="2026-11-01",
        source="test",
        instance_types=types,
    )
    return Problem(
        name="test",
        catalog=catalog,
        limits=Limits(
            max_memory_fraction=1.0, max_compute_utilization=1.0, instance_quotas=quotas or {}
        ),
        models=models,
    )


def model(
    model_id: str, memory_gib: float, compute: float = 0.0, replicas: int = 1, processor="gpu"
) -> ProblemModel:
    """``compute`` is the whole model's demand in device-seconds per second."""
    return ProblemModel(
        id=model_id,
        traffic_rps=compute * 100 if compute else 0.0,
        replicas=replicas,
        profiles=[
            Profile(
                processor=processor,
                memory_bytes=int(memory_gib * GIB),
                seconds_per_request=0.01,
            )
        ],
    )


def brute_force_cost(problem: Problem) -> float:
    """Exhaustive search: replicas one by one onto opened instances or a fresh one of any type.
    Instances are opened in order, so only symmetric duplicates are skipped."""
    limits = problem.limits
    types = problem.catalog.instance_types
    replicas = [(m, r) for m in problem.models for r in range(m.replicas)]
    best = [float("inf")]

    def demand(m: ProblemModel, t: InstanceType) -> tuple[float, float]:
        profile = m.profile_for(t)
        assert profile is not None
        return profile.memory_bytes, m.traffic_rps * profile.seconds_per_request / m.replicas

    def fits(load: list, t: InstanceType, m: ProblemModel) -> bool:
        memory, compute = demand(m, t)
        return (
            load[0] + memory <= limits.max_memory_fraction * t.device_memory_bytes + 1e-6
            and load[1] + compute <= limits.max_compute_utilization * t.compute_capacity + 1e-9
        )

    def search(k: int, opened: list, cost: float) -> None:
        if cost >= best[0] - 1e-9:
            return
        if k == len(replicas):
            best[0] = cost
            return
        m, _ = replicas[k]
        for t, devices, holds in opened:
            if m.id in holds:
                continue
            for device in devices:
                if fits(device, t, m):
                    memory, compute = demand(m, t)
                    device[0] += memory
                    device[1] += compute
                    holds.add(m.id)
                    search(k + 1, opened, cost)
                    holds.discard(m.id)
                    device[0] -= memory
                    device[1] -= compute
        for t in types:
            quota = limits.instance_quotas.get(t.name)
            if quota is not None and sum(1 for o in opened if o[0] is t) >= quota:
                continue
            devices = [[0.0, 0.0] for _ in range(t.devices)]
            if fits(devices[0], t, m):
                memory, compute = demand(m, t)
                devices[0] = [memory, compute]
                opened.append((t, devices, {m.id}))
                search(k + 1, opened, cost + t.on_demand_per_hour)
                opened.pop()

    search(0, [], 0.0)
    return best[0]


def random_problem(seed: int) -> Problem:
    rng = random.Random(seed)
    types = [
        instance_type("small.x", round(rng.uniform(0.2, 0.6), 3), 1, 8),
        instance_type("big.x", round(rng.uniform(0.8, 1.6), 3), 2, 16),
        instance_type("wide.x", round(rng.uniform(0.9, 2.0), 3), 4, 8),
    ]
    models = [
        model(
            f"m{i}",
            memory_gib=rng.choice([1.5, 3, 5, 7, 10]),
            compute=rng.choice([0.0, 0.2, 0.45, 0.7]),
            replicas=rng.choice([1, 1, 1, 2]),
        )
        for i in range(rng.randint(3, 5))
    ]
    quotas = {"small.x": rng.choice([1, 2, 3])} if rng.random() < 0.4 else {}
    return problem_of(models, types, quotas)


@pytest.mark.parametrize("seed", range(12))
def test_small_problems_are_optimal_against_brute_force(seed: int) -> None:
    problem = random_problem(seed)
    plan = solve(problem, time_limit_s=5)
    assert violations(problem, plan) == []
    assert plan.cost_per_hour == pytest.approx(brute_force_cost(problem), abs=1e-6)
    assert plan.lower_bound_cost_per_hour <= plan.cost_per_hour + 1e-9
    assert plan.solver_status == "optimal" and plan.gap == 0


def test_lower_bound_never_exceeds_the_optimum() -> None:
    for seed in range(12, 20):
        problem = random_problem(seed)
        plan = solve(problem, time_limit_s=5)
        assert plan.lower_bound_cost_per_hour <= brute_force_cost(problem) + 1e-6


def _whole_instance_bound(problem: Problem) -> float:
    """The whole-instance bound once SCIP has finished by itself."""
    import time

    kinds = prepare.types_of(problem)
    classes = prepare.classes_of(problem, kinds)
    prepare.check_feasible(problem, kinds, classes)
    whole = bounds.WholeInstanceBound(kinds, classes, 10.0)
    give_up = time.perf_counter() + 10.0
    while whole.bound() == 0 and time.perf_counter() < give_up:
        time.sleep(0.01)
    return whole.result()


def test_whole_instance_bound_lies_between_the_lp_and_the_optimum() -> None:
    # Seven 3 GiB models on 8 GiB devices at $1: the volume LP needs 21/8 = 2.625 devices,
    # whole instances 3, and only two fit a device, so the optimum is 4.
    problem = problem_of([model(f"m{i}", 3.0) for i in range(7)], [instance_type("g.x", 1.0)])
    assert _whole_instance_bound(problem) == pytest.approx(3.0)
    assert brute_force_cost(problem) == pytest.approx(4.0)
    for seed in range(12, 20):
        problem = random_problem(seed)
        assert _whole_instance_bound(problem) <= brute_force_cost(problem) + 1e-6


def test_replicas_land_on_distinct_instances() -> None:
    problem = problem_of(
        [model("a", 1, replicas=3), model("b", 1, replicas=2)], [instance_type("g.x", 1.0, 4)]
    )
    plan = solve(problem, time_limit_s=5)
    check(problem, plan)
    assert len(plan.instances) == 3
    assert {len(plan.servers_for("a")), len(plan.servers_for("b"))} == {3, 2}


def test_quota_forces_the_dearer_type() -> None:
    models = [model(f"m{i}", 6) for i in range(3)]
    types = [instance_type("cheap.x", 0.5), instance_type("dear.x", 0.9)]
    plan = solve(problem_of(models, types, {"cheap.x": 1}), time_limit_s=5)
    assert sorted(i.type for i in plan.instances) == ["cheap.x", "dear.x", "dear.x"]
    assert plan.cost_per_hour == pytest.approx(2.3)


def test_spot_prices_are_used_when_asked() -> None:
    types = [
        InstanceType(
            name="s.x",
            family="s",
            processor="gpu",
            devices=1,
            device_memory_gib=8,
            host_memory_gib=8,
            vcpus=2,
            on_demand_per_hour=1.0,
            spot_per_hour=0.3,
            price_source="test",
        ),
        instance_type("o.x", 0.5),
    ]
    problem = problem_of([model("a", 1)], types)
    assert solve(problem, time_limit_s=5).instances[0].type == "o.x"
    spot_problem = Problem(
        name="t",
        price="spot",
        catalog=problem.catalog,
        limits=problem.limits,
        models=problem.models,
    )
    plan = solve(spot_problem, time_limit_s=5)
    assert [(i.type, i.price_per_hour) for i in plan.instances] == [("s.x", 0.3)]
    check(spot_problem, plan)


@pytest.mark.parametrize(
    ("models", "quotas", "expected"),
    [
        ([model("huge", 20), model("ok", 1)], {}, ["model huge", "GiB per replica"]),
        ([model("hot", 1, compute=3.0)], {}, ["model hot", "raise replicas"]),
        ([model("a", 1, replicas=3)], {"g.x": 2}, ["model a", "3 replicas", "quotas"]),
        ([model(f"m{i}", 7) for i in range(3)], {"g.x": 2}, ["instance_quotas", "m0"]),
    ],
)
def test_infeasible_problems_name_models_and_constraint(
    models: list[ProblemModel], quotas: dict, expected: list[str]
) -> None:
    problem = problem_of(models, [instance_type("g.x", 1.0, 1, 8)], quotas)
    with pytest.raises(InfeasibleError) as raised:
        solve(problem, time_limit_s=5)
    for fragment in expected:
        assert fragment in str(raised.value)


def test_no_profile_for_any_type_is_named() -> None:
    problem = problem_of([model("cpu-only", 1, processor="cpu")], [instance_type("g.x", 1.0)])
    with pytest.raises(InfeasibleError, match="cpu-only: no profile matches"):
        solve(problem, time_limit_s=5)


def test_validator_catches_broken_plans() -> None:
    problem = problem_of(
        [model("a", 5, replicas=2), model("b", 5)], [instance_type("g.x", 1.0, 2, 8)]
    )
    plan = solve(problem, time_limit_s=5)
    check(problem, plan)
    first = plan.servers[0]
    crowded = first.__class__(
        **{
            **{f: getattr(first, f) for f in first.__struct_fields__},
            "model_ids": ["a", "b"],
        }
    )
    broken = plan.__class__(
        **{
            **{f: getattr(plan, f) for f in plan.__struct_fields__},
            "servers": [crowded, *plan.servers[1:]],
            "cost_per_hour": 0.5,
        }
    )
    with pytest.raises(PlanError) as raised:
        check(problem, broken)
    message = str(raised.value)
    for fragment in ("exceed the memory cap", "cost_per_hour 0.5", "placed"):
        assert fragment in message


def test_reference_3000_bert_base_on_inf1_matches_its_40_instances() -> None:
    """76 models per inf1.6xlarge (19 per chip) at 2.05 requests/s each, as the reference."""
    catalog = load(ROOT / "catalogs/aws.yaml", Catalog)
    chip = catalog.get("inf1.6xlarge")
    limits = Limits()
    per_model = int(limits.max_memory_fraction * chip.device_memory_bytes / 19)
    models = [
        ProblemModel(
            id=f"bert-{i:04d}",
            traffic_rps=2.05,
            profiles=[
                Profile(
                    processor="inf",
                    memory_bytes=per_model,
                    seconds_per_request=0.02,
                    instance_types=["inf1.6xlarge"],
                )
            ],
        )
        for i in range(3000)
    ]
    problem = Problem(name="reference-3000", catalog=catalog, limits=limits, models=models)
    plan = solve(problem, time_limit_s=30)
    check(problem, plan)
    assert len(plan.instances) <= 40
    assert {i.type for i in plan.instances} == {"inf1.6xlarge"}
    assert plan.cost_per_hour == pytest.approx(40 * 1.18)
    assert plan.gap == 0 and plan.solver_status == "optimal"
    rows = plan_table(problem, plan)
    assert rows[0]["instance type"] == "inf1.6xlarge"
    assert rows[0]["instances"] == 40
    assert rows[-1]["cost per hour"] == "$47.2000"


def test_mixed_fleet_on_the_aws_catalog_is_valid_and_near_the_bound() -> None:
    catalog = load(ROOT / "catalogs/aws.yaml", Catalog)
    rng = random.Random(7)
    sizes = [(0.05, 0.004), (0.45, 0.02), (1.3, 0.05)]  # GiB, seconds per request on GPU
    models = []
    for i in range(300):
        memory, seconds = rng.choice(sizes)
        rate = rng.choice([0.5, 2.0, 10.0])
        models.append(
            ProblemModel(
                id=f"m{i:03d}",
                traffic_rps=rate,
                replicas=rng.choice([1, 1, 2]),
                profiles=[
                    Profile(
                        processor="gpu", memory_bytes=int(memory * GIB), seconds_per_request=seconds
                    ),
                    Profile(
                        processor="cpu",
                        memory_bytes=int(memory * 1.2 * GIB),
                        seconds_per_request=seconds * 12,
                    ),
                ],
            )
        )
    problem = Problem(name="mixed", catalog=catalog, models=models)
    plan = solve(problem, time_limit_s=10)
    check(problem, plan)
    assert plan.gap < 0.05, plan.gap


def test_repack_keeps_models_in_place_and_reports_moves() -> None:
    types = [instance_type("g.x", 1.0, 2, 8), instance_type("h.x", 0.7, 1, 8)]
    before = problem_of([model(f"m{i:02d}", 1.5, compute=0.1) for i in range(20)], types)
    current = solve(before, time_limit_s=5)
    models = [model(f"m{i:02d}", 1.5, compute=0.1) for i in range(2, 20)]  # m00, m01 removed
    models[0] = model("m02", 2.5, compute=0.1)  # resized
    models += [model(f"n{i}", 1.0) for i in range(3)]  # added
    after = problem_of(models, types)
    result = repack(after, current, tolerance=0.5, time_limit_s=5)
    check(after, result.plan)
    assert result.incremental
    where_before = {m: s.id for s in current.servers for m in s.model_ids}
    where_after = {m: s.id for s in result.plan.servers for m in s.model_ids}
    unchanged = [f"m{i:02d}" for i in range(3, 20)]
    assert all(where_after[m] == where_before[m] for m in unchanged)
    by_model = {}
    for move in result.moves:
        by_model.setdefault(move.model_id, []).append(move)
    assert {m.target for m in by_model["m00"] + by_model["m01"]} == {None}
    assert {m.source for m in by_model["n0"]} == {None}
    assert set(by_model) <= {"m00", "m01", "m02", "n0", "n1", "n2"}
    assert result.kept_replicas >= len(unchanged)


def test_repack_falls_back_to_a_fresh_plan_past_the_tolerance() -> None:
    types = [instance_type("g.x", 1.0, 1, 8)]
    current = solve(problem_of([model(c, 6) for c in "abcd"], types), time_limit_s=5)
    assert len(current.instances) == 4
    shrunk = problem_of([model(c, 1) for c in "abcd"], types)
    result = repack(shrunk, current, tolerance=0.1, time_limit_s=5)
    check(shrunk, result.plan)
    assert not result.incremental
    assert result.plan.cost_per_hour == pytest.approx(1.0)
    assert len(result.moves) == 3  # one model stays where it was
    generous = repack(shrunk, current, tolerance=4.0, time_limit_s=5)
    assert generous.incremental and generous.moves == []


def test_plot_writes_a_png(tmp_path: Path) -> None:
    problem = problem_of(
        [model(f"m{i}", 1 + i % 3, compute=0.1 * (i % 4), replicas=1 + i % 2) for i in range(12)],
        [instance_type("g.x", 1.0, 2, 8)],
    )
    out = plot_plan(problem, solve(problem, time_limit_s=5), tmp_path / "plan.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_quota_holds_when_whole_devices_need_more_than_the_volumes_say() -> None:
    """400 models of 3 GiB: by volume 100 cheap 8 GiB instances hold 266, on whole devices
    only 200; the rest must go elsewhere, not onto a 101st cheap instance."""
    models = [model(f"m{i:03d}", 3) for i in range(400)]
    types = [instance_type("cheap.x", 0.5), instance_type("dear.x", 1.0, 1, 16)]
    problem = problem_of(models, types, {"cheap.x": 100})
    plan = solve(problem, time_limit_s=10)
    check(problem, plan)
    assert sum(1 for i in plan.instances if i.type == "cheap.x") <= 100
    # The realisation step on its own, given the volume model's answer (266 on cheap.x), must
    # already keep the quota; later steps are not there to repair it.
    kinds = prepare.types_of(problem)
    classes = prepare.classes_of(problem, kinds)
    prepare.check_feasible(problem, kinds, classes)
    cheap, dear = kinds
    instances = realise.pack_assignment(
        kinds, classes, {(0, cheap.index): 266, (0, dear.index): 134}
    )
    assert sum(1 for i in instances if i.type is cheap) <= 100
    assert sum(n for i in instances for d in i.devices for n in d.load.values()) == 400


def test_tight_quota_with_a_valid_plan_is_solved() -> None:
    """Whole-device packing must pair the 3 GiB models and group the 2 GiB ones."""
    models = [model("a0", 3), model("a1", 3), model("b0", 2), model("b1", 2), model("b2", 2)]
    problem = problem_of(models, [instance_type("g.x", 1.0, 1, 6)], {"g.x": 2})
    plan = solve(problem, time_limit_s=5)
    check(problem, plan)
    assert len(plan.instances) == 2


def test_prices_that_do_not_scale_exactly_still_prove_optimality() -> None:
    problem = problem_of([model("a", 1)], [instance_type("g.x", 0.072)])
    plan = solve(problem, time_limit_s=5)
    assert plan.solver_status == "optimal" and plan.gap == 0


def test_repack_respects_a_lowered_quota() -> None:
    types = [instance_type("a.x", 1.0, 1, 8), instance_type("b.x", 1.04, 1, 8)]
    current = solve(problem_of([model(c, 6) for c in "abc"], types), time_limit_s=5)
    assert {i.type for i in current.instances} == {"a.x"}
    lowered = problem_of([model(c, 6) for c in "abc"], types, {"a.x": 2})
    result = repack(lowered, current, tolerance=0.5, time_limit_s=5)
    check(lowered, result.plan)
    assert sorted(i.type for i in result.plan.instances) == ["a.x", "a.x", "b.x"]
    assert len(result.moves) == 1


def _scattered_start(problem: Problem):
    """Every replica alone on an instance of the dearest type: a start with plenty to gain."""
    kinds = prepare.types_of(problem)
    classes = prepare.classes_of(problem, kinds)
    prepare.check_feasible(problem, kinds, classes)
    dearest = max(kinds, key=lambda t: t.price)
    start = []
    for ci, group in enumerate(classes):
        for _ in range(group.total_replicas):
            device = Device()
            device.add(ci, 1, group.options[dearest.index])
            start.append(Instance(dearest, [device]))
    return kinds, classes, start


def _as_checked_plan(problem: Problem, classes, instances) -> float:
    cost = sum(i.type.price for i in instances)
    plan = assemble.assemble_plan(
        problem,
        classes,
        instances,
        cost=cost,
        lower_bound=0.0,
        gap=1.0,
        status="feasible",
        seconds=0.0,
        plan_id="neighbourhood",
    )
    check(problem, plan)
    return cost


@pytest.mark.parametrize("quota", [None, 3])
def test_neighbourhood_search_only_lowers_cost_and_keeps_every_limit(quota) -> None:
    """From 40 replicas each alone on a dear instance, re-packing a few instances at a time
    must reach a valid plan far cheaper, moving replicas across types and keeping quotas and
    anti-affinity (20 models with 2 replicas each)."""
    import time

    models = [model(f"m{i:02d}", 1.0, compute=0.05, replicas=2) for i in range(20)]
    types = [instance_type("big.x", 1.0, 1, 8), instance_type("small.x", 0.45, 1, 4)]
    problem = problem_of(models, types, {"small.x": quota} if quota else None)
    kinds, classes, start = _scattered_start(problem)
    before = _as_checked_plan(problem, classes, start)
    assert before == pytest.approx(40.0)
    result = neighbourhood.neighbourhood_search(
        kinds,
        classes,
        start,
        time.perf_counter() + 4.0,
        workers=2,
        attempt_s=schedule.NEIGHBOURHOOD_SECONDS,
        group_s=schedule.GROUP_SECONDS,
    )
    after = _as_checked_plan(problem, classes, result)
    # 40 GiB need at least 4.5 dollars' worth (5 big or 10 small); the search gets close.
    assert after <= 8.0, after
    if quota:
        assert sum(1 for i in result if i.type.name == "small.x") <= quota


def test_exact_fill_packs_what_a_poor_start_left_over() -> None:
    """Two 10 GiB devices for 6 + 4 and 5 + 5 GiB: a start that put 6 and 5 GiB apart leaves
    two models over; the exact fill places all four and keeps every limit."""
    models = [model("six", 6), model("five-a", 5), model("five-b", 5), model("four", 4)]
    problem = problem_of(models, [instance_type("g.x", 1.0, memory_gib=10)])
    kinds, classes, _ = _scattered_start(problem)
    (t,) = kinds
    items = {ci: group.total_replicas for ci, group in enumerate(classes)}
    size = {ci: group.options[t.index][0] for ci, group in enumerate(classes)}
    by_size = {round(size[ci] / GIB): ci for ci in items}
    start = [Instance(t, [Device(size[by_size[n]], 0.0, {by_size[n]: 1})]) for n in (6, 5)]
    start_left = {by_size[5]: 1, by_size[4]: 1}
    value = {ci: size[ci] / GIB for ci in items}
    packed, left = exact.fill_exactly(
        t, classes, items, 2, start, start_left, value, time_limit_s=5.0, workers=1
    )
    assert left == {}
    assert _as_checked_plan(problem, classes, packed) == pytest.approx(2.0)


def test_filled_start_places_every_replica_within_every_limit() -> None:
    """The whole-instance solution filled onto its own instances, leftovers on fresh ones:
    a valid plan on a mixed fleet of two processor kinds, no dearer than the realisation."""
    import time

    rng = random.Random(3)
    models = []
    for i in range(120):
        memory = rng.choice([0.3, 0.9, 1.7])
        compute = rng.choice([0.02, 0.1, 0.3])
        models.append(
            ProblemModel(
                id=f"m{i:03d}",
                traffic_rps=compute * 100,
                replicas=2,
                profiles=[
                    Profile(processor=kind, memory_bytes=int(gib * GIB), seconds_per_request=s)
                    for kind, gib, s in (("gpu", memory, 0.01), ("cpu", memory * 1.5, 0.1))
                ],
            )
        )
    types = [
        instance_type("g.x", 1.0, 1, 16),
        instance_type("g.4x", 3.6, 4, 16),
        instance_type("c.x", 0.2, 1, 8, processor="cpu"),
        instance_type("c.2x", 0.4, 1, 16, processor="cpu"),
    ]
    problem = problem_of(models, types, {"g.x": 6})
    kinds = prepare.types_of(problem)
    classes = prepare.classes_of(problem, kinds)
    prepare.check_feasible(problem, kinds, classes)
    solved = bounds.mip_start(kinds, classes, 5.0, 0.0)
    assert solved is not None
    assignment, counts = solved
    filled = fill.fill_start(
        kinds,
        classes,
        assignment,
        counts,
        time.perf_counter() + 5.0,
        1,
        knapsack_s=schedule.KNAPSACK_SECONDS,
    )
    cost = _as_checked_plan(problem, classes, filled)
    assert sum(1 for i in filled if i.type.name == "g.x") <= 6
    realised = realise.start_from_assignment(kinds, classes, assignment, time.perf_counter() + 5.0)
    assert cost <= _as_checked_plan(problem, classes, realised) + 1e-9
