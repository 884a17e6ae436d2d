"""Plan assembly: model ids dealt to the replica slots of the instances found, and the plan
with its servers, cost, bound and gap."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from packing.contracts import Plan, PlannedInstance, PlannedServer, Problem
from packing.io import to_json
from packing.solver.model import Class, Instance
from packing.solver.tier import Tier, server_tier, with_tier


def _deal(classes: list[Class], instances: list[Instance]) -> dict[tuple[int, int], list[str]]:
    """Model ids for each (instance, device): class slots are dealt cyclically in instance
    order, so an instance holding at most ``count`` replicas of a class gets distinct models
    and every model gets exactly ``replicas`` slots."""
    dealt: dict[tuple[int, int], list[str]] = {}
    cursor = [0] * len(classes)
    for i, instance in enumerate(instances):
        for d, device in enumerate(instance.devices):
            for ci, n in sorted(device.load.items()):
                ids = classes[ci].model_ids
                start = cursor[ci]
                dealt.setdefault((i, d), []).extend(ids[(start + s) % len(ids)] for s in range(n))
                cursor[ci] = start + n
    return dealt


def assemble_plan(
    problem: Problem,
    classes: list[Class],
    instances: list[Instance],
    *,
    cost: float,
    lower_bound: float,
    gap: float,
    status: str,
    seconds: float,
    plan_id: str | None,
    tier: Tier | None = None,
) -> Plan:
    """The plan of ``instances``; with ``tier``, each server's on-demand models, cache and
    expected cold fraction, and the plan's cold-start promise."""
    instances = sorted(instances, key=lambda i: (-i.type.price, i.type.name))
    dealt = _deal(classes, instances)
    planned_instances = []
    servers = []
    cold_rps = cold_start = 0.0
    for i, instance in enumerate(instances):
        instance_id = f"i{i:03d}-{instance.type.name.replace('.', '-')}"
        planned_instances.append(
            PlannedInstance(
                id=instance_id,
                type=instance.type.name,
                processor=instance.type.spec.processor,
                price_per_hour=instance.type.price,
            )
        )
        for d, device in enumerate(instance.devices):
            if not device.load:
                continue
            # The device's capacity as the plan states it: with the tier, the room each device
            # kept to load an on-demand model is the cache's, so it counts again.
            capacity = instance.type.memory_cap
            if tier is not None:
                capacity += tier.reserve(instance.type.spec)[0]
            server = PlannedServer(
                id=f"{instance_id}-d{d}",
                instance=instance_id,
                device=d,
                processor=instance.type.spec.processor,
                model_ids=sorted(dealt[i, d]),
                memory_bytes=round(device.memory),
                memory_capacity_bytes=round(capacity),
                compute_utilization=round(device.compute / instance.type.spec.compute_capacity, 6),
                host_memory_bytes=round(instance.type.spec.server_host_base_bytes + device.host),
            )
            if tier is not None:
                part = server_tier(tier, problem, instance.type.spec, server.model_ids)
                server = with_tier(server, part, instance.type.spec.server_host_base_bytes)
                cold_rps += part.cold_rps
                if part.on_demand_model_ids:
                    cold_start = max(cold_start, part.cold_start_seconds)
            servers.append(server)
    requests = sum(m.traffic_rps for m in problem.models)
    # Plans are immutable in the store, so the id names the problem and the placement both.
    digest = hashlib.sha256(to_json(problem) + to_json(servers)).hexdigest()[:12]
    return Plan(
        plan_id=plan_id or f"plan-{digest}",
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        problem=problem.name,
        price=problem.price,
        instances=planned_instances,
        servers=servers,
        cost_per_hour=round(cost, 6),
        lower_bound_cost_per_hour=round(lower_bound, 6),
        gap=round(gap, 6),
        solver_status=status,
        solve_seconds=round(seconds, 3),
        cold_fraction=round(cold_rps / requests, 9) if tier is not None and requests else 0.0,
        cold_start_seconds=cold_start,
    )
