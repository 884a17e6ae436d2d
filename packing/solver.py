"""Place every model replica on the cheapest set of instances, with a proven lower bound.

The solver works in layers:

1. **Classes.** Models whose replica count and per-type demands are identical are
   interchangeable, so they are aggregated into one class with a count. A fleet of 3,000
   look-alike models becomes one class, not 3,000 × bins booleans.
2. **Aggregated model (CP-SAT).** Integer ``x[c, t]`` (replicas of class ``c`` on type ``t``) and
   ``y[t]`` (instances of type ``t``) under per-type volume constraints for memory and compute,
   an anti-affinity bound (an instance holds at most one replica of each model) and a
   "big item" bound (at most one replica larger than half a device per device). Every plan is
   a solution of this model, so its proven bound is a lower bound on any plan's cost. It is
   warm-started from a greedy (cheapest cost per replica) solution.
3. **Realisation.** Each type's replicas are packed onto devices first-fit-decreasing by
   dominant share, opening extra instances if fragmentation demands it, then model ids are
   dealt to the replica slots so that no instance holds two replicas of one model, and
   instances are moved to a cheaper type where their contents fit.

Small problems (few models) are then solved exactly at device level with CP-SAT, warm-started
from the realisation, with symmetry breaking between identical instances. Larger ones get two
more things:

4. **Whole-instance bound (SCIP).** The volume model with integer instance counts but
   fractional replicas: one integer per type, so SCIP's branch and bound gets far in seconds,
   on a thread beside the search. A fractional instance of a dear type is most of the LP's
   gap at fleet scale, so this bound is the one reported when it is higher.
5. **Starts and neighbourhood search.** SCIP's solution of the same model keeps its
   instances: each type's replicas are packed onto them exactly (device by device as
   knapsacks, then by CP-SAT as a whole), and the few replicas whole devices leave over go to
   spare room or the cheapest fresh instances. The same model with 1-3% of every device held
   back gives other starts, realised first-fit. The cheapest start (these or the CP-SAT
   realisation) goes through a large-neighbourhood search: a few instances at a time, or every
   instance of one processor kind, are emptied and re-packed exactly on any mix of types.
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ortools.linear_solver import pywraplp
from ortools.sat.python import cp_model

from packing.contracts import (
    InstanceType,
    Plan,
    PlannedInstance,
    PlannedServer,
    Problem,
)
from packing.io import to_json

# Demands and capacities become integers on this scale for CP-SAT (parts per million of a
# device); demands round down and capacities up, so the aggregated model stays a relaxation.
_SCALE = 1_000_000
# Prices in units of 1e-5 dollars, rounded down for the same reason.
_PRICE_SCALE = 100_000
# Exact device-level search only when the boolean matrix stays this small.
_EXACT_MAX_BOOLEANS = 20_000
_EPS = 1e-9
# Past the exact search's size, shares of the time left: CP-SAT's volume model; the
# whole-instance start filled onto its own instances (of which SCIP's solve takes
# _FILL_MIP_SHARE); and the starts that hold back _START_SLACKS of every device so that their
# replicas fit whole devices (each share was the best on some benchmark fleet).
_AGGREGATED_SHARE = 0.1
_FILL_SHARE = 0.45
_FILL_MIP_SHARE = 0.6
_START_SHARE = 0.2
_START_SLACKS = (0.01, 0.02, 0.03)
# Seconds for each device's knapsack when a whole-instance solution is filled device by device.
_KNAPSACK_SECONDS = 0.1
# Deterministic mode: CP-SAT's seed, and SCIP's branch-and-bound nodes per second of budget
# (about what it processes per second on the 2-core machine, past the root).
_SEED = 1
_SCIP_NODES_PER_SECOND = 20


class _Clock:
    """The seconds the search schedule reads: the wall clock, or in deterministic mode the
    work the solvers did (CP-SAT's deterministic time; SCIP's nodes and Python between solves
    count nothing), so the same problem and budget take the same path. Every CP-SAT and SCIP
    solve is set up here."""

    def __init__(self, deterministic: bool = False, work: float = 0.0) -> None:
        self.deterministic = deterministic
        self.work = work

    def now(self) -> float:
        return self.work if self.deterministic else time.perf_counter()

    def fork(self) -> _Clock:
        """A clock for a solve run beside others: its work is joined after they all end."""
        return _Clock(self.deterministic, self.work)

    def join(self, forks: list[_Clock]) -> None:
        """Past work run side by side: as long as the longest of it took."""
        self.work = max([self.work, *(f.work for f in forks)])

    def cp_solve(
        self, model: cp_model.CpModel, limit_s: float, workers: int = 1
    ) -> tuple[cp_model.CpSolver, int]:
        """CP-SAT on ``model`` for ``limit_s`` seconds (or deterministic seconds, on one worker
        with a fixed seed): the solver, to read values from, and its status."""
        solver = cp_model.CpSolver()
        if self.deterministic:
            solver.parameters.max_deterministic_time = limit_s
            solver.parameters.num_workers = 1
            solver.parameters.random_seed = _SEED
        else:
            solver.parameters.max_time_in_seconds = limit_s
            solver.parameters.num_workers = max(1, workers)
        status = solver.solve(model)
        if self.deterministic:
            self.work += solver.deterministic_time
        return solver, status

    def limit_scip(self, solver: pywraplp.Solver, limit_s: float) -> None:
        """Bound a SCIP solve by ``limit_s`` seconds, or in deterministic mode by nodes."""
        if self.deterministic:
            nodes = 1 + round(limit_s * _SCIP_NODES_PER_SECOND)
            solver.SetSolverSpecificParametersAsString(f"limits/nodes = {nodes}\n")
        else:
            solver.SetTimeLimit(max(1, int(limit_s * 1000)))


_WALL = _Clock()


def _cost(instances: list[_Instance]) -> float:
    return sum(i.type.price for i in instances)


def _scaled_price(t: _Type) -> int:
    # Rounded down (so bounds stay valid), after absorbing binary noise: 0.072 * 1e5 is
    # 7199.999..., which must count as 7200 or a proven optimum reads as a gap.
    return math.floor(t.price * _PRICE_SCALE + 1e-6)


class InfeasibleError(ValueError):
    """No plan meets the limits; the message names the models and the constraint."""


@dataclass(frozen=True)
class _Type:
    index: int
    spec: InstanceType
    price: float
    devices: int
    memory_cap: float
    compute_cap: float
    quota: int | None

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class _Class:
    model_ids: list[str]
    replicas: int
    # type index -> (memory bytes, compute demand) of one replica on that type
    options: dict[int, tuple[float, float]]

    @property
    def count(self) -> int:
        return len(self.model_ids)

    @property
    def total_replicas(self) -> int:
        return self.count * self.replicas


@dataclass
class _Device:
    memory: float = 0.0
    compute: float = 0.0
    # class index -> replicas of it on this device
    load: dict[int, int] = field(default_factory=dict)


@dataclass
class _Instance:
    type: _Type
    devices: list[_Device]

    def count_of(self, class_index: int) -> int:
        return sum(d.load.get(class_index, 0) for d in self.devices)

    @property
    def empty(self) -> bool:
        return not any(d.load for d in self.devices)


def solve(
    problem: Problem,
    *,
    time_limit_s: float = 10.0,
    workers: int = 2,
    plan_id: str | None = None,
    deterministic: bool = False,
) -> Plan:
    """The cheapest plan found within ``time_limit_s``, with its lower bound and gap.

    ``deterministic`` bounds the search by work instead of the clock: ``time_limit_s`` is then
    a budget of CP-SAT deterministic seconds (SCIP gets nodes in proportion), every CP-SAT
    solve runs on one worker with a fixed seed and the whole-instance bound runs to its node
    limit before the search rather than beside it, so the same problem and budget give the
    same plan (``created_at`` and ``solve_seconds`` aside) however loaded the machine is."""
    started = time.perf_counter()
    clock = _Clock(deterministic)
    # Leave room for building the plan after the last solve.
    deadline = clock.now() + max(time_limit_s * 0.95 - 0.2, 0.1)
    types = _types(problem)
    classes = _classes(problem, types)
    _check_feasible(problem, types, classes)
    types = _drop_dominated(types, classes)

    exact_size = len(problem.models) * sum(t.devices * _instance_bound(t, classes) for t in types)
    exact = exact_size <= _EXACT_MAX_BOOLEANS
    # The exact device-level search proves its own bound; larger problems get a second bound
    # computed beside the search.
    whole = _WholeInstanceBound(types, classes, 0 if exact else deadline - clock.now(), clock)
    try:
        instances, lower_bound = _search(
            types, classes, exact, deadline, workers, whole.bound, clock
        )
    finally:
        whole_bound = whole.result()
    lower_bound = max(lower_bound, whole_bound)
    broken = _over_quota(instances)
    if broken:
        raise InfeasibleError(
            f"no plan within limits.instance_quotas was found in the time limit "
            f"({', '.join(broken)}); raise the time limit or the quotas"
        )
    cost = _cost(instances)
    lower_bound = min(lower_bound, cost)
    gap = (cost - lower_bound) / cost if cost > 0 else 0.0
    return _plan(
        problem,
        classes,
        instances,
        cost=cost,
        lower_bound=lower_bound,
        gap=gap,
        status="optimal" if gap <= 1e-9 else "feasible",
        seconds=time.perf_counter() - started,
        plan_id=plan_id,
    )


def _search(
    types: list[_Type],
    classes: list[_Class],
    exact: bool,
    deadline: float,
    workers: int,
    proven: Callable[[], float],
    clock: _Clock = _WALL,
) -> tuple[list[_Instance], float]:
    """The cheapest instances found by the deadline and the bound the searches proved;
    ``proven`` reads a bound proven beside them, so the search can stop when it is met."""
    # The volume model's bound is its LP value, reached early; past a good start, the time is
    # better spent elsewhere.
    assignment, lower_bound = _solve_aggregated(
        types,
        classes,
        _greedy_assignment(types, classes),
        (deadline - clock.now()) * (0.5 if exact else _AGGREGATED_SHARE),
        workers,
        clock,
    )
    instances = _realised(types, classes, assignment, deadline, clock)
    if not exact:
        # Other starts from the volume model with whole instances, solved by SCIP: its
        # solution filled onto its own instances, then solutions with a little of every
        # device held back, realised (the first wins on large fleets, the others where one
        # fresh instance is a large part of the cost). The search goes on from the cheapest.
        left = deadline - clock.now()
        for slack in (0.0, *_START_SLACKS):
            if _cost(instances) <= lower_bound + 1e-6:
                break
            each = left * (_FILL_SHARE if slack == 0 else _START_SHARE / len(_START_SLACKS))
            until = clock.now() + each
            solved = _mip_start(
                types, classes, each * (_FILL_MIP_SHARE if slack == 0 else 1), slack, clock
            )
            if solved is not None:
                if slack == 0:
                    found = _filled(types, classes, *solved, until, workers, clock)
                else:
                    found = _realised(types, classes, solved[0], deadline, clock)
                # A start past a quota only replaces one that is past a quota too.
                if not _over_quota(found) and (
                    _over_quota(instances) or _cost(found) < _cost(instances)
                ):
                    instances = found
    if exact:
        every = {t.index: _instance_bound(t, classes) for t in types}
        instances, exact_bound = _solve_devices(
            types, classes, instances, every, True, deadline - clock.now(), workers, clock
        )
        lower_bound = max(lower_bound, exact_bound)
    elif _over_quota(instances):
        # A realisation that had to go past a quota: the device-level search over every type
        # repairs it (it keeps quotas).
        counts = Counter(instance.type.index for instance in instances)
        near = {t.index: min(counts[t.index] + 1, _instance_bound(t, classes)) for t in types}
        instances, _ = _solve_devices(
            types,
            classes,
            instances,
            near,
            False,
            max(deadline - clock.now(), 1.0),
            workers,
            clock,
        )
    if not exact and not _over_quota(instances):
        # Whole replicas cannot fill both resources of every device as the volume model
        # does: re-pack a few instances at a time where the volume model's fractions met
        # whole devices.
        instances = _neighbourhood_search(
            types,
            classes,
            instances,
            deadline,
            workers,
            lambda: max(lower_bound, proven()),
            clock,
        )
    # The device-level search may leave an instance light enough to empty or downsize.
    instances = _downsize(_evacuate(instances, classes, deadline + 1.0, clock), types, classes)
    return instances, lower_bound


# ------------------------------------------------------------------------------ preparation


def _types(problem: Problem) -> list[_Type]:
    limits = problem.limits
    types = []
    for spec in problem.catalog.instance_types:
        quota = limits.instance_quotas.get(spec.name)
        if quota == 0:
            continue
        price = spec.spot_per_hour if problem.price == "spot" else spec.on_demand_per_hour
        if price is None:
            continue
        types.append(
            _Type(
                index=len(types),
                spec=spec,
                price=price,
                devices=spec.devices,
                memory_cap=limits.max_memory_fraction * spec.device_memory_bytes,
                compute_cap=limits.max_compute_utilization * spec.compute_capacity,
                quota=quota,
            )
        )
    if not types:
        what = "a spot price" if problem.price == "spot" else "a quota above zero"
        raise InfeasibleError(
            f"no instance type in catalog {problem.catalog.name!r} has {what}; "
            f"nothing can be placed"
        )
    return types


def _classes(problem: Problem, types: list[_Type]) -> list[_Class]:
    grouped: dict[tuple, _Class] = {}
    for model in problem.models:
        options: dict[int, tuple[float, float]] = {}
        for t in types:
            profile = model.profile_for(t.spec)
            if profile is None:
                continue
            options[t.index] = (float(profile.memory_bytes), model.replica_load(profile))
        key = (model.replicas, tuple(sorted(options.items())))
        group = grouped.get(key)
        if group is None:
            grouped[key] = _Class([model.id], model.replicas, options)
        else:
            group.model_ids.append(model.id)
    return list(grouped.values())


def _fits(option: tuple[float, float], t: _Type) -> bool:
    memory, compute = option
    return memory <= t.memory_cap * (1 + _EPS) and compute <= t.compute_cap * (1 + _EPS)


def _check_feasible(problem: Problem, types: list[_Type], classes: list[_Class]) -> None:
    """Refuse, naming the models, what no plan can hold; prune options that cannot fit."""
    by_type = {t.index: t for t in types}
    limits = problem.limits
    problems: list[str] = []
    for group in classes:
        names = _name_models(group.model_ids)
        if not group.options:
            problems.append(
                f"{names}: no profile matches any instance type of catalog "
                f"{problem.catalog.name!r} (with {problem.price} prices and quotas)"
            )
            continue
        fitting = {i: o for i, o in group.options.items() if _fits(o, by_type[i])}
        if not fitting:
            memory = min(o[0] for o in group.options.values())
            compute = min(o[1] for o in group.options.values())
            largest = max(by_type[i].memory_cap for i in group.options)
            strongest = max(by_type[i].compute_cap for i in group.options)
            if memory > largest * (1 + _EPS):
                problems.append(
                    f"{names}: needs {memory / 2**30:.2f} GiB per replica, more than any "
                    f"device allows ({largest / 2**30:.2f} GiB at max_memory_fraction "
                    f"{limits.max_memory_fraction})"
                )
            elif compute > strongest * (1 + _EPS):
                problems.append(
                    f"{names}: needs {compute:.3f} device-seconds per second per replica "
                    f"(traffic / replicas × seconds per request), more than any device allows "
                    f"({strongest:.3f} at max_compute_utilization "
                    f"{limits.max_compute_utilization}); raise replicas"
                )
            else:
                problems.append(
                    f"{names}: no single device holds both its memory and its compute demand"
                )
            continue
        group.options = fitting
        quotas = [by_type[i].quota for i in fitting]
        if all(q is not None for q in quotas) and sum(quotas) < group.replicas:
            problems.append(
                f"{names}: {group.replicas} replicas need {group.replicas} instances, but "
                f"limits.instance_quotas allow only {sum(quotas)} of the types that fit "
                f"({', '.join(sorted(by_type[i].name for i in fitting))})"
            )
    if problems:
        raise InfeasibleError("no plan is possible: " + "; ".join(problems))


def _name_models(model_ids: list[str], shown: int = 5) -> str:
    head = ", ".join(model_ids[:shown])
    more = f" and {len(model_ids) - shown} more" if len(model_ids) > shown else ""
    return f"model{'s' if len(model_ids) > 1 else ''} {head}{more}"


def _drop_dominated(types: list[_Type], classes: list[_Class]) -> list[_Type]:
    """Remove types another type beats on price and every capacity for every class."""

    def dominates(a: _Type, b: _Type) -> bool:
        if a.quota is not None or a.devices != b.devices or a.price > b.price:
            return False
        if a.memory_cap < b.memory_cap or a.compute_cap < b.compute_cap:
            return False
        for group in classes:
            option_b = group.options.get(b.index)
            if option_b is None:
                continue
            option_a = group.options.get(a.index)
            if option_a is None or option_a[0] > option_b[0] or option_a[1] > option_b[1]:
                return False
        return True

    kept = []
    for b in types:
        beaten = any(
            dominates(a, b) and (a.price < b.price or a.index < b.index or not dominates(b, a))
            for a in types
            if a is not b
        )
        if not beaten:
            kept.append(b)
    kept_ids = {t.index for t in kept}
    for group in classes:
        group.options = {i: o for i, o in group.options.items() if i in kept_ids}
    return kept


def _per_instance(group: _Class, t: _Type) -> int:
    """How many replicas of one class alone fit on one instance of ``t``."""
    memory, compute = group.options[t.index]
    per_device = min(
        math.floor(t.memory_cap / memory + _EPS) if memory > 0 else group.total_replicas,
        math.floor(t.compute_cap / compute + _EPS) if compute > 0 else group.total_replicas,
    )
    return max(0, min(per_device * t.devices, group.count))


def _instance_bound(t: _Type, classes: list[_Class]) -> int:
    """No plan needs more instances of ``t`` than the replicas that can go there."""
    replicas = sum(c.total_replicas for c in classes if t.index in c.options)
    return replicas if t.quota is None else min(replicas, t.quota)


# --------------------------------------------------------------------------- aggregated


def _greedy_assignment(types: list[_Type], classes: list[_Class]) -> dict[tuple[int, int], int]:
    """Each class on the type with the lowest price per replica: the warm start."""
    assignment: dict[tuple[int, int], int] = {}
    used: dict[int, int] = {}
    by_type = {t.index: t for t in types}
    for ci, group in sorted(enumerate(classes), key=lambda item: -item[1].total_replicas):
        remaining = group.total_replicas
        ranked = sorted(
            group.options,
            key=lambda ti: by_type[ti].price / max(_per_instance(group, by_type[ti]), 1),
        )
        for ti in ranked:
            t = by_type[ti]
            per = _per_instance(group, t)
            if per == 0:
                continue
            instances = math.ceil(remaining / per)
            # Replicas of one model must land on distinct instances.
            instances = max(instances, min(group.replicas, remaining))
            if t.quota is not None:
                instances = min(instances, t.quota - used.get(ti, 0))
            if instances <= 0:
                continue
            placed = min(remaining, instances * per)
            assignment[ci, ti] = assignment.get((ci, ti), 0) + placed
            used[ti] = used.get(ti, 0) + instances
            remaining -= placed
            if remaining == 0:
                break
    return assignment


def _volume_rows(t: _Type, classes: list[_Class]) -> list[tuple[dict[int, float], int]]:
    """Rows ``sum(coef * x[c, t]) <= rhs * y[t]`` every plan meets on type ``t``: memory and
    compute volume (in devices), at most one replica larger than half a device per device,
    and at most one replica of each model per instance where volume does not imply it."""
    on_type = [(ci, g) for ci, g in enumerate(classes) if t.index in g.options]
    rows: list[tuple[dict[int, float], int]] = []
    shares = {
        ci: (g.options[t.index][0] / t.memory_cap, g.options[t.index][1] / t.compute_cap)
        for ci, g in on_type
    }
    for dim in (0, 1):
        volume = {ci: share[dim] for ci, share in shares.items() if share[dim]}
        if volume:
            rows.append((volume, t.devices))
        big = {ci: 1.0 for ci, share in shares.items() if share[dim] > 0.5 * (1 + _EPS)}
        if big:
            rows.append((big, t.devices))
    for ci, group in on_type:
        # Volume alone caps this class at devices / share per instance, no more than its count.
        if not any(group.count * share >= t.devices for share in shares[ci]):
            rows.append(({ci: 1.0}, group.count))
    return rows


def _solve_aggregated(
    types: list[_Type],
    classes: list[_Class],
    hint: dict[tuple[int, int], int],
    time_limit_s: float,
    workers: int,
    clock: _Clock = _WALL,
) -> tuple[dict[tuple[int, int], int], float]:
    model = cp_model.CpModel()
    x: dict[tuple[int, int], cp_model.IntVar] = {}
    for ci, group in enumerate(classes):
        for ti in group.options:
            x[ci, ti] = model.new_int_var(0, group.total_replicas, f"x_{ci}_{ti}")
        model.add(sum(x[ci, ti] for ti in group.options) == group.total_replicas)
    y = {t.index: model.new_int_var(0, _instance_bound(t, classes), f"y_{t.index}") for t in types}
    for t in types:
        if not any(t.index in g.options for g in classes):
            model.add(y[t.index] == 0)
        # Coefficients round down, so the model stays a relaxation.
        for coefs, rhs in _volume_rows(t, classes):
            terms = [(math.floor(_SCALE * c), ci) for ci, c in coefs.items()]
            model.add(sum(a * x[ci, t.index] for a, ci in terms if a) <= _SCALE * rhs * y[t.index])
    model.minimize(sum(_scaled_price(t) * y[t.index] for t in types))

    by_type = {t.index: t for t in types}
    for (ci, ti), var in x.items():
        model.add_hint(var, hint.get((ci, ti), 0))
    for t in types:
        hinted = 0
        for ci, group in enumerate(classes):
            count = hint.get((ci, t.index), 0)
            if count:
                per = _per_instance(group, by_type[t.index])
                hinted += max(math.ceil(count / per), min(group.replicas, count))
        model.add_hint(y[t.index], hinted)

    solver, status = clock.cp_solve(model, max(time_limit_s, 0.05), workers)
    bound = max(0.0, solver.best_objective_bound / _PRICE_SCALE)
    if status == cp_model.INFEASIBLE:
        raise InfeasibleError(_quota_message(types, classes))
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return hint, bound
    return {key: solver.value(var) for key, var in x.items() if solver.value(var)}, bound


def _volume_mip(
    types: list[_Type], classes: list[_Class], slack: float = 0.0
) -> tuple[
    pywraplp.Solver | None,
    dict[tuple[int, int], pywraplp.Variable],
    dict[int, pywraplp.Variable],
]:
    """The volume model with whole instances and fractional replicas for SCIP (``None``
    where SCIP is missing): the solver, replicas ``x[c, t]`` and instances ``y[t]``;
    ``slack`` holds back that share of every device."""
    solver = pywraplp.Solver.CreateSolver("SCIP")
    if solver is None:
        return None, {}, {}
    x = {
        (ci, ti): solver.NumVar(0, group.total_replicas, "")
        for ci, group in enumerate(classes)
        for ti in group.options
    }
    for ci, group in enumerate(classes):
        solver.Add(sum(x[ci, ti] for ti in group.options) == group.total_replicas)
    y = {t.index: solver.IntVar(0, _instance_bound(t, classes), "") for t in types}
    for t in types:
        for coefs, rhs in _volume_rows(t, classes):
            solver.Add(
                sum(c * x[ci, t.index] for ci, c in coefs.items()) <= rhs * (1 - slack) * y[t.index]
            )
        solver.Objective().SetCoefficient(y[t.index], _scaled_price(t) / _PRICE_SCALE)
    solver.Objective().SetMinimization()
    return solver, x, y


def _mip_start(
    types: list[_Type],
    classes: list[_Class],
    time_limit_s: float,
    slack: float,
    clock: _Clock = _WALL,
) -> tuple[dict[tuple[int, int], int], dict[int, int]] | None:
    """SCIP's solution of the whole-instance model: whole replicas per (class, type) and
    instances per type."""
    solver, x, y = _volume_mip(types, classes, slack)
    if solver is None:
        return None
    clock.limit_scip(solver, time_limit_s)
    parameters = pywraplp.MPSolverParameters()
    # A start needs no proof: within 0.1% is as good as optimal here.
    parameters.SetDoubleParam(parameters.RELATIVE_MIP_GAP, 1e-3)
    if solver.Solve(parameters) not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        return None
    assignment: dict[tuple[int, int], int] = {}
    for ci, group in enumerate(classes):
        share = {ti: x[ci, ti].solution_value() for ti in group.options}
        whole = {ti: math.floor(v + 1e-6) for ti, v in share.items()}
        # Largest remainders take the replicas the floors left out.
        left = group.total_replicas - sum(whole.values())
        for ti in sorted(share, key=lambda ti: whole[ti] - share[ti])[: max(left, 0)]:
            whole[ti] += 1
        assignment.update({(ci, ti): n for ti, n in whole.items() if n})
    counts = {ti: round(var.solution_value()) for ti, var in y.items()}
    return assignment, {ti: n for ti, n in counts.items() if n}


class _WholeInstanceBound:
    """The volume model with whole instances but fractional replicas, a mixed-integer program
    with one integer per type, solved by SCIP on a thread of its own beside the search. Its
    bound beats the volume model's LP, which CP-SAT rarely lifts: a fractional instance of a
    dear type is most of the gap at fleet scale. Without SCIP it adds nothing. On a
    deterministic clock it runs to its node limit at once, with no thread racing the search."""

    def __init__(
        self,
        types: list[_Type],
        classes: list[_Class],
        time_limit_s: float,
        clock: _Clock = _WALL,
    ) -> None:
        self._thread: threading.Thread | None = None
        self._bound = 0.0
        # Devices a little larger than they are, so that SCIP's feasibility tolerance cannot
        # let a solution (and so the bound) use less than a whole instance more.
        self._solver = _volume_mip(types, classes, -1e-5)[0] if time_limit_s > 0 else None
        if self._solver is None:
            return
        clock.limit_scip(self._solver, time_limit_s)
        if clock.deterministic:
            self._run()
            return
        self._thread = threading.Thread(target=self._run, name="whole-instance-bound", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        status = self._solver.Solve()
        if status in (
            pywraplp.Solver.OPTIMAL,
            pywraplp.Solver.FEASIBLE,
            pywraplp.Solver.NOT_SOLVED,
        ):
            bound = self._solver.Objective().BestBound()
            if math.isfinite(bound):
                # Every cost is a whole number of price units: round up to one, after taking
                # off more than SCIP's optimality tolerance.
                units = math.ceil(bound * _PRICE_SCALE * (1 - 1e-7) - 1e-6)
                self._bound = max(0.0, units / _PRICE_SCALE)

    def bound(self) -> float:
        """The bound, once the solve has ended by itself (0 before)."""
        return self._bound

    def result(self) -> float:
        """Stop the solve and return the best bound it proved."""
        if self._thread is None:
            return self._bound  # ran to its node limit already, or not at all
        self._solver.InterruptSolve()
        self._thread.join()
        return self._bound


def _quota_message(types: list[_Type], classes: list[_Class]) -> str:
    limited = {t.index: t for t in types if t.quota is not None}
    stuck = [
        m for g in classes if g.options and set(g.options) <= set(limited) for m in g.model_ids
    ]
    quotas = ", ".join(f"{t.name}: {t.quota}" for t in limited.values())
    if stuck:
        return (
            f"no plan is possible within limits.instance_quotas ({quotas}): "
            f"{_name_models(stuck)} can only run on those types and do not fit in them"
        )
    return f"no plan is possible within limits.instance_quotas ({quotas})"


# -------------------------------------------------------------------------- realisation


def _realise(
    types: list[_Type], classes: list[_Class], assignment: dict[tuple[int, int], int]
) -> list[_Instance]:
    instances: list[_Instance] = []
    leftovers: dict[int, int] = {}
    for t in types:
        items = {ci: n for (ci, ti), n in assignment.items() if ti == t.index and n}
        if items:
            packed, left = _pack_type(t, classes, items, t.quota)
            instances.extend(packed)
            for ci, n in left.items():
                leftovers[ci] = leftovers.get(ci, 0) + n
    # Replicas the assignment left out (a time-limited solve that fell back to a greedy start
    # cut short by quotas) are leftovers too.
    for ci, group in enumerate(classes):
        assigned = sum(n for (c, _), n in assignment.items() if c == ci)
        if assigned < group.total_replicas:
            leftovers[ci] = leftovers.get(ci, 0) + group.total_replicas - assigned
    _place_leftovers(types, classes, instances, leftovers)
    return instances


def _place_leftovers(
    types: list[_Type],
    classes: list[_Class],
    instances: list[_Instance],
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
            key=lambda t: t.price / max(_per_instance(group, t), 1),
        )
        for t in ranked:
            if left == 0:
                break
            used = sum(1 for i in instances if i.type.index == t.index)
            room = None if t.quota is None else t.quota - used
            if room is not None and room <= 0:
                continue
            packed, rest = _pack_type(t, classes, {ci: left}, room)
            instances.extend(packed)
            left = rest.get(ci, 0)
        if left:
            # solve() refuses a plan that still breaks a quota.
            packed, _ = _pack_type(ranked[0], classes, {ci: left})
            instances.extend(packed)


def _realised(
    types: list[_Type],
    classes: list[_Class],
    assignment: dict[tuple[int, int], int],
    deadline: float,
    clock: _Clock = _WALL,
) -> list[_Instance]:
    """A start from a volume solution: realised, then emptied and downsized where it can be."""
    instances = _evacuate(_realise(types, classes, assignment), classes, deadline, clock)
    return _downsize(instances, types, classes)


def _filled(
    types: list[_Type],
    classes: list[_Class],
    assignment: dict[tuple[int, int], int],
    counts: dict[int, int],
    deadline: float,
    workers: int,
    clock: _Clock = _WALL,
) -> list[_Instance]:
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
            by_type[ti].price
            * max(option[0] / by_type[ti].memory_cap, option[1] / by_type[ti].compute_cap)
            / by_type[ti].devices
            for ti, option in group.options.items()
        )
        + min(by_type[ti].price for ti in group.options)
        - cheapest
        for ci, group in enumerate(classes)
    }
    fleet: list[_Instance] = []
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
        packed, left = _pack_type(t, classes, items, counts.get(t.index, 0))
        # This type's share of the time, half for each way of filling.
        later = sum(sizes[u.index] for u, _ in per_type[k:])
        share = (deadline - clock.now()) * sizes[t.index] / max(later, 1)
        if counts.get(t.index) and left and share > 0.05:
            by_knapsacks = _fill_by_knapsacks(
                t, classes, items, counts[t.index], clock.now() + share / 2, clock
            )
            if _worth(by_knapsacks[1], value) < _worth(left, value):
                packed, left = by_knapsacks
        if counts.get(t.index) and left and share > 0.05:
            rest = max(share - (clock.now() - started), 0.05)
            packed, left = _fill_exactly(
                t, classes, items, counts[t.index], packed, left, value, rest, workers, clock
            )
        fleet.extend(packed)
        over.update(left)
    for ci in sorted(over, key=lambda ci: -value[ci]):
        for instance in fleet:
            if not over[ci]:
                break
            over[ci] -= _place(instance, ci, classes[ci], over[ci])
    fresh = list(fleet)
    _place_leftovers(types, classes, fresh, {ci: n for ci, n in over.items() if n})
    fresh = fresh[len(fleet) :]
    if fresh:
        outside = Counter(instance.type.index for instance in fleet)
        cheaper = _repack_instances(
            types, classes, fresh, outside, max(deadline - clock.now(), 1.0), clock
        )
        fresh = cheaper if cheaper is not None else fresh
    return _downsize(_evacuate(fleet + fresh, classes, deadline, clock), types, classes)


def _fill_exactly(
    t: _Type,
    classes: list[_Class],
    items: dict[int, int],
    count: int,
    start: list[_Instance],
    start_left: dict[int, int],
    value: dict[int, float],
    time_limit_s: float,
    workers: int,
    clock: _Clock = _WALL,
) -> tuple[list[_Instance], dict[int, int]]:
    """``count`` instances of ``t`` packed by CP-SAT from ``start`` (a packing of ``items``
    that leaves ``start_left`` out) so that the replicas left out are worth the least; the
    packing and what it leaves out."""
    slots = [(t, j) for j in range(count)]
    model, used, z = _slot_model(
        slots, classes, items, lambda t, option: _exact_demand(option), _exact_capacity, False
    )
    for var in used:
        model.add(var == 1)
    _hint_slots(model, slots, used, z, start)
    # Value in millionths of a cent per hour: fine enough to rank any two replicas.
    model.maximize(sum(round(value[ci] * 1e8) * v for (_, _, ci), v in z.items()))
    solver, status = clock.cp_solve(model, time_limit_s, workers)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return start, start_left
    packed = [i for i in _read_slots(solver, slots, used, z, classes) if not i.empty]
    left = Counter(items)
    for instance in packed:
        for device in instance.devices:
            left.subtract(device.load)
    left = {ci: n for ci, n in left.items() if n}
    if _worth(left, value) >= _worth(start_left, value):
        return start, start_left
    return packed, left


def _load(device: _Device, ci: int, n: int, option: tuple[float, float]) -> None:
    """Put ``n`` replicas of class ``ci`` (each needing ``option``) on a device holding none."""
    device.load[ci] = n
    device.memory += n * option[0]
    device.compute += n * option[1]


def _worth(replicas: dict[int, int], value: dict[int, float]) -> float:
    return sum(n * value[ci] for ci, n in replicas.items())


def _fill_by_knapsacks(
    t: _Type,
    classes: list[_Class],
    items: dict[int, int],
    count: int,
    deadline: float,
    clock: _Clock = _WALL,
) -> tuple[list[_Instance], dict[int, int]]:
    """``count`` instances of ``t`` filled one device at a time with the replicas of
    ``items`` that fill it most (CP-SAT's knapsack), each resource weighted by how much of
    it is still to place, so the last devices are not left the awkward ones; the packing
    and what it leaves out."""
    left = dict(items)
    packed = []
    memory_cap, compute_cap = _exact_capacity(t)
    for k in range(count):
        instance = _Instance(t, [_Device() for _ in range(t.devices)])
        for d, device in enumerate(instance.devices):
            wanted = {
                ci: room
                for ci, n in left.items()
                if (room := min(n, classes[ci].count - instance.count_of(ci))) > 0
            }
            if not wanted:
                break
            weights = [
                sum(n * classes[ci].options[t.index][dim] for ci, n in wanted.items()) / cap
                for dim, cap in enumerate((t.memory_cap, t.compute_cap))
            ]
            model = cp_model.CpModel()
            take = {ci: model.new_int_var(0, n, "") for ci, n in wanted.items()}
            for dim, cap in enumerate((memory_cap, compute_cap)):
                demands = {ci: _exact_demand(classes[ci].options[t.index])[dim] for ci in take}
                model.add(sum(demands[ci] * v for ci, v in take.items()) <= cap)
            model.maximize(
                sum(
                    round(
                        _SCALE
                        * (
                            weights[0] * classes[ci].options[t.index][0] / t.memory_cap
                            + weights[1] * classes[ci].options[t.index][1] / t.compute_cap
                        )
                    )
                    * v
                    for ci, v in take.items()
                )
            )
            devices_left = (count - k) * t.devices - d
            limit = max(min(_KNAPSACK_SECONDS, (deadline - clock.now()) / devices_left), 0.01)
            solver, status = clock.cp_solve(model, limit)
            if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
                continue
            for ci, var in take.items():
                n = solver.value(var)
                if n:
                    _load(device, ci, n, classes[ci].options[t.index])
                    left[ci] -= n
        packed.append(instance)
    return [i for i in packed if not i.empty], {ci: n for ci, n in left.items() if n}


def _over_quota(instances: list[_Instance]) -> list[str]:
    counts: dict[int, int] = {}
    for instance in instances:
        counts[instance.type.index] = counts.get(instance.type.index, 0) + 1
    by_index = {i.type.index: i.type for i in instances}
    return [
        f"{by_index[ti].name}: {n} instances, quota {by_index[ti].quota}"
        for ti, n in sorted(counts.items())
        if by_index[ti].quota is not None and n > by_index[ti].quota
    ]


def _pack_type(
    t: _Type, classes: list[_Class], items: dict[int, int], limit: int | None = None
) -> tuple[list[_Instance], dict[int, int]]:
    """Spread each class evenly over the fewest instances the volumes allow, so every device
    gets about the average mix of memory-heavy and compute-heavy replicas (what the volume
    model assumed); what does not fit goes to extra instances filled by best match."""

    def share(ci: int) -> float:
        memory, compute = classes[ci].options[t.index]
        return max(memory / t.memory_cap, compute / t.compute_cap)

    memory_volume = sum(n * classes[ci].options[t.index][0] for ci, n in items.items())
    compute_volume = sum(n * classes[ci].options[t.index][1] for ci, n in items.items())
    needed = max(
        math.ceil(memory_volume / (t.memory_cap * t.devices) - 1e-6),
        math.ceil(compute_volume / (t.compute_cap * t.devices) - 1e-6),
        max(math.ceil(n / classes[ci].count) for ci, n in items.items()),
        1,
    )
    if limit is not None:
        needed = min(needed, limit)
    opened = [_Instance(t, [_Device() for _ in range(t.devices)]) for _ in range(needed)]
    bins = [
        (instance, device)
        for device_index in range(t.devices)
        for instance in opened
        for device in [instance.devices[device_index]]
    ]
    remaining: dict[int, int] = {}
    for ci in sorted(items, key=share, reverse=True):
        group = classes[ci]
        memory, compute = group.options[t.index]
        left = items[ci]
        # Largest first, each replica onto the device it leaves least loaded: the
        # longest-processing-time rule in two dimensions.
        while left:
            best, best_key = None, None
            for instance, device in bins:
                after_memory = (device.memory + memory) / t.memory_cap
                after_compute = (device.compute + compute) / t.compute_cap
                if after_memory > 1 + _EPS or after_compute > 1 + _EPS:
                    continue
                key = (max(after_memory, after_compute), after_memory + after_compute)
                if best_key is None or key < best_key:
                    if instance.count_of(ci) < group.count:
                        best, best_key = (instance, device), key
            if best is None:
                break
            _put(best[0], best[1], ci, group, memory, compute, 1)
            left -= 1
        if left:
            remaining[ci] = left
    while any(remaining.values()) and (limit is None or len(opened) < limit):
        instance = _Instance(t, [_Device() for _ in range(t.devices)])
        for device in instance.devices:
            _fill_device(instance, device, classes, remaining)
        if instance.empty:
            stuck = [ci for ci, n in remaining.items() if n]
            raise AssertionError(f"classes {stuck} do not fit an empty {t.name}")
        opened.append(instance)
    return [i for i in opened if not i.empty], {ci: n for ci, n in remaining.items() if n}


def _put(
    instance: _Instance,
    device: _Device,
    ci: int,
    group: _Class,
    memory: float,
    compute: float,
    want: int,
) -> int:
    t = instance.type
    fit = min(
        want,
        group.count - instance.count_of(ci),
        _room(t.memory_cap - device.memory, memory, want),
        _room(t.compute_cap - device.compute, compute, want),
    )
    if fit <= 0:
        return 0
    device.memory += fit * memory
    device.compute += fit * compute
    device.load[ci] = device.load.get(ci, 0) + fit
    return fit


def _fill_device(
    instance: _Instance, device: _Device, classes: list[_Class], remaining: dict[int, int]
) -> None:
    t = instance.type
    on_instance = {ci: instance.count_of(ci) for ci in remaining}
    while True:
        free_memory = t.memory_cap - device.memory
        free_compute = t.compute_cap - device.compute
        best, best_score, best_fit = -1, -1.0, 0
        for ci, n in remaining.items():
            room = min(n, classes[ci].count - on_instance[ci])
            if room <= 0:
                continue
            memory, compute = classes[ci].options[t.index]
            fit = min(room, _room(free_memory, memory, room), _room(free_compute, compute, room))
            if fit <= 0:
                continue
            score = (memory / t.memory_cap) * (free_memory / t.memory_cap) + (
                compute / t.compute_cap
            ) * (free_compute / t.compute_cap)
            if score > best_score:
                best, best_score, best_fit = ci, score, fit
        if best < 0:
            return
        # Take a slice of the best class, not all that fits, so the others can still mix in.
        take = max(1, best_fit // 4)
        memory, compute = classes[best].options[t.index]
        device.memory += take * memory
        device.compute += take * compute
        device.load[best] = device.load.get(best, 0) + take
        remaining[best] -= take
        on_instance[best] += take


def _place(instance: _Instance, ci: int, group: _Class, count: int) -> int:
    """Put up to ``count`` replicas of a class on an instance's devices; returns how many."""
    option = group.options.get(instance.type.index)
    if option is None:
        return 0
    t = instance.type
    room = min(count, group.count - instance.count_of(ci))
    placed = 0
    for device in instance.devices:
        if placed == room:
            break
        fit = min(
            room - placed,
            _room(t.memory_cap - device.memory, option[0], room),
            _room(t.compute_cap - device.compute, option[1], room),
        )
        if fit > 0:
            device.memory += fit * option[0]
            device.compute += fit * option[1]
            device.load[ci] = device.load.get(ci, 0) + fit
            placed += fit
    return placed


def _evacuate(
    instances: list[_Instance], classes: list[_Class], deadline: float, clock: _Clock = _WALL
) -> list[_Instance]:
    """Close instances whose replicas all fit in the others' spare room, dearest per unit of
    use first; a move is kept only when the whole instance empties."""

    kept = list(instances)
    for victim in sorted(instances, key=lambda i: _use(i) / i.type.price):
        if clock.now() > deadline:
            break
        others = [i for i in kept if i is not victim]
        snapshot = [[(d.memory, d.compute, dict(d.load)) for d in i.devices] for i in others]
        moved_all = True
        for device in victim.devices:
            for ci, n in device.load.items():
                left = n
                for other in others:
                    left -= _place(other, ci, classes[ci], left)
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
                for device, (memory, compute, load) in zip(other.devices, saved, strict=True):
                    device.memory, device.compute, device.load = memory, compute, load
    return kept


def _room(free: float, each: float, wanted: int) -> int:
    if each <= 0:
        return wanted
    return max(0, math.floor(free / each + _EPS))


def _downsize(
    instances: list[_Instance], types: list[_Type], classes: list[_Class]
) -> list[_Instance]:
    """Move each instance to the cheapest type that holds its devices' contents as they are."""
    counts: dict[int, int] = {}
    for instance in instances:
        counts[instance.type.index] = counts.get(instance.type.index, 0) + 1
    result = []
    for instance in instances:
        used = [d for d in instance.devices if d.load]
        best = instance
        for t in sorted(types, key=lambda t: t.price):
            if t.price >= instance.type.price - _EPS:
                break
            if t.devices < len(used) or (t.quota is not None and counts.get(t.index, 0) >= t.quota):
                continue
            moved = _moved_devices(used, t, classes)
            if moved is not None:
                counts[instance.type.index] -= 1
                counts[t.index] = counts.get(t.index, 0) + 1
                moved += [_Device() for _ in range(t.devices - len(moved))]
                best = _Instance(t, moved)
                break
        result.append(best)
    return result


def _moved_devices(used: list[_Device], t: _Type, classes: list[_Class]) -> list[_Device] | None:
    moved = []
    for device in used:
        memory = compute = 0.0
        for ci, n in device.load.items():
            option = classes[ci].options.get(t.index)
            if option is None:
                return None
            memory += n * option[0]
            compute += n * option[1]
        if memory > t.memory_cap * (1 + _EPS) or compute > t.compute_cap * (1 + _EPS):
            return None
        moved.append(_Device(memory, compute, dict(device.load)))
    return moved


# ------------------------------------------------------------------------- neighbourhood

# Compute demands are fractions of a device; CP-SAT needs integers.
_COMPUTE_SCALE = 10**9
# Instances re-packed at once, and seconds per attempt: small enough that CP-SAT settles a
# neighbourhood well inside the second.
_NEIGHBOURHOOD = (3, 6)
_NEIGHBOURHOOD_SECONDS = 1.0
# Rounds without a gain before the neighbourhoods grow by two instances.
_STALE_ROUNDS = 25
# Unused types offered to each neighbourhood, cheapest first.
_FRESH_TYPES = 4
# Seconds for a neighbourhood of every instance of one processor kind, and the most
# instances it takes.
_GROUP_SECONDS = 3.0
_GROUP_MAX = 30


def _neighbourhood_search(
    types: list[_Type],
    classes: list[_Class],
    instances: list[_Instance],
    deadline: float,
    workers: int,
    lower_bound: Callable[[], float] = lambda: 0.0,
    clock: _Clock = _WALL,
) -> list[_Instance]:
    """Large-neighbourhood search: free the replicas of a few instances (one chosen for its
    spare room and price, the rest at random) and re-pack them exactly on any mix of types;
    keep the result when it is cheaper, until the deadline or the lower bound is reached.
    When small neighbourhoods stop paying, every instance of one processor kind is re-packed
    at once (the CPU instances, say, when only a new mix of CPU sizes saves).
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
            if _cost(current) <= lower_bound() + 1e-6:
                break  # proven optimal
            widen = min(stale // _STALE_ROUNDS, 3)
            seconds = _NEIGHBOURHOOD_SECONDS * (1 + widen)
            if stale and stale % _STALE_ROUNDS == 0:
                picks = _processor_groups(current, parallel, stale // _STALE_ROUNDS)
                seconds = _GROUP_SECONDS
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
                    pool.submit(
                        _repack_instances, types, classes, chosen, outside, limit, forks[-1]
                    )
                )
            removed: set[int] = set()
            added: list[_Instance] = []
            for pick, job in zip(picks, jobs, strict=True):
                better = job.result()
                if better is not None:
                    removed.update(pick)
                    added.extend(better)
            clock.join(forks)
            if removed:
                current = [inst for i, inst in enumerate(current) if i not in removed] + added
                stale = 0
            else:
                stale += 1
    return current


def _pick_neighbourhoods(
    instances: list[_Instance], how_many: int, rng: random.Random, wider: int = 0
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
        weights = [(1.02 - _use(instances[i])) * instances[i].type.price for i in free]
        first = rng.choices(free, weights=weights)[0]
        others = [i for i in free if i != first]
        rng.shuffle(others)
        pick = [first, *others[: size - 1]]
        taken.update(pick)
        picks.append(pick)
    return picks


def _processor_groups(instances: list[_Instance], how_many: int, turn: int) -> list[list[int]]:
    """Every instance of one processor kind per neighbourhood, a different kind each turn."""
    by_processor: dict[str, list[int]] = {}
    for i, instance in enumerate(instances):
        by_processor.setdefault(instance.type.spec.processor, []).append(i)
    # The emptiest of a large kind, so the exact re-pack stays quick.
    groups = [
        sorted(g, key=lambda i: _use(instances[i]))[:_GROUP_MAX]
        for _, g in sorted(by_processor.items())
        if len(g) > 1
    ]
    if not groups:
        return []
    return [groups[(turn + k) % len(groups)] for k in range(min(how_many, len(groups)))]


def _use(instance: _Instance) -> float:
    """Mean over devices of the fuller of memory and compute."""
    t = instance.type
    return (
        sum(max(d.memory / t.memory_cap, d.compute / t.compute_cap) for d in instance.devices)
        / t.devices
    )


def _repack_instances(
    types: list[_Type],
    classes: list[_Class],
    chosen: list[_Instance],
    outside: dict[int, int],
    time_limit_s: float,
    clock: _Clock = _WALL,
) -> list[_Instance] | None:
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
    slots: list[tuple[_Type, int]] = []
    for ti, n in slots_of.items():
        t = by_type[ti]
        room = n + 1 if t.quota is None else min(n + 1, t.quota - outside.get(ti, 0))
        slots.extend((t, j) for j in range(room))

    model, used, z = _slot_model(
        slots, classes, need, lambda t, option: _exact_demand(option), _exact_capacity
    )
    _hint_slots(model, slots, used, z, chosen)

    solver, status = clock.cp_solve(model, max(time_limit_s, 0.01))
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    if solver.objective_value >= sum(_scaled_price(i.type) for i in chosen) - 0.5:
        return None
    found = _read_slots(solver, slots, used, z, classes)
    return [i for i in found if not i.empty]


def _exact_demand(option: tuple[float, float]) -> tuple[int, int]:
    """A replica's memory in bytes and compute in parts per billion, rounded up, so what
    CP-SAT accepts under ``_exact_capacity`` fits exactly."""
    return math.ceil(option[0]), math.ceil(option[1] * _COMPUTE_SCALE)


def _exact_capacity(t: _Type) -> tuple[int, int]:
    return (
        math.floor(t.memory_cap * (1 + _EPS)),
        math.floor(t.compute_cap * (1 + _EPS) * _COMPUTE_SCALE),
    )


# ------------------------------------------------------------------------------- exact


def _solve_devices(
    types: list[_Type],
    classes: list[_Class],
    start: list[_Instance],
    slot_counts: dict[int, int],
    relax: bool,
    time_limit_s: float,
    workers: int,
    clock: _Clock = _WALL,
) -> tuple[list[_Instance], float]:
    """Device-level CP-SAT over ``slot_counts[t]`` candidate instances of each type. With every
    candidate a plan could need (``relax``: demands rounded down, the
    result checked exactly) its bound is a lower bound; otherwise demands round up and it only
    improves ``start``."""
    slots: list[tuple[_Type, int]] = []
    for t in types:
        slots.extend((t, j) for j in range(slot_counts.get(t.index, 0)))
    round_demand = math.floor if relax else math.ceil
    model, used, z = _slot_model(
        slots,
        classes,
        {ci: group.total_replicas for ci, group in enumerate(classes)},
        lambda t, option: (
            round_demand(_SCALE * option[0] / t.memory_cap),
            round_demand(_SCALE * option[1] / t.compute_cap),
        ),
        lambda t: (_SCALE, _SCALE),
    )
    for t in types:
        if t.quota is not None:
            model.add(sum(used[k] for k, (s, _) in enumerate(slots) if s is t) <= t.quota)

    # Warm start: the realised plan.
    _hint_slots(model, slots, used, z, start)

    solver, status = clock.cp_solve(model, max(time_limit_s, 0.05), workers)
    bound = max(0.0, solver.best_objective_bound / _PRICE_SCALE)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return start, bound
    found = _read_slots(solver, slots, used, z, classes)
    # Demands were rounded down to keep the bound valid, so check the capacities exactly.
    overfull = any(
        d.memory > i.type.memory_cap * (1 + _EPS) or d.compute > i.type.compute_cap * (1 + _EPS)
        for i in found
        for d in i.devices
    )
    dearer = _cost(found) > _cost(start) + _EPS
    if overfull or (dearer and not _over_quota(start)):
        return start, bound
    return [i for i in found if not i.empty], bound


def _slot_model(
    slots: list[tuple[_Type, int]],
    classes: list[_Class],
    need: dict[int, int],
    demand: Callable[[_Type, tuple[float, float]], tuple[int, int]],
    capacity: Callable[[_Type], tuple[int, int]],
    place_all: bool = True,
) -> tuple[cp_model.CpModel, list[cp_model.IntVar], dict[tuple[int, int, int], cp_model.IntVar]]:
    """CP-SAT over candidate instances ``slots`` (type, j-th of that type): ``need[c]``
    replicas of each class (at most that, without ``place_all``) on the devices of used
    slots, at the lowest price (a caller may set another objective). Class counts
    stand in for models: at most a class's model count per instance, which the dealing
    honours. ``demand`` and ``capacity`` give a replica's and a device's (memory, compute) as
    integers, rounded as the caller needs. Returns the model, ``used[k]`` and
    ``z[k, device, class]``."""
    model = cp_model.CpModel()
    used = [model.new_bool_var(f"u_{k}") for k in range(len(slots))]
    z: dict[tuple[int, int, int], cp_model.IntVar] = {}
    for k, (t, j) in enumerate(slots):
        if j > 0:
            model.add(used[k] <= used[k - 1])  # identical instances fill in order
        caps = capacity(t)
        for d in range(t.devices):
            terms: tuple[list, list] = ([], [])
            for ci, n in need.items():
                option = classes[ci].options.get(t.index)
                if option is None:
                    continue
                var = model.new_int_var(0, min(n, classes[ci].count), f"z_{k}_{d}_{ci}")
                z[k, d, ci] = var
                for dim, a in enumerate(demand(t, option)):
                    if a:
                        terms[dim].append(a * var)
            for dim in (0, 1):
                if terms[dim]:
                    model.add(sum(terms[dim]) <= caps[dim] * used[k])
        for ci in need:
            on_instance = [z[k, d, ci] for d in range(t.devices) if (k, d, ci) in z]
            if on_instance:
                model.add(sum(on_instance) <= classes[ci].count * used[k])
    for ci, n in need.items():
        placed = sum(v for (_, _, c), v in z.items() if c == ci)
        model.add(placed == n if place_all else placed <= n)
    model.minimize(sum(_scaled_price(t) * used[k] for k, (t, _) in enumerate(slots)))
    return model, used, z


def _hint_slots(
    model: cp_model.CpModel,
    slots: list[tuple[_Type, int]],
    used: list,
    z: dict[tuple[int, int, int], cp_model.IntVar],
    instances: list[_Instance],
) -> None:
    """Hint ``instances`` to a slot model, instance by instance in slot order; an instance
    beyond its type's slots (over a quota) gives no hint."""
    placed: dict[int, _Instance] = {}
    next_slot: dict[int, int] = {}
    for instance in instances:
        j = next_slot.get(instance.type.index, 0)
        next_slot[instance.type.index] = j + 1
        k = next(
            (i for i, (t, jj) in enumerate(slots) if t.index == instance.type.index and jj == j),
            None,
        )
        if k is not None:
            placed[k] = instance
    for k in range(len(slots)):
        model.add_hint(used[k], k in placed)
    for (k, d, ci), var in z.items():
        instance = placed.get(k)
        model.add_hint(var, instance.devices[d].load.get(ci, 0) if instance else 0)


def _read_slots(
    solver: cp_model.CpSolver,
    slots: list[tuple[_Type, int]],
    used: list,
    z: dict[tuple[int, int, int], cp_model.IntVar],
    classes: list[_Class],
) -> list[_Instance]:
    """The used slots of a solved slot model as instances, device loads recomputed."""
    by_slot = {
        k: _Instance(t, [_Device() for _ in range(t.devices)])
        for k, (t, _) in enumerate(slots)
        if solver.value(used[k])
    }
    for (k, d, ci), var in z.items():
        n = solver.value(var)
        if n and k in by_slot:
            _load(by_slot[k].devices[d], ci, n, classes[ci].options[slots[k][0].index])
    return list(by_slot.values())


# --------------------------------------------------------------------------------- plan


def _deal(classes: list[_Class], instances: list[_Instance]) -> dict[tuple[int, int], list[str]]:
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


def _plan(
    problem: Problem,
    classes: list[_Class],
    instances: list[_Instance],
    *,
    cost: float,
    lower_bound: float,
    gap: float,
    status: str,
    seconds: float,
    plan_id: str | None,
) -> Plan:
    instances = sorted(instances, key=lambda i: (-i.type.price, i.type.name))
    dealt = _deal(classes, instances)
    planned_instances = []
    servers = []
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
            servers.append(
                PlannedServer(
                    id=f"{instance_id}-d{d}",
                    instance=instance_id,
                    device=d,
                    processor=instance.type.spec.processor,
                    model_ids=sorted(dealt[i, d]),
                    memory_bytes=round(device.memory),
                    memory_capacity_bytes=round(instance.type.memory_cap),
                    compute_utilization=round(
                        device.compute / instance.type.spec.compute_capacity, 6
                    ),
                )
            )
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
    )
