"""Typed data contracts: fleet, catalog, packing problem and plan (DESIGN.md, "Contracts").

Every contract carries a ``schema_version`` and rejects unknown fields, so a typo in a file is an
error rather than a silently ignored setting. Load and save them with :mod:`packing.io`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Annotated, Literal, get_args

import msgspec
from msgspec import Meta, Struct

SCHEMA_VERSION = 1

MODEL_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
ModelId = Annotated[str, Meta(pattern=MODEL_ID_PATTERN)]
Processor = Literal["cpu", "gpu", "inf"]
ModelTask = Literal["embedding", "sequence-classification"]
PriceKind = Literal["on_demand", "spot"]
# What a model's artifact is traced at (default: fp32 on cpu, fp16 on gpu, bf16 on inf).
Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
# What the cross-model engine serves at; int8 is int8 linear weights with bf16 activations.
EnginePrecision = Literal["fp32", "bf16", "fp16", "int8"]
ENGINE_PRECISIONS: tuple[str, ...] = get_args(EnginePrecision)
SourceUri = Annotated[str, Meta(pattern=r"^(hf:.+|synthetic:[a-z0-9][a-z0-9._-]*)$")]

PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegativeFloat = Annotated[float, Meta(ge=0)]
PositiveInt = Annotated[int, Meta(ge=1)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
Fraction = Annotated[float, Meta(gt=0, le=1)]
SchemaVersion = Annotated[int, Meta(ge=1, le=SCHEMA_VERSION)]


class _Contract(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=False):
    pass


# --------------------------------------------------------------------------------------- fleet


class _ModelTemplate(_Contract, kw_only=True):
    """What a model to serve is, apart from its id: shared by one model and a set of them."""

    source: SourceUri
    task: ModelTask = "sequence-classification"
    max_length: Annotated[int, Meta(ge=8, le=8192)] = 128
    traffic_rps: NonNegativeFloat = 1.0
    replicas: PositiveInt = 1
    num_labels: Annotated[int, Meta(ge=1, le=10_000)] = 2
    # Pins the model to a subset of the fleet's processors; None means all of them.
    processors: list[Processor] | None = None


class ModelSpec(_ModelTemplate, kw_only=True):
    """One model to serve."""

    id: ModelId


class ModelSet(_ModelTemplate, kw_only=True):
    """``count`` look-alike models ``<prefix>0000`` … generated from one template."""

    prefix: Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,40}$")]
    count: Annotated[int, Meta(ge=1, le=1_000_000)]
    start: NonNegativeInt = 0
    digits: Annotated[int, Meta(ge=1, le=9)] = 4

    def expand(self) -> list[ModelSpec]:
        template = {name: getattr(self, name) for name in _ModelTemplate.__struct_fields__}
        return [
            ModelSpec(id=f"{self.prefix}{i:0{self.digits}d}", **template)
            for i in range(self.start, self.start + self.count)
        ]


class Fleet(_Contract, kw_only=True):
    schema_version: SchemaVersion = SCHEMA_VERSION
    name: ModelId
    processors: Annotated[list[Processor], Meta(min_length=1)]
    models: list[ModelSpec] = []
    model_sets: list[ModelSet] = []

    def __post_init__(self) -> None:
        if len(set(self.processors)) != len(self.processors):
            raise ValueError("processors lists a processor twice")
        for i, spec in enumerate(self.models):
            _check_pins(spec.processors, self.processors, f"models[{i}] ({spec.id})")
        for i, model_set in enumerate(self.model_sets):
            _check_pins(model_set.processors, self.processors, f"model_sets[{i}]")
        seen: set[str] = set()
        for spec in self.all_models():
            if spec.id in seen:
                raise ValueError(f"model id {spec.id!r} appears more than once")
            seen.add(spec.id)
            if len(spec.id) > 63:
                raise ValueError(f"generated model id {spec.id!r} is longer than 63 characters")

    def all_models(self) -> list[ModelSpec]:
        """The explicit models followed by every model set, expanded."""
        expanded = list(self.models)
        for model_set in self.model_sets:
            expanded.extend(model_set.expand())
        return expanded

    def processors_for(self, spec: ModelSpec) -> list[Processor]:
        return list(spec.processors) if spec.processors else list(self.processors)


def _check_pins(pins: list[str] | None, allowed: list[str], where: str) -> None:
    if pins is not None:
        stray = sorted(set(pins) - set(allowed))
        if stray:
            raise ValueError(f"{where} pins processors {stray} that the fleet does not trace")


# ------------------------------------------------------------------------------------- catalog


class InstanceType(_Contract, kw_only=True):
    name: Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9.-]*$")]
    family: str
    processor: Processor
    accelerator: str | None = None
    # Accelerator chips; a CPU instance is one device whose memory is the host memory.
    devices: PositiveInt
    cores_per_device: PositiveInt = 1
    device_memory_gib: PositiveFloat
    host_memory_gib: PositiveFloat
    # Host memory one server process takes before it loads a model (interpreter, framework,
    # device runtime); every server on the instance takes it out of host_memory_gib.
    server_host_base_gib: NonNegativeFloat = 0.0
    vcpus: PositiveInt
    on_demand_per_hour: PositiveFloat
    spot_per_hour: PositiveFloat | None = None
    price_source: str

    def price(self, kind: PriceKind) -> float:
        if kind == "spot":
            if self.spot_per_hour is None:
                raise ValueError(f"instance type {self.name} has no spot price in the catalog")
            return self.spot_per_hour
        return self.on_demand_per_hour

    @property
    def device_memory_bytes(self) -> int:
        return int(self.device_memory_gib * 2**30)

    @property
    def host_memory_bytes(self) -> int:
        return int(self.host_memory_gib * 2**30)

    @property
    def server_host_base_bytes(self) -> int:
        return int(self.server_host_base_gib * 2**30)

    @property
    def compute_capacity(self) -> float:
        """Request-seconds per second one device can serve.

        An accelerator chip runs one request at a time: 1.0. A CPU instance is one device whose
        capacity is its physical cores (vCPUs / 2), because CPU profiles are measured with one
        request on one core; 2 vCPUs (a c5.large) give 1.0.
        """
        if self.processor == "cpu":
            return max(1.0, self.vcpus / 2)
        return 1.0


class Catalog(_Contract, kw_only=True):
    schema_version: SchemaVersion = SCHEMA_VERSION
    name: str
    region: str
    currency: Literal["USD"] = "USD"
    prices_as_of: Annotated[str, Meta(pattern=r"^\d{4}-\d{2}-\d{2}$")]
    source: str
    instance_types: Annotated[list[InstanceType], Meta(min_length=1)]

    def __post_init__(self) -> None:
        names = [t.name for t in self.instance_types]
        duplicates = repeated(names)
        if duplicates:
            raise ValueError(f"instance types listed twice: {duplicates}")

    def get(self, name: str) -> InstanceType:
        for instance_type in self.instance_types:
            if instance_type.name == name:
                return instance_type
        raise KeyError(f"instance type {name!r} is not in catalog {self.name!r}")


# ------------------------------------------------------------------------------------- problem


class Profile(_Contract, kw_only=True):
    """What one model costs on one processor, as measured by the profile step."""

    processor: Processor
    memory_bytes: NonNegativeInt
    seconds_per_request: PositiveFloat
    batch_size: PositiveInt = 1
    # Resident host memory the model takes in a server. None: on a CPU it is memory_bytes
    # (the device's memory is the host's); on an accelerator, not measured, so none.
    host_memory_bytes: NonNegativeInt | None = None
    # Profiles measured on a particular instance type apply only there; None means any
    # instance type of the processor.
    instance_types: list[str] | None = None
    # Seconds to load the model into a server from its local cache, and from the store (the
    # cold start an on-demand model costs); None in profiles traced before they were measured.
    load_seconds: NonNegativeFloat | None = None
    store_load_seconds: NonNegativeFloat | None = None

    @property
    def host_bytes(self) -> int:
        if self.host_memory_bytes is not None:
            return self.host_memory_bytes
        return self.memory_bytes if self.processor == "cpu" else 0


class ProblemModel(_Contract, kw_only=True):
    id: ModelId
    traffic_rps: NonNegativeFloat
    replicas: PositiveInt = 1
    profiles: Annotated[list[Profile], Meta(min_length=1)]

    def replica_load(self, profile: Profile) -> float:
        """Device-seconds per second one replica serves: its share of the traffic times the
        profile's seconds per request."""
        return self.traffic_rps * profile.seconds_per_request / self.replicas

    def profile_for(self, instance_type: InstanceType) -> Profile | None:
        """The profile that applies on ``instance_type``: one measured on that very type wins
        over a processor-wide one; None when the model cannot run there."""
        fallback = None
        for profile in self.profiles:
            if profile.processor != instance_type.processor:
                continue
            if profile.instance_types is None:
                fallback = fallback or profile
            elif instance_type.name in profile.instance_types:
                return profile
        return fallback


