"""The load generator: asynchronous HTTP with keep-alive, HDR histograms, several processes.

Modes:

- ``sequential``: every model once, in order, one request at a time (best-case latency).
- ``random``: single requests, one at a time, to models drawn by the traffic shape.
- ``closed``: ``concurrency`` clients, each sending when its last answer arrives.
- ``sweep``: closed loop at rising concurrency until errors or the latency target break.
- ``rate``: open loop, Poisson arrivals at a fixed rate. Latency runs from each request's
  *scheduled* start, so a stalled server shows in the figures instead of slowing the
  generator down (no coordinated omission).

Every run is bounded by time and request count, records latencies in HDR histograms (merged
across processes), breaks errors down by cause, and checks itself: when the generator, not
the server, was the bottleneck (scheduling lag, a busy core) the result says ``saturated``.
Answers that met a cold start (the server loaded the model for them and says so in the
``x-myriad-cold-start`` header) are counted apart, with warm and cold histograms of their own.
No Prefect here: the tasks and flows wrap it.
"""

from __future__ import annotations

import asyncio
import bisect
import multiprocessing
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import msgspec
from hdrh.histogram import HdrHistogram

from serving.routing.client import met_cold_start

# Latencies in microseconds, 1 µs to 10 min, three significant digits (0.1% precision).
_LOWEST_US, _HIGHEST_US, _DIGITS = 1, 600_000_000, 3
# Per-model histograms are coarser: thousands of models must stay within a few MB.
_MODEL_DIGITS = 2
# Self-check thresholds: a generator whose event loop runs late by more than this at the
# 99th percentile, or whose process keeps a core this busy, measured itself, not the server.
SATURATION_LAG_S = 0.010
SATURATION_CPU = 0.90

WORDS = (
    "the service was quick and staff were friendly my order arrived late box damaged could "
    "you tell me how to reset password this is best purchase have made all year meeting moved "
    "thursday three weather forecast says rain tomorrow afternoon please send invoice again"
).split()


def new_histogram(digits: int = _DIGITS) -> HdrHistogram:
    return HdrHistogram(_LOWEST_US, _HIGHEST_US, digits)


def text_of(tokens: int, rng: random.Random) -> str:
    """A sentence of about ``tokens`` word-piece tokens (one common English word each)."""
    return " ".join(rng.choice(WORDS) for _ in range(max(1, tokens)))


class Shape(msgspec.Struct, kw_only=True, frozen=True):
    """Which models requests go to and what they carry."""

    zipf: float = 0.0  # 0: uniform over models; > 0: Zipf-skewed with this exponent
    tokens: int = 16
    seed: int = 0
    # Requests in proportion to these weights (e.g. each model's planned requests/s), in place
    # of ``zipf``: the traffic a plan was made for, long tail included.
    weights: dict[str, float] | None = None


class Targets(msgspec.Struct, kw_only=True, frozen=True):
    """Model ids and, for each, the prediction URLs of its replicas (from the plan)."""

    routes: dict[str, list[str]]


class Bounds(msgspec.Struct, kw_only=True, frozen=True):
    duration_s: float = 10.0
    max_requests: int | None = None
    timeout_s: float = 30.0


