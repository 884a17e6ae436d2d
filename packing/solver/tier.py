"""The on-demand tier: which models are resident, which are loaded on their first request, and
how much memory each server keeps for the latter.

The choice is made once for the fleet, before packing, with one characteristic time ``T`` for
every server's cache (the Che approximation of LRU, :mod:`packing.cold`):

1. Models whose cold start is unmeasured or slower than ``max_cold_start_seconds`` stay
   resident, and so do models requested more often than once per load time (they would be
   loading most of the time; uniform traffic at the reference's rates is all such). Every
   miss counts the requests that wait on its load too (``1 + λ·load`` per miss,
   :func:`packing.cold.miss_rate`). The others are ranked by request rate per replica per
   byte, rarest first: for a given ``T`` an on-demand model saves ``size·exp(-λT)`` bytes
   and spends ``traffic·exp(-λT)`` of the cold-request budget, so the rarest per byte save
   the most per cold request (the fractional knapsack's order, the same for every ``T``).
2. For each prefix of that ranking (a coarse grid, then every length near the best), ``T`` is
   the smallest for which the prefix's cold requests stay within ``max_cold_fraction`` of all
   requests; each on-demand model then takes ``size·(1 - exp(-λT))`` on expectation. The
   prefix whose estimated cost (the volume of memory and compute on the instance type that
   serves it cheapest, every device keeping room to load the largest on-demand model) is least
   wins; when no prefix is cheaper than every model resident, the tier is not used at all and
   the problem is solved exactly as without it (uniform traffic: every model resident).
3. The problem the solver packs gives every on-demand model its expected occupancy as memory
   (and host memory) and every device of each instance type its memory less the largest
   on-demand model that runs there (an LRU needs room to load one before it evicts). Its
   bound is a lower bound for that posed problem: this residency and ``T``, every device of a
   type keeping that room.
4. Each server's cache is then its on-demand models' occupancies plus the room to load the
   largest of them; its own characteristic time (at least ``T``: it was sized for ``T``) gives
   its expected cold fraction, and the plan's is the sum of their cold requests over all
   requests (at most the limit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgspec
import numpy as np

from packing.cold import cold_rate, cold_start_seconds, hit_probability, may_be_on_demand
from packing.contracts import InstanceType, OnDemandLimits, PlannedServer, Problem, ProblemModel

# Prefix lengths tried on the first pass, and at most this many more around the best.
_COARSE = 200
_FINE = 200
# A tier that saves less than this share of the estimated cost is not worth its cold starts.
_MIN_SAVING = 1e-3
# The cold-request budget T is chosen for, a hair under the limit so that rounding in the
# servers' own estimates cannot carry the plan past it.
_BUDGET_MARGIN = 1 - 1e-6


@dataclass
class Tier:
    """The tier the solver packs: the on-demand models, the characteristic time, the problem
    with their expected occupancies, and each instance type's room to load one."""

    limits: OnDemandLimits
    characteristic_time: float
    on_demand: frozenset[str]
    problem: Problem
    # Instance type name -> (device bytes, host bytes) kept free on each of its devices.
    reserves: dict[str, tuple[float, float]]

    def reserve(self, spec: InstanceType) -> tuple[float, float]:
        return self.reserves.get(spec.name, (0.0, 0.0))