class OnDemandLimits(_Contract, kw_only=True):
    """The on-demand tier: a server may hold models it loads on their first request and evicts
    under its memory budget. The packer chooses which models are resident and how much memory
    each server keeps for the rest, so that the expected fraction of requests that meet a cold
    start stays within ``max_cold_fraction`` and no cold start takes longer than
    ``max_cold_start_seconds`` (a model whose measured load is slower stays resident)."""

    max_cold_fraction: Annotated[float, Meta(ge=0, le=1)] = 0.01
    max_cold_start_seconds: PositiveFloat = 5.0


class Limits(_Contract, kw_only=True):
    max_memory_fraction: Fraction = 0.9
    max_compute_utilization: Fraction = 0.83
    # Upper bound on the number of instances of a type (account quotas).
    instance_quotas: dict[str, NonNegativeInt] = {}
    # None: every model is resident (plans as before the tier existed).
    on_demand: OnDemandLimits | None = None


class Problem(_Contract, kw_only=True):
    schema_version: SchemaVersion = SCHEMA_VERSION
    name: str
    price: PriceKind = "on_demand"
    limits: Limits = msgspec.field(default_factory=Limits)
    catalog: Catalog
    models: Annotated[list[ProblemModel], Meta(min_length=1)]

    def __post_init__(self) -> None:
        ids = [m.id for m in self.models]
        duplicates = repeated(ids)
        if duplicates:
            raise ValueError(f"models listed twice: {duplicates[:10]}")
        known = {t.name for t in self.catalog.instance_types}
        unknown = sorted(set(self.limits.instance_quotas) - known)
        if unknown:
            raise ValueError(f"limits.instance_quotas names unknown instance types {unknown}")
        for model in self.models:
            for profile in model.profiles:
                stray = sorted(set(profile.instance_types or []) - known)
                if stray:
                    raise ValueError(
                        f"model {model.id}: profile names unknown instance types {stray}"
                    )


