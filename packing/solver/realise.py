"""Realisation: whole replicas on devices from a volume solution (first fit by dominant
share, extra instances where fragmentation needs them), leftovers on the cheapest types within
quotas, and the clean-ups every start gets: emptying instances into others' spare room and
moving instances to a cheaper type that holds their contents."""

from __future__ import annotations

import math

from packing.solver.cpsat import WALL, Clock
from packing.solver.model import EPS, Class, Device, Instance, Type, fits_in
from packing.solver.prepare import per_instance


def pack_assignment(
    types: list[Type], classes: list[Class], assignment: dict[tuple[int, int], int]
) -> list[Instance]:
    instances: list[Instance] = []
    leftovers: dict[int, int] = {}
    for t in types:
        items = {ci: n for (ci, ti), n in assignment.items() if ti == t.index and n}
        if items:
            packed, left = pack_type(t, classes, items, t.quota)
            instances.extend(packed)
            for ci, n in left.items():
                leftovers[ci] = leftovers.get(ci, 0) + n
    # Replicas the assignment left out (a time-limited solve that fell back to a greedy start
    # cut short by quotas) are leftovers too.
    for ci, group in enumerate(classes):
        assigned = sum(n for (c, _), n in assignment.items() if c == ci)
        if assigned < group.total_replicas:
            leftovers[ci] = leftovers.get(ci, 0) + group.total_replicas - assigned
    place_leftovers(types, classes, instances, leftovers)
    return instances


def place_leftovers(
    types: list[Type],
    classes: list[Class],
    instances: list[Instance],
    leftovers: dict[int, int],
) -> None:
    """Put replicas no instance of ``instances`` took on new instances appended to it: on
    the types the classes can use, cheapest per replica first, within quotas; past every
    quota, on the cheapest type regardless, for the device-level search to repair (it keeps
    quotas)."""
    for ci, left in leftovers.items():
        group = classes[ci]
        ranked = sorted(
            (t for t in types if t.index in group.options),
            key=lambda t: t.price / max(per_instance(group, t), 1),
        )
        for t in ranked:
            if left == 0:
                break
            used = sum(1 for i in instances if i.type.index == t.index)
            room = None if t.quota is None else t.quota - used
            if room is not None and room <= 0:
                continue
            packed, rest = pack_type(t, classes, {ci: left}, room)
            instances.extend(packed)
            left = rest.get(ci, 0)
        if left:
            # solve() refuses a plan that still breaks a quota.
            packed, _ = pack_type(ranked[0], classes, {ci: left})
            instances.extend(packed)


def start_from_assignment(
    types: list[Type],
    classes: list[Class],
    assignment: dict[tuple[int, int], int],
    deadline: float,
    clock: Clock = WALL,
) -> list[Instance]:
    """A start from a volume solution: realised, then emptied and downsized where it can be."""
    instances = evacuate(pack_assignment(types, classes, assignment), classes, deadline, clock)
    return downsize(instances, types, classes)


def pack_type(
    t: Type, classes: list[Class], items: dict[int, int], limit: int | None = None
) -> tuple[list[Instance], dict[int, int]]:
    """Spread each class evenly over the fewest instances the volumes allow, so every device
    gets about the average mix of memory-heavy and compute-heavy replicas (what the volume
    model assumed); what does not fit goes to extra instances filled by best match."""

    def share(ci: int) -> float:
        return max(t.shares(classes[ci].options[t.index]))

    volumes = [
        sum(n * t.checked(classes[ci].options[t.index])[dim] for ci, n in items.items())
        for dim in range(len(t.caps))
    ]
    needed = max(
        *(math.ceil(v / (cap * t.devices) - 1e-6) for v, cap in zip(volumes, t.caps, strict=True)),
        max(math.ceil(n / classes[ci].count) for ci, n in items.items()),
        1,
    )
    if limit is not None:
        needed = min(needed, limit)
    opened = [Instance.empty_of(t) for _ in range(needed)]
    bins = [
        (instance, device)
        for device_index in range(t.devices)
        for instance in opened
        for device in [instance.devices[device_index]]
    ]
    remaining: dict[int, int] = {}
    for ci in sorted(items, key=share, reverse=True):
        group = classes[ci]
        demand = t.checked(group.options[t.index])
        left = items[ci]
        # Largest first, each replica onto the device it leaves least loaded: the
        # longest-processing-time rule in every resource.
        while left:
            best, best_key = None, None
            for instance, device in bins:
                after = [
                    (used + more) / cap
                    for used, more, cap in zip(t.checked(device.used), demand, t.caps, strict=True)
                ]
                if max(after) > 1 + EPS:
                    continue
                key = (max(after), sum(after))
                if best_key is None or key < best_key:
                    if instance.count_of(ci) < group.count:
                        best, best_key = (instance, device), key
            if best is None:
                break
            best[0].place(ci, group, 1, [best[1]])
            left -= 1
        if left:
            remaining[ci] = left
    while any(remaining.values()) and (limit is None or len(opened) < limit):
        instance = Instance.empty_of(t)
        for device in instance.devices:
            _fill_device(instance, device, classes, remaining)
        if instance.empty:
            stuck = [ci for ci, n in remaining.items() if n]
            raise AssertionError(f"classes {stuck} do not fit an empty {t.name}")
        opened.append(instance)
    return [i for i in opened if not i.empty], {ci: n for ci, n in remaining.items() if n}


