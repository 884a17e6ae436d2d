"""The on-demand tier of a model server: models whose artifacts sit verified in the server's
local cache and are loaded on their first request, then evicted when a memory budget would be
passed. Both backends use this one ledger (:class:`OnDemandTier`); a backend only says how to
load one model (returning the bytes it now holds) and how to drop it.

The rules, in one place:

- Before a load, models are evicted until the bytes loaded (resident models included) plus the
  model's expected bytes (what it measured last time, else its artifact's largest file) fit the
  budget; the reservation is taken under the lock, so concurrent loads cannot both claim the
  same room. The process's model memory thus stays within the budget plus the error of one
  estimate (at most one model).
- Resident models are never evicted, nor is a model with work in flight: every request holds
  its model (:meth:`OnDemandTier.acquire` … :meth:`OnDemandTier.release`) from admission until
  its answers are settled, which covers its queue and its batch.
- A request for a model being loaded waits for that load (within its deadline); loads run on a
  bounded pool (``max_concurrent_loads``). A failed load is answered with its reason
  (:class:`ColdLoadFailed`) and forgotten, so the next request tries again.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from serving.errors import DeadlineExceeded, ModelNotReady, Overloaded

# A model's demand halves after this long without a request (see :class:`Demand`).
HALF_LIFE_S = 60.0


class ColdLoadFailed(ModelNotReady):
    """An on-demand model could not be loaded for this request (a damaged artifact, a model
    larger than the budget); the server keeps serving the others, and the next request for it
    tries the load again."""

    title = "Model load failed"

    def __init__(self, model_id: str, reason: str) -> None:
        super().__init__(model_id, "failed", reason)
        self.reason = reason


class Demand:
    """Each model's demand as a request rate with exponential decay: every request adds one,
    and the sum halves every ``half_life_s`` seconds without one.

    The eviction rule for both backends (and the cross-model engine's slots): evict the loaded
    model with the least decayed demand. It is least-recently-used weighted by observed demand:
    a model seen once long ago scores near 0 and goes first (plain LRU would agree), while a
    model that took many requests keeps a high score through a short gap in which a burst of
    one-off requests touched other models (where plain LRU would evict the busy model and pay
    to reload it a moment later). The half-life sets how long a busy model's history counts; a
    minute is long next to a cold load (seconds) and short next to how traffic shifts."""

    def __init__(self, half_life_s: float = HALF_LIFE_S) -> None:
        self.half_life_s = half_life_s
        self.rate: dict[str, float] = {}
        self.seen_at: dict[str, float] = {}

    def touch(self, model_id: str, now: float, weight: float = 1.0) -> None:
        self.rate[model_id] = self.score(model_id, now) + weight
        self.seen_at[model_id] = now

    def score(self, model_id: str, now: float) -> float:
        last = self.seen_at.get(model_id)
        if last is None:
            return 0.0
        return self.rate[model_id] * 0.5 ** ((now - last) / self.half_life_s)

    def forget(self, model_id: str) -> None:
        self.rate.pop(model_id, None)
        self.seen_at.pop(model_id, None)


@dataclass
class OnDemandSettings:
    """Which models of a server are on demand and the budgets they are loaded under.

    ``memory_budget_bytes``: the device's memory (host memory on a CPU server);
    ``host_memory_budget_bytes``: the cross-model engine's host tier (on a CPU server, the same
    memory as the device's: the smaller budget applies). None: no limit."""

    model_ids: frozenset[str] = frozenset()
    memory_budget_bytes: int | None = None
    host_memory_budget_bytes: int | None = None
    max_concurrent_loads: int = 2
    # How long a request may wait for its model's load (the server's request deadline).
    load_wait_s: float = 30.0
    half_life_s: float = HALF_LIFE_S


@dataclass
class _Entry:
    model_id: str
    on_demand: bool
    expected_bytes: int = 0
    bytes: int = 0  # held now (0 when not loaded)
    reserved: int = 0  # taken for a load in progress
    loaded: bool = False
    verified: bool = False
    in_flight: int = 0
    loading: Future | None = None
    reason: str | None = None
    loads: int = 0
    # Requests waiting for the load in progress, and those it has handed a hold to.
    waiters: set = field(default_factory=set)
    granted: set = field(default_factory=set)


class OnDemandTier:
    """The ledger of one repository: bytes loaded against a budget, work in flight per model,
    demand, and the loads of on-demand models (on a pool of ``max_concurrent_loads``).

    ``load(model_id)`` loads one model and returns the bytes it holds (raising with the reason
    when it cannot); ``unload(model_id)`` drops it. ``listener``, when set, hears
    ``model_loaded(model_id, seconds)`` and ``model_evicted(model_id)``."""

    def __init__(
        self,
        model_ids: Iterable[str],
        settings: OnDemandSettings,
        budget_bytes: int | None,
        load: Callable[[str], int],
        unload: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.budget_bytes = budget_bytes
        self._load_fn = load
        self._unload_fn = unload
        self.entries = {m: _Entry(m, m in settings.model_ids) for m in model_ids}
        self.loaded_bytes = 0
        self.peak_loaded_bytes = 0
        self.demand = Demand(settings.half_life_s)
        self.listener: Any = None
        self.loads = 0
        self.evictions = 0
        self._cond = threading.Condition()
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, settings.max_concurrent_loads), thread_name_prefix="on-demand"
        )
        # On-demand loads start once the resident models are in, so the ledger knows their bytes.
        self._residents_in = threading.Event()

    # ------------------------------------------------------------------ start

    def manages(self, model_id: str) -> bool:
        entry = self.entries.get(model_id)
        return entry is not None and entry.on_demand

    def on_demand_ids(self) -> list[str]:
        return [m for m, e in self.entries.items() if e.on_demand]

    def resident_loaded(self, model_id: str, memory_bytes: int) -> None:
        with self._cond:
            entry = self.entries[model_id]
            self.loaded_bytes += memory_bytes - entry.bytes
            entry.bytes = memory_bytes
            entry.loaded = True
            self._peak()

    def verified(self, model_id: str, expected_bytes: int, reason: str | None = None) -> None:
        """An on-demand model's artifact checked into the cache (or not, with ``reason``)."""
        with self._cond:
            entry = self.entries[model_id]
            entry.verified = reason is None
            entry.reason = reason
            if not entry.expected_bytes:
                entry.expected_bytes = expected_bytes

    def residents_in(self) -> None:
        self._residents_in.set()

    @property
    def ready(self) -> bool:
        """Every on-demand model's artifact verified in the cache."""
        return all(e.verified for e in self.entries.values() if e.on_demand)

    def unverified(self) -> list[str]:
        return [m for m, e in self.entries.items() if e.on_demand and not e.verified]

    # ------------------------------------------------------------------ requests

    async def acquire(self, model_id: str, wait_s: float | None = None) -> bool:
        """Hold ``model_id`` for one request, loading it first if it is not loaded; returns
        whether this request met a cold start (waited for a load). Raises
        :class:`ColdLoadFailed` with the load's reason, or :class:`DeadlineExceeded`."""
        wait_s = self.settings.load_wait_s if wait_s is None else wait_s
        deadline = time.monotonic() + wait_s
        token = object()
        cold = False
        while True:
            with self._cond:
                entry = self.entries[model_id]
                if entry.loaded:
                    entry.in_flight += 1
                    self.demand.touch(model_id, time.monotonic())
                    return cold
                if entry.loading is None:
                    entry.loading = self._pool.submit(self._load, entry)
                future = entry.loading
                # A load holds the model for each request that waited for it, so none of them
                # finds it evicted by the next load before it ran (which could go on forever).
                entry.waiters.add(token)
            cold = True
            try:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                # shield: a request that gives up must not cancel the load others wait for.
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), remaining)
            except TimeoutError:
                self._leave(entry, token)
                raise DeadlineExceeded(
                    f"model {model_id!r} was still loading after {wait_s:.1f} s"
                ) from None
            except ColdLoadFailed as exc:
                self._leave(entry, token)
                raise ColdLoadFailed(model_id, exc.reason) from None
            except BaseException:
                self._leave(entry, token)
                raise
            with self._cond:
                if token in entry.granted:
                    entry.granted.discard(token)
                    self.demand.touch(model_id, time.monotonic())
                    return cold
                entry.waiters.discard(token)

    def _leave(self, entry: _Entry, token: object) -> None:
        """A waiting request gives up: its place among the waiters, or the hold its load gave."""
        with self._cond:
            entry.waiters.discard(token)
            if token in entry.granted:
                entry.granted.discard(token)
                entry.in_flight -= 1
                self._cond.notify_all()

    def hold(self, model_id: str) -> None:
        """Hold a loaded model for work not admitted by :meth:`acquire` (tests, scripts)."""
        with self._cond:
            entry = self.entries[model_id]
            if not entry.loaded:
                raise ModelNotReady(model_id, "unloaded", "on demand and not loaded")
            entry.in_flight += 1

    def release(self, model_id: str) -> None:
        with self._cond:
            self.entries[model_id].in_flight -= 1
            self._cond.notify_all()

    def preload(self, model_id: str) -> Future:
        """Start loading ``model_id`` (the management API's load); its future settles when done."""
        with self._cond:
            entry = self.entries[model_id]
            if entry.loaded:
                done: Future = Future()
                done.set_result(None)
                return done
            if entry.loading is None:
                entry.loading = self._pool.submit(self._load, entry)
            return entry.loading

    def evict(self, model_id: str) -> bool:
        """Drop one on-demand model now (the management API's unload); False when it is not
        loaded or has work in flight."""
        with self._cond:
            entry = self.entries[model_id]
            if not entry.on_demand or not entry.loaded or entry.in_flight:
                return False
            self._drop(entry)
        if self.listener is not None:
            self.listener.model_evicted(model_id)
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ loading

    def _load(self, entry: _Entry) -> None:
        started = time.perf_counter()
        try:
            self._residents_in.wait(self.settings.load_wait_s)
            self._make_room(entry)
            try:
                measured = self._load_fn(entry.model_id)
            except Exception as exc:  # noqa: BLE001 - the waiting requests get the reason
                with self._cond:
                    self.loaded_bytes -= entry.reserved
                    entry.reserved = 0
                    entry.reason = _reason(exc)
                raise ColdLoadFailed(entry.model_id, entry.reason) from exc
            seconds = time.perf_counter() - started
            with self._cond:
                self.loaded_bytes += measured - entry.reserved
                entry.reserved = 0
                entry.bytes = entry.expected_bytes = measured
                entry.loaded = entry.verified = True
                entry.reason = None
                entry.loads += 1
                entry.in_flight += len(entry.waiters)
                entry.granted |= entry.waiters
                entry.waiters = set()
                self.loads += 1
                self._peak()
            if self.listener is not None:
                self.listener.model_loaded(entry.model_id, seconds)
        finally:
            with self._cond:
                entry.loading = None
                self._cond.notify_all()

    def _make_room(self, entry: _Entry) -> None:
        """Evict (least demand first, never resident, loading or in-flight models) until the
        model's expected bytes fit, and reserve them; wait for work in flight to finish while
        nothing can go, up to the load's wait."""
        needed = entry.expected_bytes
        budget = self.budget_bytes
        evicted: list[str] = []
        with self._cond:
            if budget is not None:
                fixed = sum(e.bytes for e in self.entries.values() if not e.on_demand)
                if needed > budget - fixed:
                    raise ColdLoadFailed(
                        entry.model_id,
                        f"it needs {needed} bytes and the memory budget leaves {budget - fixed} "
                        f"beside the resident models ({budget} in all)",
                    )
                give_up = time.monotonic() + self.settings.load_wait_s
                while self.loaded_bytes + needed > budget:
                    victim = self._victim()
                    if victim is None:
                        left = give_up - time.monotonic()
                        if left <= 0:
                            raise Overloaded(
                                f"model {entry.model_id} waits for memory: the budget of "
                                f"{budget} bytes is held by models in use"
                            )
                        self._cond.wait(min(left, 0.05))
                        continue
                    self._drop(victim)
                    evicted.append(victim.model_id)
            entry.reserved = needed
            self.loaded_bytes += needed
            self._peak()
        if self.listener is not None:
            for model_id in evicted:
                self.listener.model_evicted(model_id)

    def _victim(self) -> _Entry | None:
        now = time.monotonic()
        candidates = [
            e
            for e in self.entries.values()
            if e.on_demand and e.loaded and not e.in_flight and e.loading is None
        ]
        if not candidates:
            return None
        return min(candidates, key=lambda e: self.demand.score(e.model_id, now))

    def _drop(self, entry: _Entry) -> None:
        """Unload under the lock: no request can start a load of it meanwhile."""
        self._unload_fn(entry.model_id)
        self.loaded_bytes -= entry.bytes
        entry.bytes = 0
        entry.loaded = False
        self.evictions += 1

    def _peak(self) -> None:
        self.peak_loaded_bytes = max(self.peak_loaded_bytes, self.loaded_bytes)

    def describe(self) -> dict[str, Any]:
        with self._cond:
            return {
                "budget_bytes": self.budget_bytes,
                "loaded_bytes": self.loaded_bytes,
                "peak_loaded_bytes": self.peak_loaded_bytes,
                "loads": self.loads,
                "evictions": self.evictions,
                "on_demand": len(self.on_demand_ids()),
                "loaded_on_demand": sum(
                    1 for e in self.entries.values() if e.on_demand and e.loaded
                ),
            }