# ---------------------------------------------------------------------------------------- plan


class PlannedInstance(_Contract, kw_only=True):
    id: str
    type: str
    processor: Processor
    price_per_hour: NonNegativeFloat


class PlannedServer(_Contract, kw_only=True):
    """One server process: one device of one instance and the models it hosts."""

    id: Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
    instance: str
    device: NonNegativeInt
    processor: Processor
    model_ids: list[ModelId]
    memory_bytes: NonNegativeInt
    memory_capacity_bytes: NonNegativeInt
    compute_utilization: NonNegativeFloat
    # Host memory the server takes: its base and its models' (0 in plans made before).
    host_memory_bytes: NonNegativeInt = 0
    # The on-demand tier (empty and 0 without it): the models of ``model_ids`` loaded on their
    # first request rather than at start, the memory kept for them (part of ``memory_bytes``,
    # on the server's device), and the expected fraction of this server's requests that meet
    # a cold start.
    on_demand_model_ids: list[ModelId] = []
    cache_memory_bytes: NonNegativeInt = 0
    cold_fraction: NonNegativeFloat = 0.0


class SolvePoint(_Contract, kw_only=True):
    """One improvement during the solve: wall seconds since it began, the cheapest plan's cost
    and the best proven bound then (dollars per hour; None before the first)."""

    elapsed_s: NonNegativeFloat
    cost_per_hour: NonNegativeFloat | None = None
    lower_bound_cost_per_hour: NonNegativeFloat | None = None


class Plan(_Contract, kw_only=True):
    schema_version: SchemaVersion = SCHEMA_VERSION
    plan_id: str
    created_at: str
    problem: str
    price: PriceKind = "on_demand"
    instances: list[PlannedInstance]
    servers: list[PlannedServer]
    cost_per_hour: NonNegativeFloat
    lower_bound_cost_per_hour: NonNegativeFloat
    gap: NonNegativeFloat
    solver_status: str
    solve_seconds: NonNegativeFloat
    # How cost and bound improved over the solve (the solve record; empty for older plans).
    solve_trajectory: list[SolvePoint] = []
    # The on-demand tier's promise (0 without it): the expected fraction of all requests that
    # meet a cold start, and the longest cold start (seconds) any on-demand model can take.
    cold_fraction: NonNegativeFloat = 0.0
    cold_start_seconds: NonNegativeFloat = 0.0

    def __post_init__(self) -> None:
        instance_ids = {i.id for i in self.instances}
        server_ids: set[str] = set()
        for server in self.servers:
            if server.instance not in instance_ids:
                raise ValueError(f"server {server.id} names unknown instance {server.instance}")
            if server.id in server_ids:
                raise ValueError(f"server id {server.id} appears more than once")
            server_ids.add(server.id)
            stray = sorted(set(server.on_demand_model_ids) - set(server.model_ids))
            if stray:
                raise ValueError(f"server {server.id}: on-demand models {stray[:5]} not hosted")

    def server(self, server_id: str) -> PlannedServer:
        for server in self.servers:
            if server.id == server_id:
                return server
        raise KeyError(f"plan {self.plan_id} has no server {server_id!r}")

    def servers_for(self, model_id: str) -> list[PlannedServer]:
        return [s for s in self.servers if model_id in s.model_ids]

    def model_ids(self) -> list[str]:
        return sorted({m for s in self.servers for m in s.model_ids})


def repeated(values: Iterable[str]) -> list[str]:
    """The values that occur more than once, sorted (in linear time: a problem or plan can
    name 100,000 models)."""
    return sorted(value for value, count in Counter(values).items() if count > 1)


def is_model_id(value: str) -> bool:
    return re.match(MODEL_ID_PATTERN, value) is not None


CONTRACTS: dict[str, type[msgspec.Struct]] = {
    "fleet": Fleet,
    "catalog": Catalog,
    "problem": Problem,
    "plan": Plan,
}
