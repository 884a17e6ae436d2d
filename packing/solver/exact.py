"""Exact packings by CP-SAT over the slot model: the device-level search over every instance
a plan could need (small problems, quota repair), the re-pack of a few chosen instances on any
mix of types, and the fill of one type's instances (as a whole, or device by device as
knapsacks)."""

from __future__ import annotations

import math
from collections import Counter

from ortools.sat.python import cp_model

from packing.solver.cpsat import (
    WALL,
    Clock,
    exact_capacity,
    exact_demand,
    hint_slots,
    read_slots,
    slot_model,
)
from packing.solver.model import EPS, PRICE_SCALE, SCALE, Class, Instance, Type, cost, over_quota

# Unused types offered to each re-pack, cheapest first.
_FRESH_TYPES = 4


def solve_devices(
    types: list[Type],
    classes: list[Class],
    start: list[Instance],
    slot_counts: dict[int, int],
    relax: bool,
    time_limit_s: float,
    workers: int,
    clock: Clock = WALL,
) -> tuple[list[Instance], float]:
    """Device-level CP-SAT over ``slot_counts[t]`` candidate instances of each type. With every
    candidate a plan could need (``relax``: demands rounded down, the
    result checked exactly) its bound is a lower bound; otherwise demands round up and it only
    improves ``start``."""
    slots: list[tuple[Type, int]] = []
    for t in types:
        slots.extend((t, j) for j in range(slot_counts.get(t.index, 0)))
    round_demand = math.floor if relax else math.ceil
    model, used, z = slot_model(
        slots,
        classes,
        {ci: group.total_replicas for ci, group in enumerate(classes)},
        lambda t, option: tuple(
            round_demand(SCALE * v / c) for v, c in zip(t.checked(option), t.caps, strict=True)
        ),
        lambda t: (SCALE, SCALE, SCALE),
    )
    for t in types:
        if t.quota is not None:
            model.add(sum(used[k] for k, (s, _) in enumerate(slots) if s is t) <= t.quota)

    # Warm start: the realised plan.
    hint_slots(model, slots, used, z, start)

    solver, status = clock.cp_solve(model, max(time_limit_s, 0.05), workers)
    bound = max(0.0, solver.best_objective_bound / PRICE_SCALE)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return start, bound
    found = read_slots(solver, slots, used, z, classes)
    # Demands were rounded down to keep the bound valid, so check the capacities exactly.
    overfull = any(not i.type.holds(d.used) for i in found for d in i.devices)
    dearer = cost(found) > cost(start) + EPS
    if overfull or (dearer and not over_quota(start)):
        return start, bound
    return [i for i in found if not i.empty], bound


def repack_instances(
    types: list[Type],
    classes: list[Class],
    chosen: list[Instance],
    outside: dict[int, int],
    time_limit_s: float,
    clock: Clock = WALL,
) -> list[Instance] | None:
    """The cheapest re-packing of ``chosen``'s replicas, or ``None`` if none is cheaper.
    ``outside`` counts the other instances per type, for quotas. Memory is compared in bytes
    and compute in parts per billion rounded up, so what CP-SAT accepts fits exactly."""
    need: dict[int, int] = {}
    for instance in chosen:
        for device in instance.devices:
            for ci, n in device.load.items():
                need[ci] = need.get(ci, 0) + n
    slots_of: dict[int, int] = {}
    for instance in chosen:
        slots_of[instance.type.index] = slots_of.get(instance.type.index, 0) + 1
    hosting = [t for t in types if any(t.index in classes[ci].options for ci in need)]
    for t in sorted(hosting, key=lambda t: t.price)[:_FRESH_TYPES]:
        slots_of.setdefault(t.index, 0)
    by_type = {t.index: t for t in types}
    slots: list[tuple[Type, int]] = []
    for ti, n in slots_of.items():
        t = by_type[ti]
        room = n + 1 if t.quota is None else min(n + 1, t.quota - outside.get(ti, 0))
        slots.extend((t, j) for j in range(room))

    model, used, z = slot_model(slots, classes, need, exact_demand, exact_capacity)
    hint_slots(model, slots, used, z, chosen)

    solver, status = clock.cp_solve(model, max(time_limit_s, 0.01))
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    if solver.objective_value >= sum(i.type.scaled_price for i in chosen) - 0.5:
        return None
    found = read_slots(solver, slots, used, z, classes)
    return [i for i in found if not i.empty]


