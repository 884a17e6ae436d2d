"""Large-neighbourhood search: a few instances at a time (or every instance of one processor
kind) emptied and re-packed exactly on any mix of types, kept when cheaper."""

from __future__ import annotations

import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from packing.solver.cpsat import WALL, Clock
from packing.solver.exact import repack_instances
from packing.solver.model import Class, Instance, Type, cost

# Instances re-packed at once: small enough that CP-SAT settles a neighbourhood well inside
# its attempt's seconds (the schedule's NEIGHBOURHOOD_SECONDS).
_NEIGHBOURHOOD = (3, 6)
# Rounds without a gain before the neighbourhoods grow by two instances.
_STALE_ROUNDS = 25
# The most instances a neighbourhood of one processor kind takes.
_GROUP_MAX = 30


def neighbourhood_search(
    types: list[Type],
    classes: list[Class],
    instances: list[Instance],
    deadline: float,
    workers: int,
    lower_bound: Callable[[], float] = lambda: 0.0,
    clock: Clock = WALL,
    *,
    attempt_s: float,
    group_s: float,
    improved: Callable[[list[Instance]], None] | None = None,
) -> list[Instance]:
    """Large-neighbourhood search: free the replicas of a few instances (one chosen for its
    spare room and price, the rest at random) and re-pack them exactly on any mix of types;
    keep the result when it is cheaper, until the deadline or the lower bound is reached.
    When small neighbourhoods stop paying, every instance of one processor kind is re-packed
    at once (the CPU instances, say, when only a new mix of CPU sizes saves).
    ``improved`` (if any) hears of each cheaper set of instances.
    With several workers, disjoint neighbourhoods are solved at once (each CP-SAT call on one
    thread); quotas make it sequential, since two neighbourhoods could each open the last
    instance a quota allows."""
    rng = random.Random(0)
    parallel = 1 if any(t.quota is not None for t in types) else max(1, workers)
    current = list(instances)
    # Rounds without a gain widen the neighbourhoods (and their time), to leave a local
    # optimum that small ones cannot.
    stale = 0
    with ThreadPoolExecutor(parallel) as pool:
        while deadline - clock.now() > 0.1 and len(current) > 1:
            if cost(current) <= lower_bound() + 1e-6:
                break  # proven optimal
            widen = min(stale // _STALE_ROUNDS, 3)
            seconds = attempt_s * (1 + widen)
            if stale and stale % _STALE_ROUNDS == 0:
                picks = _processor_groups(current, parallel, stale // _STALE_ROUNDS)
                seconds = group_s
            else:
                picks = _pick_neighbourhoods(current, parallel, rng, 2 * widen)
            counts: dict[int, int] = {}
            for instance in current:
                counts[instance.type.index] = counts.get(instance.type.index, 0) + 1
            jobs = []
            forks = []
            for pick in picks:
                chosen = [current[i] for i in pick]
                outside = dict(counts)
                for instance in chosen:
                    outside[instance.type.index] -= 1
                limit = min(seconds, deadline - clock.now())
                forks.append(clock.fork())
                jobs.append(
                    pool.submit(repack_instances, types, classes, chosen, outside, limit, forks[-1])
                )
            removed: set[int] = set()
            added: list[Instance] = []
            for pick, job in zip(picks, jobs, strict=True):
                better = job.result()
                if better is not None:
                    removed.update(pick)
                    added.extend(better)
            clock.join(forks)
            if removed:
                current = [inst for i, inst in enumerate(current) if i not in removed] + added
                stale = 0
                if improved is not None:
                    improved(current)
            else:
                stale += 1
    return current


def _pick_neighbourhoods(
    instances: list[Instance], how_many: int, rng: random.Random, wider: int = 0
) -> list[list[int]]:
    taken: set[int] = set()
    picks = []
    for _ in range(how_many):
        free = [i for i in range(len(instances)) if i not in taken]
        if len(free) < 2:
            break
        size = min(len(free), rng.randint(_NEIGHBOURHOOD[0] + wider, _NEIGHBOURHOOD[1] + wider))
        # Spare room times price: where a re-pack can save most; full instances keep a small
        # chance, since moving their replicas can make room elsewhere.
        weights = [(1.02 - instances[i].use) * instances[i].type.price for i in free]
        first = rng.choices(free, weights=weights)[0]
        others = [i for i in free if i != first]
        rng.shuffle(others)
        pick = [first, *others[: size - 1]]
        taken.update(pick)
        picks.append(pick)
    return picks


def _processor_groups(instances: list[Instance], how_many: int, turn: int) -> list[list[int]]:
    """Every instance of one processor kind per neighbourhood, a different kind each turn."""
    by_processor: dict[str, list[int]] = {}
    for i, instance in enumerate(instances):
        by_processor.setdefault(instance.type.spec.processor, []).append(i)
    # The emptiest of a large kind, so the exact re-pack stays quick.
    groups = [
        sorted(g, key=lambda i: instances[i].use)[:_GROUP_MAX]
        for _, g in sorted(by_processor.items())
        if len(g) > 1
    ]
    if not groups:
        return []
    return [groups[(turn + k) % len(groups)] for k in range(min(how_many, len(groups)))]
