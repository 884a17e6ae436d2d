"""The search schedule: which stage runs when, and on what share of the time (or, in
deterministic mode, of the work budget) left. Every time share and per-attempt limit is here."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import msgspec

from packing.contracts import Plan, Problem, SolvePoint
from packing.solver.assemble import assemble_plan
from packing.solver.bounds import WholeInstanceBound, greedy_assignment, mip_start, solve_aggregated
from packing.solver.cpsat import WALL, Clock
from packing.solver.exact import solve_devices
from packing.solver.fill import fill_start
from packing.solver.model import Class, InfeasibleError, Instance, Type, cost, over_quota
from packing.solver.neighbourhood import neighbourhood_search
from packing.solver.prepare import (
    check_feasible,
    classes_of,
    drop_dominated,
    instance_bound,
    types_of,
)
from packing.solver.progress import SolveProgress, Tracker, TrajectoryPoint
from packing.solver.realise import downsize, evacuate, start_from_assignment
from packing.solver.tier import Tier, choose_tier

# The search's share of the time limit, and the seconds kept for building the plan after it.
SEARCH_SHARE = 0.95
# With the on-demand tier, the tier's packing gets this share of the search; the packing of
# every model resident, to compare with, the rest.
TIER_SHARE = 0.6
PLAN_SECONDS = 0.2
# Exact device-level search only when the boolean matrix stays this small; it gets
# EXACT_AGGREGATED_SHARE of the time for the volume model first, the rest for itself.
EXACT_MAX_BOOLEANS = 20_000
EXACT_AGGREGATED_SHARE = 0.5
# Past the exact search's size, shares of the time left: CP-SAT's volume model; the
# whole-instance start filled onto its own instances (of which SCIP's solve takes
# FILL_MIP_SHARE); and the starts that hold back START_SLACKS of every device so that their
# replicas fit whole devices (each share was the best on some benchmark fleet). The
# neighbourhood search has what is left.
AGGREGATED_SHARE = 0.1
FILL_SHARE = 0.45
FILL_MIP_SHARE = 0.6
START_SHARE = 0.2
START_SLACKS = (0.01, 0.02, 0.03)
# Seconds for each device's knapsack when a whole-instance solution is filled device by device.
KNAPSACK_SECONDS = 0.1
# Seconds per neighbourhood re-pack (more as the neighbourhoods widen), and for a
# neighbourhood of every instance of one processor kind.
NEIGHBOURHOOD_SECONDS = 1.0
GROUP_SECONDS = 3.0


def solve(
    problem: Problem,
    *,
    time_limit_s: float = 10.0,
    workers: int = 2,
    plan_id: str | None = None,
    deterministic: bool = False,
    progress: Callable[[SolveProgress], None] | None = None,
) -> Plan:
    """The cheapest plan found within ``time_limit_s``, with its lower bound and gap.

    ``progress``, if given, is called (on the calling thread) whenever the incumbent cost or
    the proven bound improves, with a ``SolveProgress``; it only observes the search.

    ``deterministic`` bounds the search by work instead of the clock: ``time_limit_s`` is then
    a budget of CP-SAT deterministic seconds (SCIP gets nodes in proportion), every CP-SAT
    solve runs on one worker with a fixed seed and the whole-instance bound runs to its node
    limit before the search rather than beside it, so the same problem and budget give the
    same plan (``created_at`` and ``solve_seconds`` aside) however loaded the machine is."""
    return solve_with_trajectory(
        problem,
        time_limit_s=time_limit_s,
        workers=workers,
        plan_id=plan_id,
        deterministic=deterministic,
        progress=progress,
    )[0]


def solve_with_trajectory(
    problem: Problem,
    *,
    time_limit_s: float = 10.0,
    workers: int = 2,
    plan_id: str | None = None,
    deterministic: bool = False,
    progress: Callable[[SolveProgress], None] | None = None,
) -> tuple[Plan, list[TrajectoryPoint]]:
    """``solve``, and the trajectory of (elapsed seconds, cost, bound) at each improvement,
    the last point the plan's own figures."""
    started = time.perf_counter()
    clock = Clock(deterministic)
    # Leave room for building the plan after the last solve.
    deadline = clock.now() + max(time_limit_s * SEARCH_SHARE - PLAN_SECONDS, 0.1)
    # With the on-demand tier, the solver packs each on-demand model's expected occupancy on
    # devices that keep room to load one; without it (or when it saves nothing) the problem
    # as it is, so that such plans are the ones made before the tier existed.
    tier = choose_tier(problem)
    if tier is None:
        tracker = Tracker(time_limit_s, progress)
        plan = _solve_posed(problem, None, deadline, workers, plan_id, clock, tracker, started)
        return _with_trajectory(plan, tracker)
    # The tier's saving is an estimate made before packing, and on thousands of distinct
    # request rates the search's own spread can exceed it (a Zipf fleet's tier plan came out
    # 7.9% dearer than every model resident, benchmarks/RESULTS.md): the same budget also packs
    # every model resident, and the cheaper plan is kept (at equal cost, the one without cold
    # starts), so that asking for the tier never costs more than not asking.
    middle = clock.now() + (deadline - clock.now()) * TIER_SHARE
    tracker = Tracker(time_limit_s, progress)
    tiered = _solve_posed(problem, tier, middle, workers, plan_id, clock, tracker, started)
    resident_tracker = Tracker(time_limit_s, _labelled(progress, "every model resident: "))
    resident = _solve_posed(
        problem, None, deadline, workers, plan_id, clock, resident_tracker, started
    )
    kept, kept_tracker = (
        (resident, resident_tracker)
        if resident.cost_per_hour <= tiered.cost_per_hour  # (a tie: no cold starts for it)
        else (tiered, tracker)
    )
    # Both searches' time, as without the tier's the one search's.
    kept = msgspec.structs.replace(kept, solve_seconds=round(time.perf_counter() - started, 3))
    return _with_trajectory(kept, kept_tracker)