@dataclass
class Recorder:
    """Latencies and errors of one run (or of several, merged)."""

    histogram: HdrHistogram = field(default_factory=new_histogram)
    # Every answered request is in ``histogram`` and in one of these: cold (it met a load of
    # its model) or warm.
    warm: HdrHistogram = field(default_factory=new_histogram)
    cold: HdrHistogram = field(default_factory=new_histogram)
    cold_per_model: Counter = field(default_factory=Counter)
    per_model: dict[str, HdrHistogram] = field(default_factory=dict)
    per_server: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    lag: HdrHistogram = field(default_factory=new_histogram)
    duration_s: float = 0.0
    cpu_s: float = 0.0
    processes: int = 1

    def record(self, model_id: str, server: str, seconds: float, cold: bool = False) -> None:
        micros = max(_LOWEST_US, min(int(seconds * 1e6), _HIGHEST_US))
        self.histogram.record_value(micros)
        if cold:
            self.cold.record_value(micros)
            self.cold_per_model[model_id] += 1
        else:
            self.warm.record_value(micros)
        model = self.per_model.get(model_id)
        if model is None:
            model = self.per_model[model_id] = new_histogram(_MODEL_DIGITS)
        model.record_value(micros)
        self.per_server[server] += 1

    def late(self, seconds: float) -> None:
        self.lag.record_value(max(_LOWEST_US, min(int(seconds * 1e6), _HIGHEST_US)))

    # ----------------------------------------------------------------- merge across processes

    def encode(self) -> dict:
        return {
            "histogram": _b64(self.histogram),
            "warm": _b64(self.warm),
            "cold": _b64(self.cold),
            "cold_per_model": dict(self.cold_per_model),
            "per_model": {m: _b64(h) for m, h in self.per_model.items()},
            "per_server": dict(self.per_server),
            "errors": dict(self.errors),
            "lag": _b64(self.lag),
            "duration_s": self.duration_s,
            "cpu_s": self.cpu_s,
        }

    def merge(self, encoded: dict) -> None:
        self.histogram.decode_and_add(encoded["histogram"])
        self.warm.decode_and_add(encoded["warm"])
        self.cold.decode_and_add(encoded["cold"])
        self.cold_per_model.update(encoded["cold_per_model"])
        for model_id, blob in encoded["per_model"].items():
            model = self.per_model.get(model_id)
            if model is None:
                model = self.per_model[model_id] = new_histogram(_MODEL_DIGITS)
            model.decode_and_add(blob)
        self.per_server.update(encoded["per_server"])
        self.errors.update(encoded["errors"])
        self.lag.decode_and_add(encoded["lag"])
        self.duration_s = max(self.duration_s, encoded["duration_s"])
        self.cpu_s += encoded["cpu_s"]

    # --------------------------------------------------------------------------- figures

    @property
    def completed(self) -> int:
        return self.histogram.get_total_count()

    @property
    def cold_requests(self) -> int:
        return self.cold.get_total_count()

    def cold_figures(self) -> dict:
        """Answers that met a cold start apart from the rest: their count, their fraction of
        the answered requests, and P50/P90/P99 (ms) of the warm and of the cold ones (a side
        with no answer has no percentiles)."""
        cold = self.cold_requests
        figures: dict = {
            "cold_requests": cold,
            "warm_requests": self.completed - cold,
            "cold_fraction": cold / self.completed if self.completed else 0.0,
        }
        for side, h in (("warm", self.warm), ("cold", self.cold)):
            if h.get_total_count():
                for p in (50, 90, 99):
                    figures[f"{side}_p{p}_ms"] = h.get_value_at_percentile(p) / 1000
                figures[f"{side}_max_ms"] = h.get_max_value() / 1000
        return figures

    def saturation(self) -> dict:
        lag_p99 = self.lag.get_value_at_percentile(99) / 1e6 if self.lag.get_total_count() else 0
        busy = self.cpu_s / (self.duration_s * self.processes) if self.duration_s else 0.0
        reasons = []
        if lag_p99 > SATURATION_LAG_S:
            reasons.append(f"scheduling lag p99 {lag_p99 * 1000:.1f} ms")
        if busy > SATURATION_CPU:
            reasons.append(f"generator processes {busy:.0%} busy")
        return {
            "saturated": bool(reasons),
            "reasons": reasons,
            "lag_p99_ms": lag_p99 * 1000,
            "generator_cpu": busy,
        }

    def summary(self, mode: str, **extra: object) -> dict:
        completed = self.completed
        errors = sum(self.errors.values())
        total = completed + errors
        h = self.histogram
        latency = (
            {
                "min_ms": h.get_min_value() / 1000,
                **{f"p{p}_ms": h.get_value_at_percentile(p) / 1000 for p in (50, 90, 95, 99)},
                "max_ms": h.get_max_value() / 1000,
                "mean_ms": h.get_mean_value() / 1000,
            }
            if completed
            else {}
        )
        return {
            "mode": mode,
            **extra,
            "duration_s": round(self.duration_s, 3),
            "requests": total,
            "completed": completed,
            "errors": dict(self.errors),
            "error_rate": errors / total if total else 0.0,
            "requests_per_s": completed / self.duration_s if self.duration_s else 0.0,
            **latency,
            **self.cold_figures(),
            "generator": self.saturation(),
        }

    def per_model_ms(self) -> dict[str, dict]:
        """Per model: answers, min, P50, P90 and max (ms), and, once any answer met a cold
        start, how many of the model's did."""
        counted = bool(self.cold_per_model)
        return {
            m: {
                "count": h.get_total_count(),
                "min_ms": h.get_min_value() / 1000,
                "p50_ms": h.get_value_at_percentile(50) / 1000,
                "p90_ms": h.get_value_at_percentile(90) / 1000,
                "max_ms": h.get_max_value() / 1000,
                **({"cold": self.cold_per_model.get(m, 0)} if counted else {}),
            }
            for m, h in self.per_model.items()
        }

    def cdf_ms(self, points: int = 200, side: str = "all") -> list[tuple[float, float]]:
        """(latency ms, fraction of requests at or below it) for plotting: of every answered
        request, or of the ``warm`` or the ``cold`` ones."""
        h = {"all": self.histogram, "warm": self.warm, "cold": self.cold}[side]
        if not h.get_total_count():
            return []
        return [
            (h.get_value_at_percentile(q) / 1000, q / 100)
            for q in (100 * (1 - 0.5 ** (k / 20)) for k in range(points))
        ] + [(h.get_max_value() / 1000, 1.0)]


