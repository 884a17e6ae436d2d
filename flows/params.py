"""Flow parameters that validate when a run starts: Prefect checks the ``Literal`` types against
each run's parameters (a bad runtime or precision is refused before any task runs), and the
documents named by URI are read and validated first thing in the flow."""

from __future__ import annotations

from typing import Literal

from packing.contracts import Catalog, EnginePrecision, Fleet, OnDemandLimits, Precision
from packing.errors import MyriadError
from tasks.documents import read_document

Runtime = Literal["local", "docker", "kubernetes"]
LoadMode = Literal["sequential", "random", "closed", "sweep", "rate"]

# The flows' parameter types, with the precisions defined once in packing.contracts.
__all__ = [
    "EnginePrecision",
    "LoadMode",
    "Precision",
    "Runtime",
    "check_catalog",
    "check_fleet",
    "check_positive",
    "on_demand_limits",
    "trace_settings",
]


def check_fleet(uri: str) -> Fleet:
    """The fleet at ``uri``; a missing file or a bad field fails the run with its message."""
    return read_document(uri, Fleet)


def check_catalog(uri: str) -> Catalog:
    return read_document(uri, Catalog)


def check_positive(**values: float | None) -> None:
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be above 0, got {value}")


def trace_settings(precision: str | None, minimal_profile: bool = False) -> dict | None:
    """``TraceSettings`` fields for a precision; ``minimal_profile``: batch 1, one repeat (for
    big synthetic fleets, where the profile of one look-alike stands for all)."""
    settings: dict = {}
    if precision:
        settings["precision"] = precision
    if minimal_profile:
        settings["profile_batch_sizes"] = [1]
        settings["profile_repeats"] = 1
    return settings or None


def on_demand_limits(
    on_demand: bool, max_cold_fraction: float = 0.01, max_cold_start_seconds: float = 5.0
) -> OnDemandLimits | None:
    """The on-demand tier's limits when ``on_demand`` turns it on (None: every model
    resident); a bad limit fails with its name."""
    if not on_demand:
        return None
    if not 0 <= max_cold_fraction <= 1:
        raise MyriadError(f"max_cold_fraction must be within 0 and 1, got {max_cold_fraction}")
    if not max_cold_start_seconds > 0:
        raise MyriadError(
            f"max_cold_start_seconds must be above 0, got {max_cold_start_seconds}"
        )
    return OnDemandLimits(
        max_cold_fraction=max_cold_fraction, max_cold_start_seconds=max_cold_start_seconds
    )
