"""The problem as the solver sees it: instance types with their device capacities, classes of
interchangeable models with a demand per type, and instances of devices that hold replicas.

Host memory is an instance's, shared by its servers; the solver gives each device an equal
share of it (less one server's base), so that every check stays per device. That is exact on
one-device instances and, on larger ones, a restriction (plans stay valid; the validator
checks the instance as a whole). Where no class can fill a type's host memory before its
device memory or compute (every CPU type, whose device memory is the host's), host memory is
not checked at all, so plans change only where RAM binds.

Every fit check, every addition of replicas and the price scale live here, so the stages agree
on what fits and what a plan costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from packing.contracts import InstanceType
from packing.errors import MyriadError

# Demands and capacities become integers on this scale for CP-SAT (parts per million of a
# device); demands round down and capacities up, so the aggregated model stays a relaxation.
SCALE = 1_000_000
# Prices in units of 1e-5 dollars, rounded down for the same reason.
PRICE_SCALE = 100_000
# Compute demands are fractions of a device; the exact CP-SAT models need integers.
COMPUTE_SCALE = 10**9
# Relative tolerance of every capacity check.
EPS = 1e-9


class InfeasibleError(MyriadError, ValueError):
    """No plan meets the limits; the message names the models and the constraint."""


class Demand(NamedTuple):
    """What one replica takes of one device: memory in bytes, compute in device-seconds per
    second, and host memory in bytes."""

    memory: float
    compute: float
    host: float = 0.0


@dataclass(frozen=True)
class Type:
    index: int
    spec: InstanceType
    price: float
    devices: int
    memory_cap: float
    compute_cap: float
    quota: int | None
    # Host memory per device: the instance's share less a server's base (may be negative
    # when a server's base alone overfills it); checked only where ``host_binds``.
    host_cap: float = math.inf
    host_binds: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def memory_limit(self) -> float:
        """The memory a device may hold, with the tolerance of every fit check."""
        return self.memory_cap * (1 + EPS)

    @property
    def compute_limit(self) -> float:
        return self.compute_cap * (1 + EPS)

    @property
    def host_limit(self) -> float:
        return self.host_cap + abs(self.host_cap) * EPS if self.host_binds else math.inf

    def holds(self, demand: Demand) -> bool:
        """Whether one device of this type holds ``demand`` (a replica's, or a device's
        contents)."""
        return (
            demand.memory <= self.memory_limit
            and demand.compute <= self.compute_limit
            and demand.host <= self.host_limit
            and not (self.host_binds and self.host_cap <= 0)
        )

    @property
    def caps(self) -> tuple[float, ...]:
        """A device's capacity in each resource checked on this type: memory and compute, and
        host memory where it binds."""
        if self.host_binds:
            return self.memory_cap, self.compute_cap, self.host_cap
        return self.memory_cap, self.compute_cap

    def checked(self, demand: Demand) -> tuple[float, ...]:
        """``demand`` in the resources checked on this type, in the order of ``caps``."""
        return tuple(demand)[: len(self.caps)]

    def shares(self, demand: Demand) -> tuple[float, ...]:
        """``demand`` as shares of one device, in the order of ``caps``."""
        return tuple(v / c for v, c in zip(self.checked(demand), self.caps, strict=True))

    def free(self, device: Device) -> Demand:
        """What one of this type's devices still has room for, holding ``device``'s contents
        (unlimited host memory where it does not bind)."""
        return Demand(
            self.memory_cap - device.memory,
            self.compute_cap - device.compute,
            self.host_cap - device.host if self.host_binds else math.inf,
        )

    @property
    def scaled_price(self) -> int:
        """The price in units of ``PRICE_SCALE``, rounded down (so bounds stay valid), after
        absorbing binary noise: 0.072 * 1e5 is 7199.999..., which must count as 7200 or a
        proven optimum reads as a gap."""
        return math.floor(self.price * PRICE_SCALE + 1e-6)


@dataclass
class Class:
    model_ids: list[str]
    replicas: int
    # type index -> what one replica takes of a device of that type
    options: dict[int, Demand]

    @property
    def count(self) -> int:
        return len(self.model_ids)

    @property
    def total_replicas(self) -> int:
        return self.count * self.replicas


@dataclass
class Device:
    memory: float = 0.0
    compute: float = 0.0
    # class index -> replicas of it on this device
    load: dict[int, int] = field(default_factory=dict)
    host: float = 0.0

    @property
    def used(self) -> Demand:
        return Demand(self.memory, self.compute, self.host)

    def add(self, ci: int, n: int, demand: Demand) -> None:
        """Put ``n`` replicas of class ``ci``, each taking ``demand``, on this device (no
        check: see ``Instance.place``)."""
        self.memory += n * demand.memory
        self.compute += n * demand.compute
        self.host += n * demand.host
        self.load[ci] = self.load.get(ci, 0) + n

    def copy(self) -> Device:
        return Device(self.memory, self.compute, dict(self.load), self.host)

    def restore(self, saved: Device) -> None:
        self.memory, self.compute, self.host = saved.memory, saved.compute, saved.host
        self.load = dict(saved.load)


@dataclass
class Instance:
    type: Type
    devices: list[Device]

    @classmethod
    def empty_of(cls, t: Type) -> Instance:
        return cls(t, [Device() for _ in range(t.devices)])

    def count_of(self, class_index: int) -> int:
        return sum(d.load.get(class_index, 0) for d in self.devices)

    @property
    def empty(self) -> bool:
        return not any(d.load for d in self.devices)

    @property
    def use(self) -> float:
        """Mean over devices of the fuller of memory and compute."""
        t = self.type
        return sum(max(t.shares(d.used)) for d in self.devices) / t.devices

    def place(self, ci: int, group: Class, count: int, devices: list[Device] | None = None) -> int:
        """Put up to ``count`` replicas of class ``ci`` on this instance's devices (or only
        on ``devices``), each device taking what fits in its spare room, never more of the
        class on the instance than it has models; returns how many went on."""
        demand = group.options.get(self.type.index)
        if demand is None:
            return 0
        t = self.type
        placed = 0
        for device in self.devices if devices is None else devices:
            want = min(count - placed, group.count - self.count_of(ci))
            if want <= 0:
                break
            fit = fits_in(t.free(device), demand, want)
            if fit > 0:
                device.add(ci, fit, demand)
                placed += fit
        return placed


def cost(instances: list[Instance]) -> float:
    return sum(i.type.price for i in instances)


def over_quota(instances: list[Instance]) -> list[str]:
    counts: dict[int, int] = {}
    for instance in instances:
        counts[instance.type.index] = counts.get(instance.type.index, 0) + 1
    by_index = {i.type.index: i.type for i in instances}
    return [
        f"{by_index[ti].name}: {n} instances, quota {by_index[ti].quota}"
        for ti, n in sorted(counts.items())
        if by_index[ti].quota is not None and n > by_index[ti].quota
    ]


def name_models(model_ids: list[str], shown: int = 5) -> str:
    head = ", ".join(model_ids[:shown])
    more = f" and {len(model_ids) - shown} more" if len(model_ids) > shown else ""
    return f"model{'s' if len(model_ids) > 1 else ''} {head}{more}"


def whole_fits(free: float, each: float, wanted: int) -> int:
    """Whole replicas of ``each`` in ``free`` room (``wanted`` when they take none)."""
    if each <= 0 or free == math.inf:
        return wanted
    return max(0, math.floor(free / each + EPS))


def fits_in(free: Demand, demand: Demand, wanted: int) -> int:
    """Whole replicas of ``demand``, up to ``wanted``, in ``free`` room in every resource."""
    return min(
        wanted,
        whole_fits(free.memory, demand.memory, wanted),
        whole_fits(free.compute, demand.compute, wanted),
        whole_fits(free.host, demand.host, wanted),
    )