def _b64(histogram: HdrHistogram) -> str:
    encoded = histogram.encode()
    return encoded.decode() if isinstance(encoded, bytes) else encoded


class _Chooser:
    def __init__(self, targets: Targets, shape: Shape, stream: int) -> None:
        self.rng = random.Random(f"{shape.seed}/{stream}")
        self.model_ids = sorted(targets.routes)
        self.routes = targets.routes
        weights: list[float] | None = None
        if shape.weights is not None:
            weights = [max(0.0, shape.weights.get(m, 0.0)) for m in self.model_ids]
            if not sum(weights) > 0:
                raise ValueError("traffic weights: no model of the targets has a positive weight")
        elif shape.zipf > 0:
            # Model rank k gets weight 1 / k^a; ranks are shuffled by the seed, not by name.
            order = list(self.model_ids)
            random.Random(shape.seed).shuffle(order)
            self.model_ids = order
            weights = [1 / (k**shape.zipf) for k in range(1, len(order) + 1)]
        if weights is not None:
            total = sum(weights)
            self.cumulative = []
            running = 0.0
            for w in weights:
                running += w / total
                self.cumulative.append(running)
        else:
            self.cumulative = None
        self.texts = [text_of(shape.tokens, self.rng) for _ in range(64)]

    def next(self) -> tuple[str, str, str]:
        if self.cumulative is None:
            model_id = self.rng.choice(self.model_ids)
        else:
            index = bisect.bisect_left(self.cumulative, self.rng.random())
            model_id = self.model_ids[min(index, len(self.model_ids) - 1)]
        url = self.rng.choice(self.routes[model_id])
        return model_id, url, self.rng.choice(self.texts)


async def _send(
    http: aiohttp.ClientSession,
    model_id: str,
    url: str,
    text: str,
    started: float,
    recorder: Recorder,
) -> None:
    try:
        async with http.post(url, json={"text": text}) as response:
            await response.read()
            status = response.status
            cold = met_cold_start(response.headers)
    except TimeoutError:
        recorder.errors["timeout"] += 1
        return
    except aiohttp.ClientConnectorError:
        recorder.errors["connect"] += 1
        return
    except aiohttp.ClientError as exc:
        recorder.errors[type(exc).__name__] += 1
        return
    if status == 200:
        server = url.rsplit("/predictions/", 1)[0]
        recorder.record(model_id, server, time.perf_counter() - started, cold)
    else:
        recorder.errors[f"http_{status}"] += 1


def _session(bounds: Bounds, connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, force_close=False),
        timeout=aiohttp.ClientTimeout(total=bounds.timeout_s),
    )


async def _lag_monitor(recorder: Recorder, stop: asyncio.Event, period: float = 0.005) -> None:
    while not stop.is_set():
        due = time.perf_counter() + period
        await asyncio.sleep(period)
        recorder.late(max(0.0, time.perf_counter() - due))


async def sequential(targets: Targets, bounds: Bounds) -> Recorder:
    recorder = Recorder()
    rng = random.Random(0)
    started = time.perf_counter()
    cpu = time.process_time()
    async with _session(bounds, 1) as http:
        model_ids = sorted(targets.routes)
        for sent, model_id in enumerate(model_ids, start=1):
            url = targets.routes[model_id][0]
            await _send(http, model_id, url, text_of(16, rng), time.perf_counter(), recorder)
            if time.perf_counter() - started > bounds.duration_s and sent < len(model_ids):
                recorder.errors["not_sent_time_bound"] += len(model_ids) - sent
                break
    recorder.duration_s = time.perf_counter() - started
    recorder.cpu_s = time.process_time() - cpu
    return recorder