def fill_exactly(
    t: Type,
    classes: list[Class],
    items: dict[int, int],
    count: int,
    start: list[Instance],
    start_left: dict[int, int],
    value: dict[int, float],
    time_limit_s: float,
    workers: int,
    clock: Clock = WALL,
) -> tuple[list[Instance], dict[int, int]]:
    """``count`` instances of ``t`` packed by CP-SAT from ``start`` (a packing of ``items``
    that leaves ``start_left`` out) so that the replicas left out are worth the least; the
    packing and what it leaves out."""
    slots = [(t, j) for j in range(count)]
    model, used, z = slot_model(slots, classes, items, exact_demand, exact_capacity, False)
    for var in used:
        model.add(var == 1)
    hint_slots(model, slots, used, z, start)
    # Value in millionths of a cent per hour: fine enough to rank any two replicas.
    model.maximize(sum(round(value[ci] * 1e8) * v for (_, _, ci), v in z.items()))
    solver, status = clock.cp_solve(model, time_limit_s, workers)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return start, start_left
    packed = [i for i in read_slots(solver, slots, used, z, classes) if not i.empty]
    left = Counter(items)
    for instance in packed:
        for device in instance.devices:
            left.subtract(device.load)
    left = {ci: n for ci, n in left.items() if n}
    if worth(left, value) >= worth(start_left, value):
        return start, start_left
    return packed, left


def worth(replicas: dict[int, int], value: dict[int, float]) -> float:
    return sum(n * value[ci] for ci, n in replicas.items())


def fill_by_knapsacks(
    t: Type,
    classes: list[Class],
    items: dict[int, int],
    count: int,
    deadline: float,
    clock: Clock = WALL,
    *,
    knapsack_s: float,
) -> tuple[list[Instance], dict[int, int]]:
    """``count`` instances of ``t`` filled one device at a time with the replicas of
    ``items`` that fill it most (CP-SAT's knapsack), each resource weighted by how much of
    it is still to place, so the last devices are not left the awkward ones, each knapsack
    given at most ``knapsack_s``; the packing and what it leaves out."""
    left = dict(items)
    packed = []
    capacities = exact_capacity(t)
    for k in range(count):
        instance = Instance.empty_of(t)
        for d, device in enumerate(instance.devices):
            wanted = {
                ci: room
                for ci, n in left.items()
                if (room := min(n, classes[ci].count - instance.count_of(ci))) > 0
            }
            if not wanted:
                break
            checked = {ci: t.checked(classes[ci].options[t.index]) for ci in wanted}
            weights = [
                sum(n * checked[ci][dim] for ci, n in wanted.items()) / cap
                for dim, cap in enumerate(t.caps)
            ]
            model = cp_model.CpModel()
            take = {ci: model.new_int_var(0, n, "") for ci, n in wanted.items()}
            for dim, cap in enumerate(capacities[: len(t.caps)]):
                demands = {ci: exact_demand(t, classes[ci].options[t.index])[dim] for ci in take}
                model.add(sum(demands[ci] * v for ci, v in take.items()) <= cap)
            model.maximize(
                sum(
                    round(
                        SCALE
                        * sum(
                            w * value / cap
                            for w, value, cap in zip(weights, checked[ci], t.caps, strict=True)
                        )
                    )
                    * v
                    for ci, v in take.items()
                )
            )
            devices_left = (count - k) * t.devices - d
            limit = max(min(knapsack_s, (deadline - clock.now()) / devices_left), 0.01)
            solver, status = clock.cp_solve(model, limit)
            if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
                continue
            for ci, var in take.items():
                n = solver.value(var)
                if n:
                    device.add(ci, n, classes[ci].options[t.index])
                    left[ci] -= n
        packed.append(instance)
    return [i for i in packed if not i.empty], {ci: n for ci, n in left.items() if n}
