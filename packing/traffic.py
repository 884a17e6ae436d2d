"""Plan for the traffic that is served: a packing problem whose models carry observed rates
instead of the fleet's guesses, and how far a plan's traffic was from what came."""

from __future__ import annotations

import math
from collections.abc import Mapping

import msgspec

from packing.contracts import Problem
from packing.errors import MyriadError


class TrafficError(MyriadError, ValueError):
    """Observed traffic that cannot be planned for (a bad setting, too short a window)."""


class TrafficSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How observed rates become planned ones: ``headroom`` times the observed rate (the
    observation's high quantile of per-interval rates), never below ``floor_rps`` (a model
    seen idle keeps a place and a little capacity); an observation shorter than
    ``min_window_s`` is refused (a minute of traffic says little about the next hour)."""

    floor_rps: float = 0.01
    headroom: float = 1.2
    min_window_s: float = 60.0

    def __post_init__(self) -> None:
        if self.floor_rps < 0 or self.headroom < 1 or self.min_window_s < 0:
            raise TrafficError(
                f"traffic settings: floor_rps >= 0, headroom >= 1, min_window_s >= 0 "
                f"(got {self.floor_rps}, {self.headroom}, {self.min_window_s})"
            )


def planned_rates(
    observed: Mapping[str, float], model_ids: list[str], settings: TrafficSettings
) -> dict[str, float]:
    return {m: max(settings.floor_rps, settings.headroom * observed.get(m, 0.0)) for m in model_ids}


def with_traffic(
    problem: Problem,
    observed: Mapping[str, float],
    settings: TrafficSettings,
    window_s: float,
) -> Problem:
    """``problem`` with each model's traffic set from ``observed`` (requests/s by model id;
    a model absent from it was seen idle), and replicas added to a model that one replica on
    its most cost-effective device cannot serve within the compute limit."""
    if window_s < settings.min_window_s:
        raise TrafficError(
            f"the observation covers {window_s:.0f} s, less than the {settings.min_window_s:.0f} s "
            "a rebalance needs (observe for longer, or lower min_window_s)"
        )
    rates = planned_rates(observed, [m.id for m in problem.models], settings)
    cap = problem.limits.max_compute_utilization
    models = []
    for model in problem.models:
        rate = round(rates[model.id], 6)
        # A model busier than one replica can serve gets the replicas it needs (never fewer
        # than it had), counted on the device that serves its requests for the least money:
        # counted on the fastest device instead, a hot model could only go there, however dear.
        # Per device it can run on: (price per device-hour, device-seconds per request).
        devices = [
            (t.price(problem.price) / t.devices, profile.seconds_per_request / t.compute_capacity)
            for t in problem.catalog.instance_types
            if (profile := model.profile_for(t)) is not None
        ]
        _, device_seconds = min(devices, key=lambda d: (d[0] * d[1], d[1]))
        needed = math.ceil(rate * device_seconds / cap - 1e-9) if rate > 0 else 1
        replicas = max(model.replicas, needed)
        models.append(msgspec.structs.replace(model, traffic_rps=rate, replicas=replicas))
    return msgspec.structs.replace(problem, models=models)


class Misplanned(msgspec.Struct, kw_only=True):
    model_id: str
    planned_rps: float
    observed_rps: float

    @property
    def ratio(self) -> float:
        """observed / planned (``inf`` for traffic to a model planned for none)."""
        if self.planned_rps <= 0:
            return float("inf") if self.observed_rps > 0 else 1.0
        return self.observed_rps / self.planned_rps


def misplanned(problem: Problem, observed: Mapping[str, float]) -> list[Misplanned]:
    """Every model's planned rate beside its observed one, the most mis-planned first (by the
    larger of observed/planned and planned/observed)."""
    rows = [
        Misplanned(model_id=m.id, planned_rps=m.traffic_rps, observed_rps=observed.get(m.id, 0.0))
        for m in problem.models
    ]

    def distance(row: Misplanned) -> float:
        if row.planned_rps <= 0 or row.observed_rps <= 0:
            return float("inf") if row.planned_rps != row.observed_rps else 0.0
        return max(row.ratio, 1 / row.ratio)

    return sorted(rows, key=lambda r: (-distance(r), r.model_id))