async def closed_loop(
    targets: Targets, shape: Shape, bounds: Bounds, concurrency: int, stream: int = 0
) -> Recorder:
    """``concurrency`` clients; ``concurrency`` 1 is the reference's random single requests."""
    recorder = Recorder()
    chooser = _Chooser(targets, shape, stream)
    stop = asyncio.Event()
    sent = 0
    deadline = time.perf_counter() + bounds.duration_s

    async def client() -> None:
        nonlocal sent
        while time.perf_counter() < deadline and (
            bounds.max_requests is None or sent < bounds.max_requests
        ):
            sent += 1
            model_id, url, text = chooser.next()
            await _send(http, model_id, url, text, time.perf_counter(), recorder)

    started = time.perf_counter()
    cpu = time.process_time()
    async with _session(bounds, concurrency) as http:
        monitor = asyncio.create_task(_lag_monitor(recorder, stop))
        await asyncio.gather(*(client() for _ in range(concurrency)))
        stop.set()
        await monitor
    recorder.duration_s = time.perf_counter() - started
    recorder.cpu_s = time.process_time() - cpu
    return recorder


async def open_loop(
    targets: Targets,
    shape: Shape,
    bounds: Bounds,
    rate: float,
    stream: int = 0,
    max_in_flight: int = 10_000,
) -> Recorder:
    """Poisson arrivals at ``rate`` per second; each latency counts from its scheduled start."""
    if rate <= 0:
        raise ValueError(f"rate must be above 0 requests/s, got {rate}")
    recorder = Recorder()
    chooser = _Chooser(targets, shape, stream)
    arrivals = random.Random(f"arrivals/{shape.seed}/{stream}")
    in_flight: set[asyncio.Task] = set()
    started = time.perf_counter()
    cpu = time.process_time()
    scheduled = started
    sent = 0
    async with _session(bounds, max_in_flight) as http:
        while bounds.max_requests is None or sent < bounds.max_requests:
            scheduled += arrivals.expovariate(rate)
            if scheduled - started > bounds.duration_s:
                break
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            recorder.late(max(0.0, time.perf_counter() - scheduled))
            if len(in_flight) >= max_in_flight:
                recorder.errors["client_in_flight_limit"] += 1
                continue
            model_id, url, text = chooser.next()
            task = asyncio.create_task(_send(http, model_id, url, text, scheduled, recorder))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            sent += 1
        if in_flight:
            await asyncio.wait(in_flight)
    recorder.duration_s = time.perf_counter() - started
    recorder.cpu_s = time.process_time() - cpu
    return recorder


# ----------------------------------------------------------------------- several processes


def _worker(args: tuple) -> dict:
    mode, targets_json, shape_json, bounds_json, level, stream = args
    targets = msgspec.json.decode(targets_json, type=Targets)
    shape = msgspec.json.decode(shape_json, type=Shape)
    bounds = msgspec.json.decode(bounds_json, type=Bounds)
    if mode == "rate":
        recorder = asyncio.run(open_loop(targets, shape, bounds, level, stream))
    else:
        recorder = asyncio.run(closed_loop(targets, shape, bounds, int(level), stream))
    return recorder.encode()


def run(
    mode: str,
    targets: Targets,
    shape: Shape,
    bounds: Bounds,
    level: float,
    processes: int = 1,
) -> Recorder:
    """A closed (``level`` = concurrency) or open (``level`` = rate) loop over ``processes``
    generator processes, each taking an equal share of the level; histograms are merged."""
    if mode not in ("closed", "rate"):
        raise ValueError(f"mode must be closed or rate, got {mode!r}")
    processes = max(1, min(processes, int(level) if mode == "closed" else processes))
    if processes == 1:
        if mode == "rate":
            return asyncio.run(open_loop(targets, shape, bounds, level))
        return asyncio.run(closed_loop(targets, shape, bounds, int(level)))
    shares = _split(level, processes, whole=mode == "closed")
    per_process = msgspec.structs.replace(
        bounds,
        max_requests=None if bounds.max_requests is None else -(-bounds.max_requests // processes),
    )
    jobs = [
        (
            mode,
            msgspec.json.encode(targets),
            msgspec.json.encode(shape),
            msgspec.json.encode(per_process),
            share,
            stream,
        )
        for stream, share in enumerate(shares)
    ]
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        results = pool.map(_worker, jobs)
    merged = Recorder(processes=processes)
    for encoded in results:
        merged.merge(encoded)
    return merged


def _split(level: float, parts: int, whole: bool) -> list[float]:
    if whole:
        base, extra = divmod(int(level), parts)
        return [base + (1 if k < extra else 0) for k in range(parts)]
    return [level / parts] * parts