def expected_bytes(manifest: Any) -> int:
    """What a model is expected to hold once loaded, before it has been measured: its
    artifact's largest file (the weights: model.ts or weights.safetensors)."""
    return max((entry.size for entry in manifest.files.values()), default=0)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ColdLoadFailed):
        return exc.reason
    return f"{type(exc).__name__}: {exc}"


def parse_bytes(text: str) -> int:
    """``512MiB``, ``2GB``, ``1.5G``, ``1000000`` → bytes (K/M/G/T: powers of 1000; KiB/MiB/
    GiB/TiB: powers of 1024)."""
    units = {
        "": 1,
        "b": 1,
        "k": 10**3,
        "kb": 10**3,
        "m": 10**6,
        "mb": 10**6,
        "g": 10**9,
        "gb": 10**9,
        "t": 10**12,
        "tb": 10**12,
        "ki": 2**10,
        "kib": 2**10,
        "mi": 2**20,
        "mib": 2**20,
        "gi": 2**30,
        "gib": 2**30,
        "ti": 2**40,
        "tib": 2**40,
    }
    stripped = text.strip().lower().replace("_", "")
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = stripped[len(number) :].strip()
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (examples: 512MiB, 2GB, 1000000)") from None
    if unit not in units or not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r} is not a size (examples: 512MiB, 2GB, 1000000)")
    return int(value * units[unit])