def _labelled(
    progress: Callable[[SolveProgress], None] | None, prefix: str
) -> Callable[[SolveProgress], None] | None:
    if progress is None:
        return None
    return lambda point: progress(point._replace(stage=prefix + point.stage))


def _with_trajectory(plan: Plan, tracker: Tracker) -> tuple[Plan, list[TrajectoryPoint]]:
    tracker.finish(plan.cost_per_hour, plan.lower_bound_cost_per_hour)
    record = [
        SolvePoint(
            elapsed_s=round(point.elapsed_s, 3),
            cost_per_hour=None if point.cost is None else round(point.cost, 6),
            lower_bound_cost_per_hour=None if point.bound is None else round(point.bound, 6),
        )
        for point in tracker.trajectory
    ]
    return msgspec.structs.replace(plan, solve_trajectory=record), tracker.trajectory


def _solve_posed(
    problem: Problem,
    tier: Tier | None,
    deadline: float,
    workers: int,
    plan_id: str | None,
    clock: Clock,
    tracker: Tracker,
    started: float,
) -> Plan:
    """The plan of ``problem`` as ``tier`` poses it (None: every model resident), searched
    until ``deadline`` on ``clock``; its bound is the posed problem's."""
    packed = problem if tier is None else tier.problem
    types = types_of(packed, None if tier is None else tier.reserve)
    classes = classes_of(packed, types)
    check_feasible(packed, types, classes)
    types = drop_dominated(types, classes)

    exact_size = len(problem.models) * sum(t.devices * instance_bound(t, classes) for t in types)
    exact = exact_size <= EXACT_MAX_BOOLEANS
    # The exact device-level search proves its own bound; larger problems get a second bound
    # computed beside the search.
    whole = WholeInstanceBound(types, classes, 0 if exact else deadline - clock.now(), clock)
    tracker.report("whole-instance bound", bound=whole.bound())
    try:
        instances, lower_bound = _search(
            types, classes, exact, deadline, workers, whole.bound, clock, tracker
        )
    finally:
        whole_bound = whole.result()
    lower_bound = max(lower_bound, whole_bound)
    broken = over_quota(instances)
    if broken:
        raise InfeasibleError(
            f"no plan within limits.instance_quotas was found in the time limit "
            f"({', '.join(broken)}); raise the time limit or the quotas"
        )
    total = cost(instances)
    lower_bound = min(lower_bound, total)
    gap = (total - lower_bound) / total if total > 0 else 0.0
    return assemble_plan(
        problem,
        classes,
        instances,
        cost=total,
        lower_bound=lower_bound,
        gap=gap,
        status="optimal" if gap <= 1e-9 else "feasible",
        seconds=time.perf_counter() - started,
        plan_id=plan_id,
        tier=tier,
    )


