"""CP-SAT building blocks: the clock every solve is set up on (wall or deterministic), the
device-level slot model over candidate instances with its hints and read-back, and the exact
integer demands and capacities."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from ortools.linear_solver import pywraplp
from ortools.sat.python import cp_model

from packing.solver.model import COMPUTE_SCALE, Class, Demand, Instance, Type

# Deterministic mode: CP-SAT's seed, and SCIP's branch-and-bound nodes per second of budget
# (about what it processes per second on the 2-core machine, past the root).
SEED = 1
SCIP_NODES_PER_SECOND = 20


class Clock:
    """The seconds the search schedule reads: the wall clock, or in deterministic mode the
    work the solvers did (CP-SAT's deterministic time; SCIP's nodes and Python between solves
    count nothing), so the same problem and budget take the same path. Every CP-SAT and SCIP
    solve is set up here."""

    def __init__(self, deterministic: bool = False, work: float = 0.0) -> None:
        self.deterministic = deterministic
        self.work = work

    def now(self) -> float:
        return self.work if self.deterministic else time.perf_counter()

    def fork(self) -> Clock:
        """A clock for a solve run beside others: its work is joined after they all end."""
        return Clock(self.deterministic, self.work)

    def join(self, forks: list[Clock]) -> None:
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
            solver.parameters.random_seed = SEED
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
            nodes = 1 + round(limit_s * SCIP_NODES_PER_SECOND)
            solver.SetSolverSpecificParametersAsString(f"limits/nodes = {nodes}\n")
        else:
            solver.SetTimeLimit(max(1, int(limit_s * 1000)))


# The wall clock, the default of every stage.
WALL = Clock()


def exact_demand(t: Type, option: Demand) -> tuple[int, int, int]:
    """A replica's memory in bytes, compute in parts per billion and host memory in bytes
    (none where it does not bind on ``t``), rounded up, so what CP-SAT accepts under
    ``exact_capacity`` fits exactly."""
    return (
        math.ceil(option.memory),
        math.ceil(option.compute * COMPUTE_SCALE),
        math.ceil(option.host) if t.host_binds else 0,
    )


def exact_capacity(t: Type) -> tuple[int, int, int]:
    return (
        math.floor(t.memory_limit),
        math.floor(t.compute_limit * COMPUTE_SCALE),
        math.floor(t.host_limit) if t.host_binds else 0,
    )


def slot_model(
    slots: list[tuple[Type, int]],
    classes: list[Class],
    need: dict[int, int],
    demand: Callable[[Type, Demand], tuple[int, ...]],
    capacity: Callable[[Type], tuple[int, ...]],
    place_all: bool = True,
) -> tuple[cp_model.CpModel, list[cp_model.IntVar], dict[tuple[int, int, int], cp_model.IntVar]]:
    """CP-SAT over candidate instances ``slots`` (type, j-th of that type): ``need[c]``
    replicas of each class (at most that, without ``place_all``) on the devices of used
    slots, at the lowest price (a caller may set another objective). Class counts
    stand in for models: at most a class's model count per instance, which the dealing
    honours. ``demand`` and ``capacity`` give a replica's and a device's (memory, compute and
    host memory; a resource no replica takes goes unchecked) as integers, rounded as the
    caller needs. Returns the model, ``used[k]`` and
    ``z[k, device, class]``."""
    model = cp_model.CpModel()
    used = [model.new_bool_var(f"u_{k}") for k in range(len(slots))]
    z: dict[tuple[int, int, int], cp_model.IntVar] = {}
    for k, (t, j) in enumerate(slots):
        if j > 0:
            model.add(used[k] <= used[k - 1])  # identical instances fill in order
        caps = capacity(t)
        for d in range(t.devices):
            terms: list[list] = [[] for _ in caps]
            for ci, n in need.items():
                option = classes[ci].options.get(t.index)
                if option is None:
                    continue
                var = model.new_int_var(0, min(n, classes[ci].count), f"z_{k}_{d}_{ci}")
                z[k, d, ci] = var
                for dim, a in enumerate(demand(t, option)):
                    if a:
                        terms[dim].append(a * var)
            for dim in range(len(caps)):
                if terms[dim]:
                    model.add(sum(terms[dim]) <= caps[dim] * used[k])
        for ci in need:
            on_instance = [z[k, d, ci] for d in range(t.devices) if (k, d, ci) in z]
            if on_instance:
                model.add(sum(on_instance) <= classes[ci].count * used[k])
    for ci, n in need.items():
        placed = sum(v for (_, _, c), v in z.items() if c == ci)
        model.add(placed == n if place_all else placed <= n)
    model.minimize(sum(t.scaled_price * used[k] for k, (t, _) in enumerate(slots)))
    return model, used, z


def hint_slots(
    model: cp_model.CpModel,
    slots: list[tuple[Type, int]],
    used: list,
    z: dict[tuple[int, int, int], cp_model.IntVar],
    instances: list[Instance],
) -> None:
    """Hint ``instances`` to a slot model, instance by instance in slot order; an instance
    beyond its type's slots (over a quota) gives no hint."""
    placed: dict[int, Instance] = {}
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


def read_slots(
    solver: cp_model.CpSolver,
    slots: list[tuple[Type, int]],
    used: list,
    z: dict[tuple[int, int, int], cp_model.IntVar],
    classes: list[Class],
) -> list[Instance]:
    """The used slots of a solved slot model as instances, device loads recomputed."""
    by_slot = {k: Instance.empty_of(t) for k, (t, _) in enumerate(slots) if solver.value(used[k])}
    for (k, d, ci), var in z.items():
        n = solver.value(var)
        if n and k in by_slot:
            by_slot[k].devices[d].add(ci, n, classes[ci].options[slots[k][0].index])
    return list(by_slot.values())
