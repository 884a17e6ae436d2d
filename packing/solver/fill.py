"""The filled start: a whole-instance solution's own instances packed exactly type by type,
what whole replicas leave over put in spare room and then on the cheapest fresh instances."""

from __future__ import annotations

from collections import Counter

from packing.solver.cpsat import WALL, Clock
from packing.solver.exact import fill_by_knapsacks, fill_exactly, repack_instances, worth
from packing.solver.model import Class, Instance, Type
from packing.solver.realise import downsize, evacuate, pack_type, place_leftovers


def fill_start(
    types: list[Type],
    classes: list[Class],
    assignment: dict[tuple[int, int], int],
    counts: dict[int, int],
    deadline: float,
    workers: int,
    clock: Clock = WALL,
    *,
    knapsack_s: float,
) -> list[Instance]:
    """A start that keeps a whole-instance solution's instances (``counts`` per type): each
    type's replicas packed exactly onto them, the few that whole replicas leave over put in
    spare room anywhere, and the rest on the cheapest fresh instances.

    The volume model fills its instances to the brim in both resources; the first-fit
    realisation leaves a percent or so of each over, a dear fresh instance's worth, where
    the exact fill of a single type leaves a few replicas."""
    by_type = {t.index: t for t in types}
    # What a replica left over costs: its share of the cheapest device for it, and, where
    # the cheapest instance it fits is dearer than the cheapest instance any fits, the
    # difference, since the leftovers will need a fresh instance of their own.
    cheapest = min(t.price for t in types)
    value = {
        ci: min(
            by_type[ti].price * max(by_type[ti].shares(option)) / by_type[ti].devices
            for ti, option in group.options.items()
        )
        + min(by_type[ti].price for ti in group.options)
        - cheapest
        for ci, group in enumerate(classes)
    }
    fleet: list[Instance] = []
    over: Counter[int] = Counter()
    per_type = [
        (by_type[ti], {ci: n for (ci, tj), n in assignment.items() if tj == ti and n})
        for ti in sorted({ti for _, ti in assignment})
    ]
    # Small types first: they settle early and leave their time to the large ones.
    sizes = {t.index: counts.get(t.index, 0) * t.devices * len(items) for t, items in per_type}
    per_type.sort(key=lambda item: sizes[item[0].index])
    for k, (t, items) in enumerate(per_type):
        started = clock.now()
        packed, left = pack_type(t, classes, items, counts.get(t.index, 0))
        # This type's share of the time, half for each way of filling.
        later = sum(sizes[u.index] for u, _ in per_type[k:])
        share = (deadline - clock.now()) * sizes[t.index] / max(later, 1)
        if counts.get(t.index) and left and share > 0.05:
            by_knapsacks = fill_by_knapsacks(
                t,
                classes,
                items,
                counts[t.index],
                clock.now() + share / 2,
                clock,
                knapsack_s=knapsack_s,
            )
            if worth(by_knapsacks[1], value) < worth(left, value):
                packed, left = by_knapsacks
        if counts.get(t.index) and left and share > 0.05:
            rest = max(share - (clock.now() - started), 0.05)
            packed, left = fill_exactly(
                t, classes, items, counts[t.index], packed, left, value, rest, workers, clock
            )
        fleet.extend(packed)
        over.update(left)
    for ci in sorted(over, key=lambda ci: -value[ci]):
        for instance in fleet:
            if not over[ci]:
                break
            over[ci] -= instance.place(ci, classes[ci], over[ci])
    fresh = list(fleet)
    place_leftovers(types, classes, fresh, {ci: n for ci, n in over.items() if n})
    fresh = fresh[len(fleet) :]
    if fresh:
        outside = Counter(instance.type.index for instance in fleet)
        cheaper = repack_instances(
            types, classes, fresh, outside, max(deadline - clock.now(), 1.0), clock
        )
        fresh = cheaper if cheaper is not None else fresh
    return downsize(evacuate(fleet + fresh, classes, deadline, clock), types, classes)