def _search(
    types: list[Type],
    classes: list[Class],
    exact: bool,
    deadline: float,
    workers: int,
    proven: Callable[[], float],
    clock: Clock = WALL,
    tracker: Tracker | None = None,
) -> tuple[list[Instance], float]:
    """The cheapest instances found by the deadline and the bound the searches proved;
    ``proven`` reads a bound proven beside them, so the search can stop when it is met.
    ``tracker`` hears of every better cost and bound."""
    tracker = tracker or Tracker(0.0)
    # The volume model's bound is its LP value, reached early; past a good start, the time is
    # better spent elsewhere.
    assignment, lower_bound = solve_aggregated(
        types,
        classes,
        greedy_assignment(types, classes),
        (deadline - clock.now()) * (EXACT_AGGREGATED_SHARE if exact else AGGREGATED_SHARE),
        workers,
        clock,
    )
    tracker.report("volume model", bound=lower_bound)
    realising = clock.now()
    instances = start_from_assignment(types, classes, assignment, deadline, clock)
    # What one realisation costs on this fleet (tens of seconds past 10,000 models).
    realise_s = clock.now() - realising
    tracker.report("realisation", cost=cost(instances))
    if not exact:
        # Other starts from the volume model with whole instances, solved by SCIP: its
        # solution filled onto its own instances, then solutions with a little of every
        # device held back, realised (the first wins on large fleets, the others where one
        # fresh instance is a large part of the cost). The search goes on from the cheapest.
        left = deadline - clock.now()
        for slack in (0.0, *START_SLACKS):
            if cost(instances) <= lower_bound + 1e-6:
                break
            if slack > 0 and clock.now() + realise_s > deadline:
                # A held-back start is realised as the first was, in as long: one that could
                # not finish by the deadline would only make the solve overrun its limit.
                break
            each = left * (FILL_SHARE if slack == 0 else START_SHARE / len(START_SLACKS))
            until = clock.now() + each
            solved = mip_start(
                types, classes, each * (FILL_MIP_SHARE if slack == 0 else 1), slack, clock
            )
            if solved is not None:
                if slack == 0:
                    found = fill_start(
                        types, classes, *solved, until, workers, clock, knapsack_s=KNAPSACK_SECONDS
                    )
                else:
                    found = start_from_assignment(types, classes, solved[0], deadline, clock)
                # A start past a quota only replaces one that is past a quota too.
                if not over_quota(found) and (
                    over_quota(instances) or cost(found) < cost(instances)
                ):
                    instances = found
                    tracker.report(
                        "filled start" if slack == 0 else "held-back start", cost=cost(instances)
                    )
    if exact:
        every = {t.index: instance_bound(t, classes) for t in types}
        instances, exact_bound = solve_devices(
            types, classes, instances, every, True, deadline - clock.now(), workers, clock
        )
        lower_bound = max(lower_bound, exact_bound)
        tracker.report("exact search", cost=cost(instances), bound=lower_bound)
    elif over_quota(instances):
        # A realisation that had to go past a quota: the device-level search over every type
        # repairs it (it keeps quotas).
        counts = Counter(instance.type.index for instance in instances)
        near = {t.index: min(counts[t.index] + 1, instance_bound(t, classes)) for t in types}
        instances, _ = solve_devices(
            types,
            classes,
            instances,
            near,
            False,
            max(deadline - clock.now(), 1.0),
            workers,
            clock,
        )
    if not exact and not over_quota(instances):
        # Whole replicas cannot fill both resources of every device as the volume model
        # does: re-pack a few instances at a time where the volume model's fractions met
        # whole devices.
        def bound_now() -> float:
            bound = max(lower_bound, proven())
            tracker.report("whole-instance bound", bound=bound)
            return bound

        instances = neighbourhood_search(
            types,
            classes,
            instances,
            deadline,
            workers,
            bound_now,
            clock,
            attempt_s=NEIGHBOURHOOD_SECONDS,
            group_s=GROUP_SECONDS,
            improved=lambda found: tracker.report("neighbourhood search", cost=cost(found)),
        )
    # The device-level search may leave an instance light enough to empty or downsize.
    instances = downsize(evacuate(instances, classes, deadline + 1.0, clock), types, classes)
    return instances, lower_bound