def choose_tier(problem: Problem) -> Tier | None:
    """The cheapest tier by estimate within the problem's limits; None when every model stays
    resident (so the solve is the one without the tier)."""
    limits = problem.limits.on_demand
    if limits is None:
        return None
    total = sum(m.traffic_rps for m in problem.models)
    budget = limits.max_cold_fraction * total * _BUDGET_MARGIN
    # A model requested more often than it loads would be loading most of the time (and its
    # requests would wait on loads in flight): it stays resident.
    eligible = [
        m
        for m in problem.models
        if _sizes(m, limits) and m.traffic_rps / m.replicas * _load(m, limits) <= 1.0
    ]
    if not eligible:
        return None
    rate = np.array([m.traffic_rps / m.replicas for m in eligible])
    size = np.array([min(_sizes(m, limits)) for m in eligible], dtype=float)
    # Rarest per byte first; a model of no size saves nothing and goes last.
    key = np.where(size > 0, rate / np.maximum(size, 1.0), np.inf)
    order = np.argsort(key, kind="stable")
    ranked = [eligible[i] for i in order]
    rate = rate[order]
    # Cold requests per miss: the one that misses and those that wait on its load.
    traffic = np.array([m.traffic_rps for m in ranked]) * (
        1 + rate * [_load(m, limits) for m in ranked]
    )

    estimate = _Estimate(problem, ranked, limits)
    n = len(ranked)

    def cost_of(k: int) -> tuple[float, float]:
        t = _characteristic_time(rate[:k], traffic[:k], budget)
        return estimate.cost(k, -np.expm1(-rate[:k] * t) if k else rate[:0]), t

    costs: dict[int, tuple[float, float]] = {}
    coarse = sorted({round(i * n / _COARSE) for i in range(_COARSE + 1)})
    for k in coarse:
        costs[k] = cost_of(k)
    best = min(costs, key=lambda k: (costs[k][0], k))
    at = coarse.index(best)
    low, high = coarse[max(at - 1, 0)], coarse[min(at + 1, len(coarse) - 1)]
    step = max(1, (high - low) // _FINE)
    for k in range(low, high + 1, step):
        if k not in costs:
            costs[k] = cost_of(k)
    cheapest = min(costs, key=lambda k: (costs[k][0], k))
    if cheapest == 0 or costs[cheapest][0] >= costs[0][0] * (1 - _MIN_SAVING):
        return None
    # Where another resource binds (compute), more models on demand cost no more by the
    # estimate; of the prefixes within a hair of the cheapest, the longest leaves the packing
    # the most room (its cold starts are within the limit all the same).
    best = max(k for k, (c, _) in costs.items() if c <= costs[cheapest][0] * (1 + _MIN_SAVING))
    t = costs[best][1]
    chosen = ranked[:best]
    on_demand = frozenset(m.id for m in chosen)
    models = [_with_occupancy(m, limits, t) if m.id in on_demand else m for m in problem.models]
    reserves: dict[str, tuple[float, float]] = {}
    for spec in problem.catalog.instance_types:
        device = host = 0.0
        for model in chosen:
            profile = model.profile_for(spec)
            if profile is not None and may_be_on_demand(profile, limits):
                device = max(device, float(profile.memory_bytes))
                host = max(host, float(profile.host_bytes))
        if device or host:
            reserves[spec.name] = (device, host)
    return Tier(
        limits=limits,
        characteristic_time=t,
        on_demand=on_demand,
        problem=msgspec.structs.replace(problem, models=models),
        reserves=reserves,
    )


def _sizes(model: ProblemModel, limits: OnDemandLimits) -> list[int]:
    """The memory of each profile on which ``model`` may be on demand."""
    return [p.memory_bytes for p in model.profiles if may_be_on_demand(p, limits)]


def _load(model: ProblemModel, limits: OnDemandLimits) -> float:
    """The slowest cold start of ``model`` where it may be on demand."""
    return max(cold_start_seconds(p) or 0.0 for p in model.profiles if may_be_on_demand(p, limits))


def _characteristic_time(rate: np.ndarray, traffic: np.ndarray, budget: float) -> float:
    """The smallest ``T`` at which these models' cold requests are within ``budget`` per
    second (rounded up: more memory, not more cold starts); ``inf`` when none suffices."""
    busy = rate > 0
    rate, traffic = rate[busy], traffic[busy]
    if not len(rate) or traffic.sum() <= budget:
        return 0.0
    if budget <= 0:
        return math.inf

    def cold(t: float) -> float:
        return float((traffic * np.exp(-rate * t)).sum())

    low, high = 0.0, 1.0
    while cold(high) > budget:
        low, high = high, high * 2
        if high > 1e15:
            return math.inf
    for _ in range(100):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if cold(middle) > budget:
            low = middle
        else:
            high = middle
    return high


class _Estimate:
    """The cost of a tier by volume: on each instance type that runs every model, the devices
    its memory (less each device's room to load the largest on-demand model) or its compute
    needs, whichever is more, at the type's price per device; the least over types. Where no
    type runs every model, the memory volume in bytes stands in for it (the order is what
    matters)."""

    def __init__(self, problem: Problem, ranked: list[ProblemModel], limits: OnDemandLimits):
        limits_all = problem.limits
        ranked_ids = {m.id: i for i, m in enumerate(ranked)}
        types = [
            t
            for t in problem.catalog.instance_types
            if limits_all.instance_quotas.get(t.name) != 0
            and (problem.price != "spot" or t.spot_per_hour is not None)
        ]
        complete = []
        for spec in types:
            profiles = [m.profile_for(spec) for m in problem.models]
            if all(p is not None for p in profiles):
                complete.append((spec, profiles))
        self._fallback = not complete
        if self._fallback:
            resident = 0.0
            self._sizes = np.zeros((len(ranked), 1))
            self._eligible = np.ones((len(ranked), 1), dtype=bool)
            for model in problem.models:
                sizes = [p.memory_bytes * model.replicas for p in model.profiles]
                if model.id in ranked_ids:
                    self._sizes[ranked_ids[model.id], 0] = min(sizes)
                else:
                    resident += min(sizes)
            self._resident = np.array([resident])
            return
        n, kinds = len(ranked), len(complete)
        self._sizes = np.zeros((n, kinds))
        self._eligible = np.zeros((n, kinds), dtype=bool)
        self._largest = np.zeros((n, kinds))
        self._resident = np.zeros(kinds)
        compute = np.zeros(kinds)
        self._price = np.zeros(kinds)
        self._memory_cap = np.zeros(kinds)
        for j, (spec, profiles) in enumerate(complete):
            for model, profile in zip(problem.models, profiles, strict=True):
                assert profile is not None
                compute[j] += model.traffic_rps * profile.seconds_per_request
                volume = float(profile.memory_bytes) * model.replicas
                i = ranked_ids.get(model.id)
                if i is not None and may_be_on_demand(profile, limits):
                    self._sizes[i, j] = volume
                    self._eligible[i, j] = True
                    self._largest[i, j] = profile.memory_bytes
                else:
                    self._resident[j] += volume
                    if i is not None:
                        self._sizes[i, j] = volume
            self._memory_cap[j] = limits_all.max_memory_fraction * spec.device_memory_bytes
            self._price[j] = spec.price(problem.price) / spec.devices
            compute[j] /= limits_all.max_compute_utilization * spec.compute_capacity
        self._compute_devices = compute
        # The largest on-demand model of each prefix, per type.
        self._prefix_largest = np.maximum.accumulate(self._largest, axis=0)

    def cost(self, k: int, occupancy: np.ndarray) -> float:
        """The estimated cost with the first ``k`` ranked models on demand, each holding
        ``occupancy`` of its size."""
        sizes, eligible = self._sizes, self._eligible
        memory = self._resident + sizes[k:].sum(axis=0)
        if k:
            held = np.where(eligible[:k], occupancy[:, None], 1.0)
            memory = memory + (sizes[:k] * held).sum(axis=0)
        if self._fallback:
            return float(memory[0])
        room = self._memory_cap - (self._prefix_largest[k - 1] if k else 0.0)
        devices = np.where(
            room > 0, np.maximum(memory / np.maximum(room, 1.0), self._compute_devices), np.inf
        )
        return float((devices * self._price).min())


def _with_occupancy(model: ProblemModel, limits: OnDemandLimits, t: float) -> ProblemModel:
    """``model`` as the solver packs it on demand: where its profile allows, its memory (and
    host memory) is what it occupies on expectation, rounded up to a byte."""
    held = hit_probability(model.traffic_rps / model.replicas, t)
    profiles = []
    for profile in model.profiles:
        if may_be_on_demand(profile, limits):
            host = profile.host_memory_bytes
            profile = msgspec.structs.replace(
                profile,
                memory_bytes=math.ceil(profile.memory_bytes * held),
                host_memory_bytes=None if host is None else math.ceil(host * held),
            )
        profiles.append(profile)
    return msgspec.structs.replace(model, profiles=profiles)


@dataclass
class ServerTier:
    """One server's part of the tier, as the plan states it."""

    on_demand_model_ids: list[str]
    resident_memory: float
    cache_memory: float
    host_memory: float
    cold_rps: float
    requests_rps: float
    cold_start_seconds: float


def server_tier(
    tier: Tier, problem: Problem, spec: InstanceType, model_ids: list[str]
) -> ServerTier:
    """A server's on-demand models, resident memory, cache (their expected occupancies at the
    tier's ``T``, plus room to load the largest), host memory beyond its base, and expected cold
    requests per second (by its own cache's characteristic time)."""
    models = {m.id: m for m in problem.models}
    packed = {m.id: m for m in tier.problem.models}
    on_demand: list[str] = []
    resident = host = occupied = host_occupied = largest = largest_host = requests = 0.0
    sizes: list[float] = []
    rates: list[float] = []
    loads: list[float] = []
    slowest = 0.0
    for model_id in model_ids:
        model = models[model_id]
        profile = model.profile_for(spec)
        assert profile is not None
        rate = model.traffic_rps / model.replicas
        requests += rate
        if model_id in tier.on_demand and may_be_on_demand(profile, tier.limits):
            expected = packed[model_id].profile_for(spec)
            assert expected is not None
            on_demand.append(model_id)
            occupied += expected.memory_bytes
            host_occupied += expected.host_bytes
            largest = max(largest, float(profile.memory_bytes))
            largest_host = max(largest_host, float(profile.host_bytes))
            sizes.append(float(profile.memory_bytes))
            rates.append(rate)
            loads.append(cold_start_seconds(profile) or 0.0)
            slowest = max(slowest, loads[-1])
        else:
            resident += profile.memory_bytes
            host += profile.host_bytes
    cache = float(math.ceil(occupied + largest)) if on_demand else 0.0
    _, cold = cold_rate(sizes, rates, cache - largest, loads)
    return ServerTier(
        on_demand_model_ids=on_demand,
        resident_memory=resident,
        cache_memory=cache,
        host_memory=host + (math.ceil(host_occupied + largest_host) if on_demand else 0.0),
        cold_rps=cold,
        requests_rps=requests,
        cold_start_seconds=slowest,
    )


def with_tier(server: PlannedServer, part: ServerTier, host_base: float) -> PlannedServer:
    """``server`` with its part of the tier: memory is resident models' and the cache's."""
    if not part.on_demand_model_ids:
        return server
    return msgspec.structs.replace(
        server,
        on_demand_model_ids=sorted(part.on_demand_model_ids),
        cache_memory_bytes=round(part.cache_memory),
        memory_bytes=round(part.resident_memory + part.cache_memory),
        host_memory_bytes=round(host_base + part.host_memory),
        cold_fraction=round(part.cold_rps / part.requests_rps, 9) if part.requests_rps else 0.0,
    )
