"""The packer's on-demand tier: which models load on demand, the cold fraction it promises
(checked by the validator, which recomputes it), models with slow or unmeasured loads kept
resident, uniform traffic left alone, a long tail made cheaper, and how plans encode it."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest

from packing.contracts import (
    Catalog,
    InstanceType,
    Limits,
    OnDemandLimits,
    Plan,
    Problem,
    ProblemModel,
    Profile,
)
from packing.io import decode, to_json
from packing.problems import build_problem
from packing.report import cold_start_line, on_demand_figures
from packing.solver import solve
from packing.solver.tier import choose_tier
from packing.validate import check, violations

GIB = 2**30


def _catalog() -> Catalog:
    def kind(name: str, price: float, devices: int) -> InstanceType:
        return InstanceType(
            name=name,
            family=name.split(".")[0],
            processor="gpu",
            devices=devices,
            device_memory_gib=16,
            host_memory_gib=64 * devices,
            vcpus=4 * devices,
            on_demand_per_hour=price,
            price_source="test",
        )

    return Catalog(
        name="test",
        region="test-1",
        prices_as_of="2026-12-01",
        source="test",
        instance_types=[kind("g.x", 1.0, 1), kind("g.4x", 3.7, 4)],
    )


def _profile(load: float | None = 1.0) -> Profile:
    return Profile(
        processor="gpu", memory_bytes=GIB // 2, seconds_per_request=0.002, load_seconds=load
    )


def _problem(
    hot: int,
    rare: int,
    *,
    hot_rps: float = 10.0,
    rare_rps: float = 0.001,
    rare_load: float | None = 1.0,
    tier: OnDemandLimits | None = None,
) -> Problem:
    """``hot`` busy models and ``rare`` ones of the same size (28 fit a device)."""
    models = [
        ProblemModel(id=f"h{i:03d}", traffic_rps=hot_rps, profiles=[_profile()]) for i in range(hot)
    ]
    models += [
        ProblemModel(id=f"r{i:03d}", traffic_rps=rare_rps, profiles=[_profile(rare_load)])
        for i in range(rare)
    ]
    return Problem(name="tail", catalog=_catalog(), limits=Limits(on_demand=tier), models=models)


def _solve(problem: Problem) -> Plan:
    plan = solve(problem, time_limit_s=2, deterministic=True)
    check(problem, plan)
    return plan


def _on_demand(plan: Plan) -> set[str]:
    return {m for s in plan.servers for m in s.on_demand_model_ids}


def test_a_long_tail_goes_on_demand_and_costs_less() -> None:
    tier = OnDemandLimits(max_cold_fraction=0.01)
    problem = _problem(12, 60, tier=tier)
    plan = _solve(problem)
    resident = _solve(msgspec.structs.replace(problem, limits=Limits()))
    assert not _on_demand(resident)
    # 72 models need 3 devices resident; the hot 12 and a cache for the tail fit one.
    assert plan.cost_per_hour < resident.cost_per_hour
    assert _on_demand(plan) == {f"r{i:03d}" for i in range(60)}
    assert 0 < plan.cold_fraction <= tier.max_cold_fraction
    assert plan.cold_start_seconds == 1.0
    for server in plan.servers:
        if server.on_demand_model_ids:
            # Room to load the largest on-demand model, inside the server's memory.
            assert server.cache_memory_bytes >= GIB // 2
            assert server.memory_bytes <= server.memory_capacity_bytes
            assert server.cold_fraction > 0
    figures = on_demand_figures(problem, plan)
    assert figures is not None and figures["on-demand models"] == 60
    assert "of requests meet a cold start" in cold_start_line(problem, plan)


@pytest.mark.parametrize("limit", [0.0, 0.001, 0.01, 0.05, 0.3])
def test_the_planned_cold_fraction_never_passes_its_limit(limit: float) -> None:
    # Rates spread over four orders of magnitude, so the limit decides how many go on demand.
    models = [
        ProblemModel(
            id=f"m{i:03d}", traffic_rps=round(20 / (i + 1) ** 1.3, 6), profiles=[_profile(0.5)]
        )
        for i in range(80)
    ]
    problem = Problem(
        name="zipf",
        catalog=_catalog(),
        limits=Limits(on_demand=OnDemandLimits(max_cold_fraction=limit)),
        models=models,
    )
    plan = _solve(problem)  # the validator recomputes every server's cache by Che
    assert plan.cold_fraction <= limit + 1e-9
    if limit == 0.0:
        assert not _on_demand(plan)


def test_models_with_slow_or_unmeasured_loads_stay_resident() -> None:
    tier = OnDemandLimits(max_cold_fraction=0.05, max_cold_start_seconds=5.0)
    for load in (30.0, None):
        plan = _solve(_problem(12, 60, rare_load=load, tier=tier))
        assert not _on_demand(plan)
        assert plan.cold_fraction == 0 and plan.cold_start_seconds == 0
    # Half the tail loads fast enough: only that half may be on demand.
    problem = _problem(12, 60, tier=tier)
    slow = {f"r{i:03d}" for i in range(0, 60, 2)}
    models = [
        msgspec.structs.replace(m, profiles=[_profile(30.0)]) if m.id in slow else m
        for m in problem.models
    ]
    plan = _solve(msgspec.structs.replace(problem, models=models))
    assert _on_demand(plan) and not _on_demand(plan) & slow


def test_uniform_traffic_keeps_every_model_resident_at_the_same_cost() -> None:
    # Every model busy (2 requests/s, a 1 s load): nothing is worth a cold start.
    problem = _problem(60, 0, hot_rps=2.0, tier=OnDemandLimits(max_cold_fraction=0.05))
    assert choose_tier(problem) is None
    plan = _solve(problem)
    resident = _solve(msgspec.structs.replace(problem, limits=Limits()))
    assert not _on_demand(plan)
    assert plan.cost_per_hour == resident.cost_per_hour
    assert plan.servers == resident.servers


def test_the_validator_rejects_broken_promises() -> None:
    tier = OnDemandLimits(max_cold_fraction=0.01)
    problem = _problem(12, 60, tier=tier)
    plan = _solve(problem)
    assert violations(problem, plan) == []

    stricter = msgspec.structs.replace(
        problem, limits=Limits(on_demand=OnDemandLimits(max_cold_fraction=1e-7))
    )
    assert any("past max_cold_fraction" in v for v in violations(stricter, plan))

    slow = msgspec.structs.replace(
        problem,
        models=[msgspec.structs.replace(m, profiles=[_profile(9.0)]) for m in problem.models],
    )
    assert any("past max_cold_start_seconds" in v for v in violations(slow, plan))

    unmeasured = msgspec.structs.replace(
        problem,
        models=[msgspec.structs.replace(m, profiles=[_profile(None)]) for m in problem.models],
    )
    assert any("no measured load time" in v for v in violations(unmeasured, plan))

    no_tier = msgspec.structs.replace(problem, limits=Limits())
    assert any("the problem has no tier" in v for v in violations(no_tier, plan))

    # A cache past the device's memory.
    server = next(s for s in plan.servers if s.on_demand_model_ids)
    bigger = msgspec.structs.replace(
        server,
        cache_memory_bytes=server.cache_memory_bytes + 16 * GIB,
        memory_bytes=server.memory_bytes + 16 * GIB,
    )
    grown = msgspec.structs.replace(
        plan, servers=[bigger if s is server else s for s in plan.servers]
    )
    found = violations(problem, grown)
    assert any("exceed the memory cap" in v for v in found)

    # A cache with no room to load its model.
    shrunk = msgspec.structs.replace(
        server,
        cache_memory_bytes=1,
        memory_bytes=server.memory_bytes - server.cache_memory_bytes + 1,
    )
    broken = msgspec.structs.replace(
        plan, servers=[shrunk if s is server else s for s in plan.servers]
    )
    assert any("cannot load its largest" in v for v in violations(problem, broken))

    # Cold fractions understated, the server's and the plan's.
    hidden = msgspec.structs.replace(server, cold_fraction=0.0)
    understated = msgspec.structs.replace(
        plan, servers=[hidden if s is server else s for s in plan.servers], cold_fraction=0.0
    )
    found = violations(problem, understated)
    assert any("reports cold fraction" in v for v in found)
    assert any("the servers' caches give" in v for v in found)


def test_tier_fields_stay_out_of_json_at_their_defaults() -> None:
    problem = _problem(0, 3, rare_load=None)
    plan = _solve(problem)
    text = to_json(plan) + to_json(problem)
    for key in ("on_demand", "on_demand_model_ids", "cold_fraction", "cache_memory_bytes"):
        assert f'"{key}":'.encode() not in text
    for key in ("cold_start_seconds", "load_seconds", "store_load_seconds"):
        assert f'"{key}":'.encode() not in text
    # Written in full, they still decode; a plan with the tier round-trips.
    assert decode(msgspec.json.encode(plan), Plan, "plan") == plan
    tiered = _solve(_problem(12, 60, tier=OnDemandLimits()))
    assert b'"on_demand_model_ids"' in to_json(tiered)
    assert decode(to_json(tiered), Plan, "plan") == tiered
    assert decode(to_json(_problem(1, 1, tier=OnDemandLimits())), Problem, "p").limits.on_demand


def test_build_problem_reads_load_times_and_the_tier() -> None:
    from packing.contracts import Fleet, ModelSpec

    fleet = Fleet(
        name="f",
        processors=["gpu"],
        models=[ModelSpec(id="a", source="synthetic:x"), ModelSpec(id="b", source="synthetic:x")],
    )
    base = {"memory_bytes": GIB, "seconds_per_request_batch1": 0.01}
    results = [
        {
            "model_id": "a",
            "processor": "gpu",
            "profile": {**base, "load_seconds": 1.5, "store_load_seconds": 4.0},
        },
        {"model_id": "b", "processor": "gpu", "profile": base},
    ]
    problem = build_problem(fleet, results, _catalog(), on_demand=OnDemandLimits())
    a, b = (m.profiles[0] for m in problem.models)
    assert (a.load_seconds, a.store_load_seconds) == (1.5, 4.0)
    assert (b.load_seconds, b.store_load_seconds) == (None, None)
    assert problem.limits.on_demand == OnDemandLimits()
    assert build_problem(fleet, results, _catalog()).limits.on_demand is None


def test_asking_for_the_tier_never_costs_more_than_every_model_resident(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tier is chosen on an estimate; when its packing comes out dearer than packing every
    model resident (here forced: a tier whose on-demand models keep their full size, on devices
    that keep room to load one), the resident plan is the answer, with its own bound, and the
    progress of the second search is labelled as such."""
    from packing.solver import schedule

    problem = _problem(12, 60, tier=OnDemandLimits(max_cold_fraction=0.01))
    chosen = choose_tier(problem)
    assert chosen is not None
    monkeypatch.setattr(schedule, "choose_tier", lambda p: dataclasses.replace(chosen, problem=p))
    stages: list[str] = []
    plan = schedule.solve(
        problem, time_limit_s=2, deterministic=True, progress=lambda p: stages.append(p.stage)
    )
    check(problem, plan)
    resident = _solve(msgspec.structs.replace(problem, limits=Limits()))
    assert not _on_demand(plan)
    assert plan.cost_per_hour == resident.cost_per_hour
    assert plan.lower_bound_cost_per_hour <= plan.cost_per_hour
    assert any(s.startswith("every model resident: ") for s in stages)
    assert any(not s.startswith("every model resident: ") for s in stages)
