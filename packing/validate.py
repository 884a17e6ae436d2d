"""Check a plan against its problem from first principles, independently of the solver.

Everything is recomputed from the problem: which profile applies on each instance type, each
device's memory and compute, each instance's host memory, replica counts, anti-affinity,
quotas and the cost from the catalog, and with the on-demand tier, each on-demand model's
cold start against its limit, each server's cache against its on-demand models and the
expected cold fraction (by the Che approximation of LRU, :mod:`packing.cold`) against the
plan's limit. Tests run every plan through it; ``myriad pack`` does
too before writing a plan.
"""

from __future__ import annotations

import math
from collections import Counter

from packing.cold import cold_rate, cold_start_seconds, hit_probability
from packing.contracts import Plan, Problem, repeated
from packing.errors import MyriadError

_TOLERANCE = 1e-6


class PlanError(MyriadError, ValueError):
    """A plan breaks its problem's constraints; the message lists every violation."""


def violations(problem: Problem, plan: Plan) -> list[str]:
    """Every way ``plan`` breaks ``problem``; empty when it is valid."""
    found: list[str] = []
    limits = problem.limits
    models = {m.id: m for m in problem.models}
    types = {}
    ids = [i.id for i in plan.instances]
    doubled_ids = repeated(ids)
    if doubled_ids:
        found.append(f"instance ids listed twice: {doubled_ids[:5]}")
    for instance in plan.instances:
        try:
            instance_type = problem.catalog.get(instance.type)
            price = instance_type.price(problem.price)
        except (KeyError, ValueError) as exc:
            found.append(f"instance {instance.id}: {exc}")
            continue
        types[instance.id] = instance_type
        if abs(instance.price_per_hour - price) > _TOLERANCE:
            found.append(
                f"instance {instance.id}: price {instance.price_per_hour} but the catalog's "
                f"{problem.price} price of {instance.type} is {price}"
            )
        if instance.processor != instance_type.processor:
            found.append(f"instance {instance.id}: processor {instance.processor} is wrong")

    placements: Counter[str] = Counter()
    per_instance: dict[str, Counter[str]] = {}
    devices_seen: set[tuple[str, int]] = set()
    host_used: Counter[str] = Counter()
    cold_rps = slowest = 0.0
    for server in plan.servers:
        instance_type = types.get(server.instance)
        if instance_type is None:
            found.append(f"server {server.id}: instance {server.instance} is not valid")
            continue
        if server.device >= instance_type.devices:
            found.append(
                f"server {server.id}: device {server.device} but {instance_type.name} has "
                f"{instance_type.devices}"
            )
        if (server.instance, server.device) in devices_seen:
            found.append(f"server {server.id}: a second server on the same device")
        devices_seen.add((server.instance, server.device))
        memory = compute = requests = 0.0
        host = float(instance_type.server_host_base_bytes)
        on_demand = set(server.on_demand_model_ids)
        if on_demand and limits.on_demand is None:
            found.append(f"server {server.id}: on-demand models, but the problem has no tier")
        # The on-demand models' sizes, rates per replica, host memory and cold-start seconds.
        cached: list[tuple[float, float, float, float]] = []
        for model_id in server.model_ids:
            model = models.get(model_id)
            if model is None:
                found.append(f"server {server.id}: model {model_id} is not in the problem")
                continue
            profile = model.profile_for(instance_type)
            if profile is None:
                found.append(
                    f"server {server.id}: model {model_id} has no profile for {instance_type.name}"
                )
                continue
            placements[model_id] += 1
            per_instance.setdefault(server.instance, Counter())[model_id] += 1
            rate = model.traffic_rps / model.replicas
            requests += rate
            if model_id in on_demand:
                seconds = cold_start_seconds(profile)
                cached.append(
                    (float(profile.memory_bytes), rate, float(profile.host_bytes), seconds or 0.0)
                )
                if limits.on_demand is not None and (
                    seconds is None or seconds > limits.on_demand.max_cold_start_seconds
                ):
                    found.append(
                        f"server {server.id}: on-demand model {model_id} "
                        + (
                            "has no measured load time"
                            if seconds is None
                            else f"loads in {seconds} s, past max_cold_start_seconds "
                            f"{limits.on_demand.max_cold_start_seconds}"
                        )
                    )
                    slowest = max(slowest, seconds or math.inf)
                else:
                    slowest = max(slowest, seconds or 0.0)
            else:
                memory += profile.memory_bytes
                host += profile.host_bytes
            # Spelled out rather than ProblemModel.replica_load: the validator checks the solver.
            compute += model.traffic_rps * profile.seconds_per_request / model.replicas
        # The cache is part of the server's memory; an LRU needs room to load its largest
        # model beside the others' expected occupancy, which sets its characteristic time.
        memory += server.cache_memory_bytes
        if cached:
            largest = max(c[0] for c in cached)
            if server.cache_memory_bytes < largest:
                found.append(
                    f"server {server.id}: a cache of {server.cache_memory_bytes} bytes cannot "
                    f"load its largest on-demand model ({largest:.0f} bytes)"
                )
            t, cold = cold_rate(
                [c[0] for c in cached],
                [c[1] for c in cached],
                server.cache_memory_bytes - largest,
                [c[3] for c in cached],
            )
            cold_rps += cold
            host += sum(c[2] * hit_probability(c[1], t) for c in cached)
            host += max(c[2] for c in cached)
            fraction = cold / requests if requests else 0.0
            if abs(server.cold_fraction - fraction) > 1e-6:
                found.append(
                    f"server {server.id}: reports cold fraction {server.cold_fraction}, its cache "
                    f"gives {fraction:.6f}"
                )
        memory_cap = limits.max_memory_fraction * instance_type.device_memory_bytes
        if memory > memory_cap * (1 + _TOLERANCE):
            found.append(
                f"server {server.id}: {memory:.0f} bytes of models exceed the memory cap "
                f"{memory_cap:.0f}"
            )
        utilization = compute / instance_type.compute_capacity
        if utilization > limits.max_compute_utilization + _TOLERANCE:
            found.append(
                f"server {server.id}: compute utilisation {utilization:.4f} exceeds "
                f"{limits.max_compute_utilization}"
            )
        if abs(server.memory_bytes - memory) > max(1.0, memory * _TOLERANCE):
            found.append(f"server {server.id}: reports {server.memory_bytes} bytes, is {memory}")
        if abs(server.compute_utilization - utilization) > 1e-5:
            found.append(
                f"server {server.id}: reports utilisation {server.compute_utilization}, "
                f"is {utilization:.6f}"
            )
        # Plans made before host memory was planned report none.
        if server.host_memory_bytes and abs(server.host_memory_bytes - host) > max(
            1.0, host * _TOLERANCE
        ):
            found.append(
                f"server {server.id}: reports {server.host_memory_bytes} bytes of host memory, "
                f"is {host:.0f}"
            )
        host_used[server.instance] += host

    for instance_id, host in host_used.items():
        instance_type = types[instance_id]
        host_cap = limits.max_memory_fraction * instance_type.host_memory_bytes
        if host > host_cap * (1 + _TOLERANCE):
            found.append(
                f"instance {instance_id}: its servers take {host / 2**30:.2f} GiB of host memory "
                f"(a base of {instance_type.server_host_base_gib} GiB each and their models'), "
                f"more than the {host_cap / 2**30:.2f} GiB {instance_type.name} allows at "
                f"max_memory_fraction {limits.max_memory_fraction}"
            )
    for model in problem.models:
        if placements[model.id] != model.replicas:
            found.append(
                f"model {model.id}: placed {placements[model.id]} times, wants {model.replicas}"
            )
    for instance_id, counts in per_instance.items():
        doubled = sorted(m for m, n in counts.items() if n > 1)
        if doubled:
            found.append(f"instance {instance_id}: holds two replicas of {doubled[:5]}")
    for name, quota in limits.instance_quotas.items():
        used = sum(1 for i in plan.instances if i.type == name)
        if used > quota:
            found.append(f"{used} instances of {name} exceed its quota of {quota}")

    total = sum(m.traffic_rps for m in problem.models)
    cold_fraction = cold_rps / total if total else 0.0
    if abs(plan.cold_fraction - cold_fraction) > 1e-6:
        found.append(
            f"cold_fraction {plan.cold_fraction} but the servers' caches give {cold_fraction:.6f}"
        )
    if limits.on_demand is not None and cold_fraction > limits.on_demand.max_cold_fraction + 1e-9:
        found.append(
            f"an expected {cold_fraction:.4%} of requests meet a cold start, past "
            f"max_cold_fraction {limits.on_demand.max_cold_fraction}"
        )
    if plan.cold_start_seconds < slowest - 1e-9:
        found.append(
            f"cold_start_seconds {plan.cold_start_seconds} but an on-demand model loads in "
            f"{slowest} s"
        )

    cost = sum(t.price(problem.price) for t in types.values())
    if abs(plan.cost_per_hour - cost) > 1e-4:
        found.append(f"cost_per_hour {plan.cost_per_hour} but the instances cost {cost:.6f}")
    if plan.lower_bound_cost_per_hour > plan.cost_per_hour + 1e-4:
        found.append("lower_bound_cost_per_hour exceeds cost_per_hour")
    expected_gap = (
        (plan.cost_per_hour - plan.lower_bound_cost_per_hour) / plan.cost_per_hour
        if plan.cost_per_hour
        else 0.0
    )
    if abs(plan.gap - expected_gap) > 1e-4:
        found.append(f"gap {plan.gap} but cost and lower bound give {expected_gap:.6f}")
    return found


def check(problem: Problem, plan: Plan) -> None:
    """Raise :class:`PlanError` listing the violations, if any."""
    found = violations(problem, plan)
    if found:
        shown = "; ".join(found[:20])
        more = f"; and {len(found) - 20} more" if len(found) > 20 else ""
        raise PlanError(f"plan {plan.plan_id} is invalid: {shown}{more}")
