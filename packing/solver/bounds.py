"""The volume model, a relaxation every plan meets: CP-SAT's aggregated model (integer
replicas per class and type, instances per type) with its greedy warm start, and SCIP's
whole-instance model (fractional replicas, whole instances) for starts and for the bound run
beside the search. Both give a lower bound and a start to realise."""

from __future__ import annotations

import math
import threading

from ortools.linear_solver import pywraplp
from ortools.sat.python import cp_model

from packing.solver.cpsat import WALL, Clock
from packing.solver.model import EPS, PRICE_SCALE, SCALE, Class, InfeasibleError, Type
from packing.solver.prepare import instance_bound, per_instance, quota_message


def greedy_assignment(types: list[Type], classes: list[Class]) -> dict[tuple[int, int], int]:
    """Each class on the type with the lowest price per replica: the warm start."""
    assignment: dict[tuple[int, int], int] = {}
    used: dict[int, int] = {}
    by_type = {t.index: t for t in types}
    for ci, group in sorted(enumerate(classes), key=lambda item: -item[1].total_replicas):
        remaining = group.total_replicas
        ranked = sorted(
            group.options,
            key=lambda ti: by_type[ti].price / max(per_instance(group, by_type[ti]), 1),
        )
        for ti in ranked:
            t = by_type[ti]
            per = per_instance(group, t)
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


def _volume_rows(t: Type, classes: list[Class]) -> list[tuple[dict[int, float], int]]:
    """Rows ``sum(coef * x[c, t]) <= rhs * y[t]`` every plan meets on type ``t``: memory and
    compute volume (in devices, and host memory's where it binds), at most one replica larger
    than half a device per device, and at most one replica of each model per instance where
    volume does not imply it."""
    on_type = [(ci, g) for ci, g in enumerate(classes) if t.index in g.options]
    rows: list[tuple[dict[int, float], int]] = []
    shares = {ci: t.shares(g.options[t.index]) for ci, g in on_type}
    for dim in range(3 if t.host_binds else 2):
        volume = {ci: share[dim] for ci, share in shares.items() if share[dim]}
        if volume:
            rows.append((volume, t.devices))
        big = {ci: 1.0 for ci, share in shares.items() if share[dim] > 0.5 * (1 + EPS)}
        if big:
            rows.append((big, t.devices))
    for ci, group in on_type:
        # Volume alone caps this class at devices / share per instance, no more than its count.
        if not any(group.count * share >= t.devices for share in shares[ci]):
            rows.append(({ci: 1.0}, group.count))
    return rows


def solve_aggregated(
    types: list[Type],
    classes: list[Class],
    hint: dict[tuple[int, int], int],
    time_limit_s: float,
    workers: int,
    clock: Clock = WALL,
) -> tuple[dict[tuple[int, int], int], float]:
    model = cp_model.CpModel()
    x: dict[tuple[int, int], cp_model.IntVar] = {}
    for ci, group in enumerate(classes):
        for ti in group.options:
            x[ci, ti] = model.new_int_var(0, group.total_replicas, f"x_{ci}_{ti}")
        model.add(sum(x[ci, ti] for ti in group.options) == group.total_replicas)
    y = {t.index: model.new_int_var(0, instance_bound(t, classes), f"y_{t.index}") for t in types}
    for t in types:
        if not any(t.index in g.options for g in classes):
            model.add(y[t.index] == 0)
        # Coefficients round down, so the model stays a relaxation.
        for coefs, rhs in _volume_rows(t, classes):
            terms = [(math.floor(SCALE * c), ci) for ci, c in coefs.items()]
            model.add(sum(a * x[ci, t.index] for a, ci in terms if a) <= SCALE * rhs * y[t.index])
    model.minimize(sum(t.scaled_price * y[t.index] for t in types))

    by_type = {t.index: t for t in types}
    for (ci, ti), var in x.items():
        model.add_hint(var, hint.get((ci, ti), 0))
    for t in types:
        hinted = 0
        for ci, group in enumerate(classes):
            count = hint.get((ci, t.index), 0)
            if count:
                per = per_instance(group, by_type[t.index])
                hinted += max(math.ceil(count / per), min(group.replicas, count))
        model.add_hint(y[t.index], hinted)

    solver, status = clock.cp_solve(model, max(time_limit_s, 0.05), workers)
    bound = max(0.0, solver.best_objective_bound / PRICE_SCALE)
    if status == cp_model.INFEASIBLE:
        raise InfeasibleError(quota_message(types, classes))
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return hint, bound
    return {key: solver.value(var) for key, var in x.items() if solver.value(var)}, bound


def _volume_mip(
    types: list[Type], classes: list[Class], slack: float = 0.0
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
    y = {t.index: solver.IntVar(0, instance_bound(t, classes), "") for t in types}
    for t in types:
        for coefs, rhs in _volume_rows(t, classes):
            solver.Add(
                sum(c * x[ci, t.index] for ci, c in coefs.items()) <= rhs * (1 - slack) * y[t.index]
            )
        solver.Objective().SetCoefficient(y[t.index], t.scaled_price / PRICE_SCALE)
    solver.Objective().SetMinimization()
    return solver, x, y


def mip_start(
    types: list[Type],
    classes: list[Class],
    time_limit_s: float,
    slack: float,
    clock: Clock = WALL,
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


class WholeInstanceBound:
    """The volume model with whole instances but fractional replicas, a mixed-integer program
    with one integer per type, solved by SCIP on a thread of its own beside the search. Its
    bound beats the volume model's LP, which CP-SAT rarely lifts: a fractional instance of a
    dear type is most of the gap at fleet scale. Without SCIP it adds nothing. On a
    deterministic clock it runs to its node limit at once, with no thread racing the search."""

    def __init__(
        self,
        types: list[Type],
        classes: list[Class],
        time_limit_s: float,
        clock: Clock = WALL,
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
                units = math.ceil(bound * PRICE_SCALE * (1 - 1e-7) - 1e-6)
                self._bound = max(0.0, units / PRICE_SCALE)

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
