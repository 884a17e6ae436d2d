"""The on-demand tier's arithmetic: what a cold start costs a model, and how often an LRU cache
of a given size misses, by the characteristic-time (Che) approximation.

Under Che, an LRU cache behaves as if every item stayed for a fixed characteristic time ``T``
after its last request: a model requested at rate ``λ`` (Poisson) is in the cache with
probability ``1 - exp(-λT)``, and its requests meet a cold start at rate ``λ exp(-λT)``. ``T``
is set by the cache's size: the models' expected occupancies add up to it. The solver (to choose
the tier) and the validator (to check a plan) both use these functions, so they agree on what a
cache of a given size promises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from packing.contracts import OnDemandLimits, Profile

# Bisection steps on T: far more than the doubling and halving a float allows.
_STEPS = 200


def cold_start_seconds(profile: Profile) -> float | None:
    """What one cold start of the model costs on this profile's processor: the load from the
    server's local cache (an on-demand model's artifacts are verified into it before the server
    is ready), or where only the load from the store was measured, that (it is never faster);
    None when neither was measured."""
    if profile.load_seconds is not None:
        return profile.load_seconds
    return profile.store_load_seconds


def may_be_on_demand(profile: Profile, limits: OnDemandLimits) -> bool:
    """Whether the model may be on demand where this profile applies: its measured cold start
    is within the limit. A model whose load was never measured stays resident: the plan could
    not bound its cold start."""
    seconds = cold_start_seconds(profile)
    return seconds is not None and seconds <= limits.max_cold_start_seconds


def hit_probability(rate: float, characteristic_time: float) -> float:
    """The chance a model with requests at ``rate`` is in the cache (``1 - exp(-λT)``)."""
    if rate <= 0:
        return 0.0
    if math.isinf(characteristic_time):
        return 1.0
    return -math.expm1(-rate * characteristic_time)


def miss_rate(rate: float, characteristic_time: float, load_seconds: float = 0.0) -> float:
    """Requests per second that meet a cold start: the misses (``λ exp(-λT)``), each with the
    requests that arrive while its load is under way and wait for it (``λ·load`` more on
    average; Che takes loads as instant)."""
    if rate <= 0 or math.isinf(characteristic_time):
        return 0.0
    return rate * math.exp(-rate * characteristic_time) * (1 + rate * load_seconds)


def characteristic_time(sizes: Sequence[float], rates: Sequence[float], capacity: float) -> float:
    """The ``T`` at which models of these sizes and request rates fill ``capacity`` bytes on
    expectation; ``inf`` when they all fit. Rounded down (more misses, not fewer), so an
    estimate made with it errs on the side of cold starts."""
    busy = [(s, r) for s, r in zip(sizes, rates, strict=True) if r > 0 and s > 0]
    if sum(s for s, _ in busy) <= capacity:
        return math.inf
    if capacity <= 0:
        return 0.0

    def occupied(t: float) -> float:
        return sum(s * hit_probability(r, t) for s, r in busy)

    low, high = 0.0, 1.0
    while occupied(high) < capacity:
        low, high = high, high * 2
    for _ in range(_STEPS):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if occupied(middle) < capacity:
            low = middle
        else:
            high = middle
    return low


def cold_rate(
    sizes: Sequence[float],
    rates: Sequence[float],
    capacity: float,
    load_seconds: Sequence[float] | None = None,
) -> tuple[float, float]:
    """A cache of ``capacity`` bytes (room to load a model aside) over these models (their
    cold starts taking ``load_seconds``): its characteristic time and the requests per second
    that meet a cold start."""
    t = characteristic_time(sizes, rates, capacity)
    loads = load_seconds if load_seconds is not None else [0.0] * len(rates)
    return t, sum(miss_rate(r, t, s) for r, s in zip(rates, loads, strict=True))