def _fill_device(
    instance: Instance, device: Device, classes: list[Class], remaining: dict[int, int]
) -> None:
    t = instance.type
    on_instance = {ci: instance.count_of(ci) for ci in remaining}
    while True:
        free = t.free(device)
        free_shares = t.shares(free)
        best, best_score, best_fit = -1, -1.0, 0
        for ci, n in remaining.items():
            room = min(n, classes[ci].count - on_instance[ci])
            if room <= 0:
                continue
            demand = classes[ci].options[t.index]
            fit = fits_in(free, demand, room)
            if fit <= 0:
                continue
            # Replicas that take most of what the device still has most of fill it best.
            score = sum(
                share * room_share
                for share, room_share in zip(t.shares(demand), free_shares, strict=True)
            )
            if score > best_score:
                best, best_score, best_fit = ci, score, fit
        if best < 0:
            return
        # Take a slice of the best class, not all that fits, so the others can still mix in.
        take = max(1, best_fit // 4)
        device.add(best, take, classes[best].options[t.index])
        remaining[best] -= take
        on_instance[best] += take


def evacuate(
    instances: list[Instance], classes: list[Class], deadline: float, clock: Clock = WALL
) -> list[Instance]:
    """Close instances whose replicas all fit in the others' spare room, dearest per unit of
    use first; a move is kept only when the whole instance empties."""

    kept = list(instances)
    for victim in sorted(instances, key=lambda i: i.use / i.type.price):
        if clock.now() > deadline:
            break
        others = [i for i in kept if i is not victim]
        snapshot = [[d.copy() for d in i.devices] for i in others]
        moved_all = True
        for device in victim.devices:
            for ci, n in device.load.items():
                left = n
                for other in others:
                    left -= other.place(ci, classes[ci], left)
                    if not left:
                        break
                if left:
                    moved_all = False
                    break
            if not moved_all:
                break
        if moved_all:
            kept = others
        else:
            for other, saved in zip(others, snapshot, strict=True):
                for device, kept_device in zip(other.devices, saved, strict=True):
                    device.restore(kept_device)
    return kept


def downsize(instances: list[Instance], types: list[Type], classes: list[Class]) -> list[Instance]:
    """Move each instance to the cheapest type that holds its devices' contents as they are."""
    counts: dict[int, int] = {}
    for instance in instances:
        counts[instance.type.index] = counts.get(instance.type.index, 0) + 1
    result = []
    for instance in instances:
        used = [d for d in instance.devices if d.load]
        best = instance
        for t in sorted(types, key=lambda t: t.price):
            if t.price >= instance.type.price - EPS:
                break
            if t.devices < len(used) or (t.quota is not None and counts.get(t.index, 0) >= t.quota):
                continue
            moved = _moved_devices(used, t, classes)
            if moved is not None:
                counts[instance.type.index] -= 1
                counts[t.index] = counts.get(t.index, 0) + 1
                moved += [Device() for _ in range(t.devices - len(moved))]
                best = Instance(t, moved)
                break
        result.append(best)
    return result


def _moved_devices(used: list[Device], t: Type, classes: list[Class]) -> list[Device] | None:
    moved = []
    for device in used:
        contents = Device()
        for ci, n in device.load.items():
            option = classes[ci].options.get(t.index)
            if option is None:
                return None
            contents.add(ci, n, option)
        if not t.holds(contents.used):
            return None
        moved.append(contents)
    return moved
