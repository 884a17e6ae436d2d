"""Every GPU figure of the cross-model engine in one bounded run, as JSON (``gpu_suite.sh``).

    python -m benchmarks.gpu_suite OUTDIR            # on the device: about 7.5 minutes
    python -m benchmarks.gpu_suite --dry-run OUTDIR  # the same code on CPU, tiny shapes
    python -m benchmarks.gpu_suite --only engine_int8,frontends_int8 OUTDIR   # a rerun

Each figure group is a step run in its own process, with its own time budget, writing
``OUTDIR/<group>.json`` as its figures come (a step killed at its budget keeps what it had);
a step that fails records its error and the suite goes on. ``OUTDIR/summary.json`` (device,
versions, date, every step's status and every figure with its unit) is rewritten after each
step. Files stay at eight, flat, so all of them come back from a device machine's ``$OUT``.

Groups (the full run; ``--dry-run`` shrinks every size, see :data:`FULL` and :data:`DRY`):

- ``device``: the device's name, memory, versions, the HBM bandwidth from a table by name
  (H100 SXM 3.35 TB/s, H200 4.8 TB/s) and a measured device-to-device copy.
- ``memory``: GPU memory per model as allocated (``torch.cuda.memory_allocated`` deltas over a
  weight bank) at fp32, bf16, fp16 and int8, against the bank's own count and the packer's.
- ``accuracy``: bf16 and int8 outputs against fp32 on the device (max abs, cosine, argmax
  agreement), and the engine's fp32 against the eager Hugging Face model.
- ``engine_bf16``: the engine alone (weight bank, pool, grouped forward; no HTTP): 300 bf16
  bert-base classifiers, uniform and Zipf traffic, requests/s, weight bytes read per second
  and the fraction of the HBM ceiling.
- ``engine_int8``: 600 int8 models, 300 resident and 300 in host memory: requests/s over the
  resident ones, the cost of one swap from host memory, and Zipf traffic over all 600.
- ``frontends_bf16`` / ``frontends_int8``: the same models behind the server's front ends
  (``--workers``), over HTTP (and KServe v2 gRPC when the server has it): the highest
  open-loop request rate whose P90 stays within 100 ms, in a bounded number of tries; then the
  engine process alone fed frames of 16 tokenised requests over ZeroMQ as front ends send them
  (``engine_feed_*``: its requests/s and CPU per request with the real forward on the device).

Weights are synthetic (seeded, generated on the device, no hub): speed does not depend on
their values, and tracing 300 bert-base models into a store would take longer than the whole
suite. For the same reason the front-end steps build the server's repository in process
(:class:`SyntheticRepository`: the real engine, data plane and front ends; only the store read
is replaced) and every model shares one pinned host copy of the weights, as 600 fp32 host
copies would not fit the machine's memory.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# HBM bandwidth by device name (datasheets), bytes/s; the first key found in the name wins.
BANDWIDTH_TABLE = (
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM (HBM3): "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2.039e12),
    ("A100", 1.555e12),
)
P90_TARGET_MS = 100.0
ZIPF = 1.1


@dataclass(frozen=True)
class Config:
    """Sizes and windows of one run: :data:`FULL` on a device, :data:`DRY` on a CPU."""

    dry_run: bool
    arch: str
    bf16_models: int
    int8_resident: int
    int8_host: int
    batch: int
    seq: int
    seconds: float  # one engine measuring window
    swaps_timed: int
    memory_slots: int
    accuracy_batch: int
    server_max_batch: int
    server_threads: int
    front_ends: int
    generator_processes: int
    text_tokens: int
    start_rate: float
    rate_tries: int
    rate_seconds: float
    server_timeout_s: float
    total_budget_s: float
    budgets: dict[str, float]


FULL = Config(
    dry_run=False,
    arch="bert-base-cased",
    bf16_models=300,
    int8_resident=300,
    int8_host=300,
    batch=256,
    seq=128,
    seconds=8.0,
    swaps_timed=4,
    memory_slots=8,
    accuracy_batch=16,
    server_max_batch=256,
    server_threads=8,
    front_ends=4,
    generator_processes=6,
    text_tokens=32,
    start_rate=1000.0,
    rate_tries=6,
    rate_seconds=3.0,
    server_timeout_s=60.0,
    # Under 8 minutes with the wheels' install (gpu_suite.sh) and the steps' process starts.
    total_budget_s=440.0,
    budgets={
        "device": 20,
        "memory": 25,
        "accuracy": 40,
        "engine_bf16": 65,
        "engine_int8": 80,
        "frontends_bf16": 120,
        "frontends_int8": 90,
    },
)
DRY = replace(
    FULL,
    dry_run=True,
    arch="bert-tiny",
    bf16_models=8,
    int8_resident=4,
    int8_host=4,
    batch=16,
    seq=32,
    seconds=0.5,
    swaps_timed=2,
    memory_slots=4,
    accuracy_batch=4,
    server_max_batch=32,
    server_threads=1,
    front_ends=2,
    generator_processes=1,
    text_tokens=8,
    start_rate=40.0,
    rate_tries=2,
    rate_seconds=1.0,
    server_timeout_s=90.0,
    total_budget_s=240.0,
    budgets={
        "device": 30,
        "memory": 30,
        "accuracy": 40,
        "engine_bf16": 40,
        "engine_int8": 40,
        "frontends_bf16": 100,
        "frontends_int8": 100,
    },
)
GROUPS = tuple(FULL.budgets)
# The engine-feed part of the front-end steps: frames of this many requests, this many in flight
# per simulated front end.
ENGINE_FEED_FRAME = 16
ENGINE_FEED_IN_FLIGHT = 8


# ------------------------------------------------------------------------------ recording


class Recorder:
    """One group's JSON, rewritten after every figure so that a killed step keeps them."""

    def __init__(self, out: Path, group: str, config: Config) -> None:
        self.path = out / f"{group}.json"
        self.data: dict = {
            "group": group,
            "status": "running",
            "dry_run": config.dry_run,
            "budget_s": config.budgets[group],
            "figures": {},
            "details": {},
            "errors": {},
        }
        self.write()

    def figure(self, name: str, value: float | int | None, unit: str) -> None:
        if isinstance(value, float):
            value = float(f"{value:.6g}") if abs(value) < 10 else round(value, 2)
        self.data["figures"][name] = {"value": value, "unit": unit}
        self.write()

    def detail(self, name: str, value: object) -> None:
        self.data["details"][name] = value
        self.write()

    def attempt(self, name: str, action: Callable[[], None]) -> None:
        """Run one part of a step; a failure is recorded under its name and the step goes on."""
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - every part's failure is a finding to keep
            self.data["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            self.write()

    def write(self) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.data, indent=2, default=str))
        temporary.replace(self.path)


# ------------------------------------------------------------------------------- helpers


def torch_device(config: Config):
    import torch

    if config.dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device; run with --dry-run on a machine without one")
    return torch.device("cuda")


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device) -> int:
    import torch

    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def bank_storage_bytes(bank) -> int:
    """What a CPU bank holds, counted from its tensors' storages (no allocator to ask)."""
    tensors = [*bank.tensors.values(), *bank.scales.values()]
    return sum(t.untyped_storage().nbytes() for t in tensors)


def shape_of(arch: str, task: str = "sequence-classification", labels: int = 2):
    from serving.backends.weightbank import BertShape
    from serving.build.sources import SYNTHETIC_ARCHITECTURES

    a = SYNTHETIC_ARCHITECTURES[arch]
    return BertShape(
        layers=a.num_hidden_layers,
        hidden=a.hidden_size,
        heads=a.num_attention_heads,
        intermediate=a.intermediate_size,
        vocab=a.vocab_size,
        max_positions=a.max_position_embeddings,
        type_vocab=2,
        eps=1e-12,
        task=task,
        num_labels=labels if task == "sequence-classification" else 0,
    )


def synthetic_weights(shape, device, dtype, seed: int = 0) -> dict:
    """One model's bank-layout weights, drawn on ``device`` (seconds for bert-base on a CPU,
    milliseconds on a GPU); never zeros, which can time faster than real data."""
    import torch

    from serving.backends.weightbank import _example_shapes

    generator = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, dims in _example_shapes(shape).items():
        if "ln" in name and name.endswith(".w"):
            weights[name] = torch.ones(dims, device=device, dtype=dtype)
        else:
            drawn = torch.randn(dims, generator=generator, device=device) * 0.02
            weights[name] = drawn.to(dtype)
    return weights


def pinned(weights: dict, device) -> dict:
    """A host copy (pinned when the device is a GPU, as the engine's pool keeps it)."""
    host = {name: tensor.cpu() for name, tensor in weights.items()}
    if device.type == "cuda":
        host = {name: tensor.pin_memory() for name, tensor in host.items()}
    return host


def prefill(pool, names: list[str], device_weights: dict, host_weights: dict) -> None:
    """Make ``names`` resident quickly: swap each in from a copy already on the device (an int8
    bank quantises on the device then), then point every model back at the host copy, so that
    later swaps come from host memory as in service."""
    step = max(1, pool.bank.slots)
    for start in range(0, len(names), step):
        chunk = names[start : start + step]
        for name in chunk:
            pool.host[name] = device_weights
        slots = pool.acquire(chunk)
        pool.release(slots)
        for name in chunk:
            pool.host[name] = host_weights


def bandwidths(out: Path, device) -> dict:
    """The device's bandwidths (bytes/s): from device.json when that step ran, else the table."""
    try:
        figures = json.loads((out / "device.json").read_text())["figures"]
        table = figures.get("hbm_bandwidth_table", {}).get("value")
        measured = figures.get("copy_bandwidth_measured", {}).get("value")
        return {
            "table": table * 1e9 if table else None,
            "measured": measured * 1e9 if measured else None,
        }
    except (OSError, KeyError, ValueError, TypeError):
        return {"table": table_bandwidth(device_name(device)), "measured": None}


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def table_bandwidth(name: str) -> float | None:
    for key, value in BANDWIDTH_TABLE:
        if key in name:
            return value
    return None


def cumulative_zipf(count: int, exponent: float) -> list[float] | None:
    if exponent <= 0:
        return None
    weights = [1 / (k**exponent) for k in range(1, count + 1)]
    total, running, cumulative = sum(weights), 0.0, []
    for weight in weights:
        running += weight / total
        cumulative.append(running)
    return cumulative


# ------------------------------------------------------------------------------- the steps


def step_device(config: Config, out: Path, record: Recorder) -> None:
    import torch

    device = torch_device(config)
    name = device_name(device)
    record.detail("name", name)
    record.detail("torch", torch.__version__)
    record.detail("cuda", torch.version.cuda)
    record.detail("python", platform.python_version())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record.detail("capability", f"{props.major}.{props.minor}")
        record.detail("multiprocessors", props.multi_processor_count)
        record.figure("gpu_memory_total", props.total_memory / 2**30, "GiB")
    table = table_bandwidth(name)
    record.figure("hbm_bandwidth_table", table / 1e9 if table else None, "GB/s")
    # A large copy counts its bytes twice (read and written): the achievable ceiling.
    elements = (1 << 30) if device.type == "cuda" else (1 << 24)
    source = torch.randn(elements // 2, device=device, dtype=torch.float32).view(torch.uint8)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    synchronize(device)
    times = []
    for _ in range(10):
        started = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        times.append(time.perf_counter() - started)
    seconds = sorted(times)[len(times) // 2]
    record.figure("copy_bandwidth_measured", 2 * source.numel() / seconds / 1e9, "GB/s")


def step_memory(config: Config, out: Path, record: Recorder) -> None:
    import torch

    from serving.backends.weightbank import WeightBank, planned_bytes

    device = torch_device(config)
    shape = shape_of(config.arch)
    planned = planned_bytes(shape)
    layouts = {
        "fp32": (torch.float32, False),
        "bf16": (torch.bfloat16, False),
        "fp16": (torch.float16, False),
        "int8": (torch.bfloat16, True),
    }
    record.detail("arch", config.arch)
    record.detail("slots", config.memory_slots)
    record.detail(
        "measured_by",
        "torch.cuda.memory_allocated delta" if device.type == "cuda" else "tensor storage bytes",
    )

    def one(precision: str, dtype, int8: bool) -> None:
        synchronize(device)
        before = allocated(device)
        bank = WeightBank(shape, config.memory_slots, device, dtype, int8=int8)
        synchronize(device)
        delta = allocated(device) - before if device.type == "cuda" else bank_storage_bytes(bank)
        per_model = delta / config.memory_slots
        record.figure(f"memory_per_model_{precision}", per_model / 1e6, "MB")
        record.detail(
            precision,
            {
                "allocated_bytes_per_model": per_model,
                "bank_bytes_per_slot": bank.bytes_per_slot,
                "planned_bytes": planned[precision],
                "allocated_over_planned": round(per_model / planned[precision], 4),
            },
        )
        del bank
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for precision, (dtype, int8) in layouts.items():
        record.attempt(precision, lambda p=precision, d=dtype, i=int8: one(p, d, i))


def step_accuracy(config: Config, out: Path, record: Recorder) -> None:
    import torch

    from packing.contracts import ModelSpec
    from serving.backends.weightbank import CrossModelExecutor, WeightBank, bert_weights
    from serving.build.modeling import load_eager
    from serving.build.sources import resolve

    device = torch_device(config)
    generator = torch.Generator().manual_seed(7)
    batch, length = config.accuracy_batch, config.seq
    record.detail("arch", config.arch)
    record.detail("inputs", f"{batch} random token sequences of 8..{length} tokens, seed 7")

    def compare(task: str) -> None:
        spec = ModelSpec(
            id=f"accuracy-{task}",
            source=f"synthetic:{config.arch}",
            task=task,
            num_labels=4,
            max_length=length,
        )
        eager = load_eager(spec, resolve(spec))
        shape, weights = bert_weights(eager.module, task)
        ids = torch.randint(
            min(1000, shape.vocab // 2), shape.vocab, (batch, length), generator=generator
        )
        lengths = torch.randint(8, length + 1, (batch,), generator=generator)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        ids = ids * mask
        slots = torch.zeros(batch, dtype=torch.long)
        outputs = {}
        # The fp32 reference runs one GEMM per model (no grouped GEMM: its CUDA kernel is
        # bf16-only on some torch builds).
        variants = (
            ("fp32", torch.float32, False, True),
            ("bf16", torch.bfloat16, False, None),
            ("int8", torch.bfloat16, True, None),
        )
        for label, dtype, int8, views in variants:
            bank = WeightBank(shape, 1, device, dtype, int8=int8)
            bank.write(0, {k: v.to(device) for k, v in weights.items()})
            executor = CrossModelExecutor(bank, views=views)
            outputs[label] = executor.forward(slots, ids, mask).float()
            del bank
        module = eager.module.to(device).eval()
        with torch.inference_mode():
            reference_eager = module(ids.to(device), mask.to(device)).float().cpu()
        reference = outputs["fp32"]
        figures = {
            "fp32_vs_eager_max_abs": float((reference - reference_eager).abs().max()),
            "reference_max_abs": float(reference.abs().max()),
        }
        unit = "logits" if task == "sequence-classification" else "embedding"
        record.figure(
            f"{task}_fp32_engine_vs_eager_max_abs", figures["fp32_vs_eager_max_abs"], unit
        )
        for label in ("bf16", "int8"):
            out_ = outputs[label]
            cosine = torch.nn.functional.cosine_similarity(out_, reference, dim=1)
            relative = float((out_ - reference).norm() / reference.norm().clamp(min=1e-12))
            entry = {
                "max_abs_vs_fp32": float((out_ - reference).abs().max()),
                "relative_error_vs_fp32": relative,
                "min_cosine_vs_fp32": float(cosine.min()),
                "mean_cosine_vs_fp32": float(cosine.mean()),
            }
            if task == "sequence-classification":
                entry["argmax_agreement"] = float(
                    (out_.argmax(1) == reference.argmax(1)).float().mean()
                )
            figures[label] = entry
            record.figure(f"{task}_{label}_max_abs_vs_fp32", entry["max_abs_vs_fp32"], unit)
            record.figure(
                f"{task}_{label}_min_cosine_vs_fp32", entry["min_cosine_vs_fp32"], "cosine"
            )
        record.detail(task, figures)

    record.attempt("sequence-classification", lambda: compare("sequence-classification"))
    record.attempt("embedding", lambda: compare("embedding"))


class Traffic:
    """Batches of requests to models drawn uniformly or by Zipf rank (rank k = ``names[k]``)."""

    def __init__(self, names: list[str], zipf: float, seed: int) -> None:
        self.names = names
        self.cumulative = cumulative_zipf(len(names), zipf)
        self.rng = random.Random(seed)

    def draw(self, batch: int, limit: int) -> list[str]:
        """``batch`` requests, keeping those to the first ``limit`` distinct models (a bank's
        slots bound the models of one forward)."""
        if self.cumulative is None:
            chosen = [self.rng.choice(self.names) for _ in range(batch)]
        else:
            indices = self.rng.choices(range(len(self.names)), cum_weights=self.cumulative, k=batch)
            chosen = [self.names[i] for i in indices]
        allowed = set(list(dict.fromkeys(chosen))[:limit])
        return [c for c in chosen if c in allowed]


def run_traffic(
    pool, executor, traffic: Traffic, config: Config, device, bytes_per_model: int
) -> dict:
    """Forward batches for ``config.seconds`` (after one warm-up batch): requests/s, the models
    per batch, and weight bytes read per second (each distinct model of a batch once)."""
    import torch

    vocab = pool.bank.shape.vocab
    input_ids = torch.randint(min(1000, vocab // 2), vocab, (config.batch, config.seq))
    mask = torch.ones_like(input_ids)

    def one() -> tuple[int, int]:
        chosen = traffic.draw(config.batch, pool.bank.slots)
        slots = pool.acquire(chosen)
        try:
            executor.forward(torch.tensor(slots), input_ids[: len(chosen)], mask[: len(chosen)])
        finally:
            pool.release(slots)
        return len(chosen), len(set(chosen))

    one()
    synchronize(device)
    swaps_before, swap_seconds_before = pool.swaps, pool.swap_seconds
    requests = distinct = batches = 0
    batch_seconds = []
    started = time.perf_counter()
    while time.perf_counter() - started < config.seconds:
        began = time.perf_counter()
        done, models = one()
        batch_seconds.append(time.perf_counter() - began)
        requests, distinct, batches = requests + done, distinct + models, batches + 1
    synchronize(device)
    elapsed = time.perf_counter() - started
    swaps = pool.swaps - swaps_before
    batch_seconds.sort()
    return {
        "requests_per_s": requests / elapsed,
        "batches": batches,
        "mean_models_per_batch": distinct / batches,
        "weight_bytes_per_s": distinct * bytes_per_model / elapsed,
        "median_batch_ms": 1000 * batch_seconds[len(batch_seconds) // 2],
        "swaps": swaps,
        "mean_swap_ms": 1000 * (pool.swap_seconds - swap_seconds_before) / swaps if swaps else None,
    }


def _engine(config: Config, slots: int, int8: bool):
    import torch

    from serving.backends.weightbank import CrossModelExecutor, ModelPool, WeightBank

    device = torch_device(config)
    shape = shape_of(config.arch)
    synchronize(device)
    before = allocated(device)
    bank = WeightBank(shape, slots, device, torch.bfloat16, int8=int8)
    synchronize(device)
    delta = allocated(device) - before if device.type == "cuda" else bank_storage_bytes(bank)
    return device, shape, bank, ModelPool(bank), CrossModelExecutor(bank), delta


def _record_traffic(record: Recorder, label: str, figures: dict, ceiling: dict) -> None:
    record.figure(f"requests_per_s_{label}", figures["requests_per_s"], "requests/s")
    record.figure(f"weight_read_{label}", figures["weight_bytes_per_s"] / 1e9, "GB/s")
    if ceiling["table"]:
        fraction = figures["weight_bytes_per_s"] / ceiling["table"]
        record.figure(f"hbm_fraction_{label}", fraction, "fraction of table bandwidth")
    if ceiling["measured"]:
        fraction = figures["weight_bytes_per_s"] / ceiling["measured"]
        record.figure(f"copy_fraction_{label}", fraction, "fraction of measured copy bandwidth")
    record.detail(label, figures)


def step_engine_bf16(config: Config, out: Path, record: Recorder) -> None:
    models = config.bf16_models
    device, shape, bank, pool, executor, delta = _engine(config, models, int8=False)
    ceiling = bandwidths(out, device)
    record.detail(
        "setup",
        {"arch": config.arch, "models": models, "batch": config.batch, "seq": config.seq,
         "bank_allocated_bytes": delta, "bytes_per_slot": bank.bytes_per_slot,
         "seconds_per_figure": config.seconds, "zipf": ZIPF, "bandwidth_bytes_per_s": ceiling},
    )  # fmt: skip
    record.figure("memory_per_model_allocated", delta / models / 1e6, "MB")
    import torch

    device_weights = synthetic_weights(shape, device, torch.bfloat16)
    host_weights = pinned(device_weights, device)
    names = [f"m{i:04d}" for i in range(models)]
    started = time.perf_counter()
    prefill(pool, names, device_weights, host_weights)
    synchronize(device)
    record.detail("prefill_seconds", round(time.perf_counter() - started, 2))

    def measure(label: str, zipf: float, full_bank: bool = False) -> None:
        from serving.backends.weightbank import CrossModelExecutor

        runner = CrossModelExecutor(bank, full_bank=True) if full_bank else executor
        figures = run_traffic(
            pool, runner, Traffic(names, zipf, seed=1), config, device, bank.bytes_per_slot
        )
        _record_traffic(record, label, figures, ceiling)

    record.attempt("uniform", lambda: measure("uniform", 0.0))
    record.attempt("zipf", lambda: measure("zipf", ZIPF))
    if device.type == "cuda":
        record.detail("peak_allocated_bytes", torch.cuda.max_memory_allocated(device))
    # Last, as it may hang on an older torch (empty groups on CUDA): the grouped GEMM over the
    # whole bank, with no copy of the batch's weights.
    record.attempt("uniform_full_bank", lambda: measure("uniform_full_bank", 0.0, True))


def step_engine_int8(config: Config, out: Path, record: Recorder) -> None:
    import torch

    resident, host = config.int8_resident, config.int8_host
    device, shape, bank, pool, executor, delta = _engine(config, resident, int8=True)
    ceiling = bandwidths(out, device)
    record.detail(
        "setup",
        {"arch": config.arch, "resident_models": resident, "host_models": host,
         "batch": config.batch, "seq": config.seq, "bank_allocated_bytes": delta,
         "bytes_per_slot": bank.bytes_per_slot, "seconds_per_figure": config.seconds,
         "zipf": ZIPF, "bandwidth_bytes_per_s": ceiling},
    )  # fmt: skip
    record.figure("memory_per_model_allocated", delta / resident / 1e6, "MB")
    device_weights = synthetic_weights(shape, device, torch.bfloat16)
    host_weights = pinned(device_weights, device)
    names = [f"m{i:04d}" for i in range(resident + host)]
    for name in names:
        pool.host[name] = host_weights
    started = time.perf_counter()
    prefill(pool, names[:resident], device_weights, host_weights)
    synchronize(device)
    record.detail("prefill_seconds", round(time.perf_counter() - started, 2))

    def resident_only() -> None:
        figures = run_traffic(
            pool,
            executor,
            Traffic(names[:resident], 0.0, seed=2),
            config,
            device,
            bank.bytes_per_slot,
        )
        _record_traffic(record, "resident_uniform", figures, ceiling)

    def swaps() -> None:
        # One model from host memory per acquire; each evicts a resident one.
        before_swaps, before_seconds = pool.swaps, pool.swap_seconds
        for name in names[resident : resident + config.swaps_timed]:
            pool.release(pool.acquire([name]))
        count = pool.swaps - before_swaps
        mean = (pool.swap_seconds - before_seconds) / max(count, 1)
        record.figure("swap_in_from_host", 1000 * mean, "ms per model")
        record.figure("swap_in_bandwidth", bank.bytes_per_slot / mean / 1e9, "GB/s of bank bytes")
        record.detail("swaps_timed", count)

    def zipf_all() -> None:
        # Zipf ranks follow the names: the hottest half starts resident.
        figures = run_traffic(
            pool, executor, Traffic(names, ZIPF, seed=3), config, device, bank.bytes_per_slot
        )
        _record_traffic(record, "zipf_all", figures, ceiling)
        record.figure("swaps_per_s_zipf_all", figures["swaps"] / config.seconds, "swaps/s")

    record.attempt("resident_uniform", resident_only)
    record.attempt("swap", swaps)
    record.attempt("zipf_all", zipf_all)
    if device.type == "cuda":
        record.detail("peak_allocated_bytes", torch.cuda.max_memory_allocated(device))


# ------------------------------------------------------------------ the server's front ends


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def frontend_plan(config: Config, int8: bool) -> dict:
    """What the server of a front-end step serves and which models it makes resident first:
    the hottest ones of the load generator's Zipf order (the generator shuffles ranks by its
    seed), so that the measured traffic does not start with a storm of swaps."""
    from loadtest import generator as loadgen

    if int8:
        ids = [f"m{i:04d}" for i in range(config.int8_resident + config.int8_host)]
        slots, zipf = config.int8_resident, ZIPF
    else:
        ids = [f"m{i:04d}" for i in range(config.bf16_models)]
        slots, zipf = config.bf16_models, 0.0
    shape = loadgen.Shape(zipf=zipf, tokens=config.text_tokens, seed=0)
    targets = loadgen.Targets(routes={m: ["http://unused/predictions/" + m] for m in ids})
    order = loadgen._Chooser(targets, shape, 0).model_ids
    return {"ids": ids, "slots": slots, "int8": int8, "zipf": zipf, "order": order,
            "prefill": order[:slots]}  # fmt: skip


def serve_synthetic(
    config: Config, plan_path: Path, port: int, marker: Path, grpc_port: int | None
) -> None:
    """The server process of a front-end step: the real engine, data plane and ``--workers``
    front ends over a repository of synthetic models (see :class:`SyntheticRepository`), and
    the gRPC service on ``grpc_port`` when given."""
    import torch

    from serving.http import server

    plan = json.loads(plan_path.read_text())
    torch.set_num_threads(config.server_threads)
    repository = synthetic_repository(config, plan, marker)
    extra = {}
    if grpc_port is not None:
        extra["grpc_hooks"] = server.grpc_hooks("127.0.0.1", grpc_port)
    server.serve_behind_front_ends(
        repository, 1, None, "127.0.0.1", port, config.front_ends, "warning", None, **extra
    )


def synthetic_repository(config: Config, plan: dict, marker: Path):
    import torch

    from serving.backends.contract import ModelState
    from serving.backends.crossmodel import CrossModel, CrossModelRepository, CrossModelSettings
    from serving.build.modeling import configure_tokenizer, synthetic_tokenizer
    from serving.store import open_store

    device = torch_device(config)
    shape = shape_of(config.arch)
    device_weights = synthetic_weights(shape, device, torch.bfloat16)
    host_weights = pinned(device_weights, device)
    tokenizer = configure_tokenizer(synthetic_tokenizer(shape.vocab), config.seq)
    labels = ["negative", "positive"]

    class SyntheticModel(CrossModel):
        def load(self, store, cache_dir) -> None:
            self.state = ModelState.LOADING
            self.task, self.max_length, self.shape = shape.task, config.seq, shape
            self._loaded = (host_weights, tokenizer, labels)
            self.memory_bytes = sum(t.numel() * t.element_size() for t in host_weights.values())

    class SyntheticRepository(CrossModelRepository):
        """The cross-model repository with models made in memory instead of read from a
        store; ready once the first ``slots`` models are resident."""

        prefilled = False

        def load_all(self) -> None:
            super().load_all()
            for engine in self.engines.values():
                prefill(engine.pool, plan["prefill"], device_weights, host_weights)
            synchronize(device)
            self.prefilled = True
            marker.write_text("prefilled")

        @property
        def ready(self) -> bool:
            return self.prefilled and super().ready

    settings = CrossModelSettings(
        slots=plan["slots"],
        precision="bf16",
        int8=plan["int8"],
        max_batch=config.server_max_batch,
        max_wait_s=0.002,
        device=device.type,
    )
    store = open_store(f"file://{tempfile.mkdtemp(prefix='myriad-gpu-suite-')}")
    processor = "gpu" if device.type == "cuda" else "cpu"
    repository = SyntheticRepository(store, plan["ids"], processor, None, settings)
    repository.models = {m: SyntheticModel(m, processor) for m in plan["ids"]}
    return repository


def wait_ready(
    url: str, process: subprocess.Popen, marker: Path, timeout_s: float, log: Path
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {_tail(log, 1500)}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as answer:
                if answer.status == 200 and marker.exists():
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server was not ready within {timeout_s:.0f} s")


def rate_search(config: Config, attempt_at: Callable[[float], dict]) -> tuple[dict | None, list]:
    """The highest open-loop rate whose P90 is within the target with under 1% errors: double
    from ``start_rate`` until a rate fails, then halve the gap, ``rate_tries`` tries in all."""
    best, failed, tries = None, None, []
    rate = config.start_rate
    for _ in range(config.rate_tries):
        point = attempt_at(rate)
        passed = (
            point.get("completed", 0) > 0
            and point.get("p90_ms", math.inf) <= P90_TARGET_MS
            and point.get("error_rate", 1.0) <= 0.01
        )
        tries.append({**{k: point.get(k) for k in ("rate", "requests_per_s", "p50_ms",
                      "p90_ms", "p99_ms", "error_rate", "errors")}, "passed": passed,
                      "saturated": point.get("generator", {}).get("saturated")})  # fmt: skip
        if passed:
            best = point
            rate = rate * 2 if failed is None else (rate + failed) / 2
        else:
            failed = rate
            rate = (best["rate"] + rate) / 2 if best else rate / 4
    return best, tries


def http_point(config: Config, url: str, plan: dict, rate: float, seconds: float) -> dict:
    from loadtest import generator as loadgen

    targets = loadgen.Targets(routes={m: [f"{url}/predictions/{m}"] for m in plan["ids"]})
    shape = loadgen.Shape(zipf=plan["zipf"], tokens=config.text_tokens, seed=0)
    recorder = loadgen.run(
        "rate",
        targets,
        shape,
        loadgen.Bounds(duration_s=seconds, timeout_s=10.0),
        rate,
        processes=config.generator_processes,
    )
    return recorder.summary("rate", rate=rate)


def grpc_support() -> str | None:
    """Why the front-end steps cannot measure gRPC, or None when the server has it."""
    import inspect

    if importlib.util.find_spec("serving.grpc") is None:
        return "serving.grpc does not exist: the server has no gRPC front end"
    try:
        from serving.grpc import (  # noqa: F401
            grpc_service_pb2,
            grpc_service_pb2_grpc,
            service,  # noqa: F401
        )
        from serving.http import server
    except Exception as exc:  # noqa: BLE001 - a package that does not import is a reason
        return f"serving.grpc does not import: {type(exc).__name__}: {exc}"
    if (
        not hasattr(server, "grpc_hooks")
        or "grpc_hooks" not in inspect.signature(server.serve_behind_front_ends).parameters
    ):
        return "serving.http.server has no grpc_hooks for a server behind front ends"
    return None


async def _grpc_open_loop(job: dict) -> dict:
    """Poisson arrivals of ModelInfer calls (one BYTES text each) at ``rate``; each latency
    counts from its scheduled start, as the HTTP generator's do."""
    import asyncio

    import grpc

    from loadtest.generator import text_of
    from serving.grpc import grpc_service_pb2 as pb
    from serving.grpc import grpc_service_pb2_grpc as pb_grpc

    rng = random.Random(f"grpc/{job['stream']}")
    order, cumulative = job["order"], cumulative_zipf(len(job["order"]), job["zipf"])
    texts = [text_of(job["tokens"], rng).encode() for _ in range(64)]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    in_flight: set = set()

    async def call(stub, model_id: str, text: bytes, scheduled: float) -> None:
        request = pb.ModelInferRequest(model_name=model_id)
        entry = request.inputs.add(name="text", datatype="BYTES", shape=[1])
        entry.contents.bytes_contents.append(text)
        try:
            await stub.ModelInfer(request, timeout=10.0)
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
            return
        latencies.append(time.perf_counter() - scheduled)

    started = time.perf_counter()
    cpu = time.process_time()
    async with grpc.aio.insecure_channel(job["target"]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        scheduled = started
        while True:
            scheduled += rng.expovariate(job["rate"])
            if scheduled - started > job["seconds"]:
                break
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if cumulative is None:
                model_id = rng.choice(order)
            else:
                model_id = order[min(bisect_left(cumulative, rng.random()), len(order) - 1)]
            task = asyncio.create_task(call(stub, model_id, rng.choice(texts), scheduled))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight)
    return {
        "latencies": latencies,
        "errors": errors,
        "duration_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu,
    }


def _grpc_worker(job: dict) -> dict:
    import asyncio

    return asyncio.run(_grpc_open_loop(job))


def grpc_point(config: Config, target: str, plan: dict, rate: float, seconds: float) -> dict:
    """One open-loop gRPC run at ``rate`` over ``generator_processes`` processes, summarised
    with the HTTP generator's keys."""
    import multiprocessing

    import numpy as np

    processes = config.generator_processes
    jobs = [
        {"target": target, "order": plan["order"], "zipf": plan["zipf"], "rate": rate / processes,
         "seconds": seconds, "tokens": config.text_tokens, "stream": stream}
        for stream in range(processes)
    ]  # fmt: skip
    if processes == 1:
        results = [_grpc_worker(jobs[0])]
    else:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            results = pool.map(_grpc_worker, jobs)
    latencies = np.array([x for r in results for x in r["latencies"]]) * 1000
    errors: dict[str, int] = {}
    for result in results:
        for code, count in result["errors"].items():
            errors[code] = errors.get(code, 0) + count
    duration = max(r["duration_s"] for r in results)
    completed, failed = len(latencies), sum(errors.values())
    point = {
        "rate": rate,
        "completed": completed,
        "errors": errors,
        "error_rate": failed / (completed + failed) if completed + failed else 0.0,
        "requests_per_s": completed / duration if duration else 0.0,
        "generator": {"saturated": max(r["cpu_s"] for r in results) > 0.9 * duration},
    }
    if completed:
        for q in (50, 90, 99):
            point[f"p{q}_ms"] = float(np.percentile(latencies, q))
    return point


def step_frontends(config: Config, out: Path, record: Recorder, int8: bool, logs: Path) -> None:
    plan = frontend_plan(config, int8)
    group = "frontends_int8" if int8 else "frontends_bf16"
    plan_path = logs / f"{group}-plan.json"
    plan_path.write_text(json.dumps(plan))
    marker = logs / f"{group}-ready"
    marker.unlink(missing_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    grpc_skipped = grpc_support()
    grpc_port = None if grpc_skipped else free_port()
    record.detail(
        "setup",
        {"arch": config.arch, "models": len(plan["ids"]), "resident": plan["slots"],
         "int8": int8, "traffic_zipf": plan["zipf"], "text_tokens": config.text_tokens,
         "front_ends": config.front_ends, "generator_processes": config.generator_processes,
         "server_max_batch": config.server_max_batch, "p90_target_ms": P90_TARGET_MS,
         "rate_tries": config.rate_tries, "seconds_per_try": config.rate_seconds},
    )  # fmt: skip
    command = [sys.executable, "-m", "benchmarks.gpu_suite", "--serve", str(plan_path),
               "--port", str(port), "--marker", str(marker), str(out)]  # fmt: skip
    if config.dry_run:
        command.insert(3, "--dry-run")
    if grpc_port is not None:
        command[-1:-1] = ["--grpc-port", str(grpc_port)]
    log_path = logs / f"{group}-server.log"
    log = log_path.open("wb")
    started = time.perf_counter()
    server = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, server, marker, config.server_timeout_s, log_path)
        record.figure("server_ready_seconds", time.perf_counter() - started, "s")
        # Warm-up: the forward's first shapes, the front ends' connections.
        http_point(config, url, plan, config.start_rate / 2, min(2.0, config.rate_seconds))

        def search(protocol: str, point: Callable[[float, float], dict]) -> None:
            best, tries = rate_search(config, lambda rate: point(rate, config.rate_seconds))
            record.detail(f"{protocol}_tries", tries)
            record.figure(
                f"{protocol}_requests_per_s_at_p90_100ms",
                best["requests_per_s"] if best else None,
                "requests/s",
            )
            if best:
                record.figure(f"{protocol}_p90_ms_at_best", best["p90_ms"], "ms")
                record.figure(f"{protocol}_p50_ms_at_best", best["p50_ms"], "ms")

        record.attempt(
            "http", lambda: search("http", lambda r, s: http_point(config, url, plan, r, s))
        )
        if grpc_port is None:
            record.detail("grpc_skipped", grpc_skipped)
        else:
            target = f"127.0.0.1:{grpc_port}"
            record.attempt(
                "grpc", lambda: search("grpc", lambda r, s: grpc_point(config, target, plan, r, s))
            )
        record.attempt("engine_feed", lambda: engine_feed_point(config, server.pid, plan, record))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def engine_feed_point(config: Config, pid: int, plan: dict, record: Recorder) -> None:
    """The engine process alone, fed frames of tokenised requests over ZeroMQ as its front ends
    send them (``benchmarks/engine_feed.py``), with the real forward on the device: whether
    one engine process's CPU keeps the device fed, past what the HTTP load generator drives."""
    from benchmarks.engine_feed import feed

    frame_size = ENGINE_FEED_FRAME
    figures = feed(
        pid,
        plan["ids"],
        frame_size,
        config.front_ends,
        ENGINE_FEED_IN_FLIGHT,
        config.rate_seconds,
        config.text_tokens,
    )
    record.detail("engine_feed", {"frame_size": frame_size, "connections": config.front_ends,
                                  "in_flight": ENGINE_FEED_IN_FLIGHT, **figures})  # fmt: skip
    record.figure("engine_feed_requests_per_s", figures["requests_per_s"], "requests/s")
    record.figure("engine_feed_p90_ms", figures["p90_ms"], "ms")
    record.figure("engine_feed_engine_cpu_per_request", figures["engine_cpu_ms_per_request"], "ms")
    record.figure(
        "engine_feed_scheduler_cpu_per_request",
        figures["engine_compute_cpu_ms_per_request"],
        "ms",
    )


STEPS: dict[str, Callable[..., None]] = {
    "device": step_device,
    "memory": step_memory,
    "accuracy": step_accuracy,
    "engine_bf16": step_engine_bf16,
    "engine_int8": step_engine_int8,
    "frontends_bf16": lambda c, o, r, logs: step_frontends(c, o, r, False, logs),
    "frontends_int8": lambda c, o, r, logs: step_frontends(c, o, r, True, logs),
}


# --------------------------------------------------------------------------- orchestration


def run_step(config: Config, group: str, out: Path, logs: Path) -> None:
    """One group in this process (the suite runs each in a child of its own)."""
    out.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    record = Recorder(out, group, config)
    started = time.perf_counter()
    try:
        step = STEPS[group]
        if group.startswith("frontends"):
            step(config, out, record, logs)
        else:
            step(config, out, record)
        record.data["status"] = "ok" if not record.data["errors"] else "partial"
    except Exception as exc:  # noqa: BLE001 - recorded; the suite goes on
        traceback.print_exc()
        record.data["status"] = "failed"
        record.data["error"] = f"{type(exc).__name__}: {exc}"
    record.data["seconds"] = round(time.perf_counter() - started, 2)
    record.write()


def _tail(path: Path, characters: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-characters:]
    except OSError:
        return ""


def launch(config: Config, group: str, out: Path, logs: Path, timeout_s: float) -> dict:
    """Run one group in a child process (its own session, so a timeout ends its server and
    front ends too) and settle its JSON: the child's figures, its status, and its error."""
    log_path = logs / f"{group}.log"
    command = [sys.executable, "-m", "benchmarks.gpu_suite", "--step", group,
               "--logs", str(logs), str(out)]  # fmt: skip
    if config.dry_run:
        command.insert(3, "--dry-run")
    started = time.perf_counter()
    status = None
    with log_path.open("wb") as log:
        child = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            status = "timed_out"
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        else:
            # Leave no server or front end behind: the step's whole session goes.
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    path = out / f"{group}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {"group": group, "figures": {}, "details": {}, "errors": {}}
    data["seconds"] = round(time.perf_counter() - started, 2)
    data["budget_s"] = timeout_s
    if status == "timed_out":
        data["status"] = "timed_out"
        data["error"] = f"stopped at its budget of {timeout_s:.0f} s; figures so far kept"
    elif child.returncode != 0 or data.get("status") in (None, "running"):
        data["status"] = "failed"
        data.setdefault("error", f"exited with {child.returncode}")
    if data["status"] != "ok":
        data["log_tail"] = _tail(log_path)
    path.write_text(json.dumps(data, indent=2, default=str))
    return data


def git_commit() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def write_summary(config: Config, out: Path, started: float, date: str) -> dict:
    device: dict = {}
    try:
        device = json.loads((out / "device.json").read_text()).get("details", {})
    except (OSError, ValueError):
        pass
    steps, figures = {}, []
    for group in GROUPS:
        try:
            data = json.loads((out / f"{group}.json").read_text())
        except (OSError, ValueError):
            continue
        steps[group] = {
            key: data.get(key) for key in ("status", "seconds", "budget_s", "error", "errors")
        }
        for name, figure in data.get("figures", {}).items():
            figures.append({"group": group, "name": name, **figure})
    try:
        import torch

        versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    except ImportError:
        versions = {"torch": None, "cuda": None}
    summary = {
        "date": date,
        "dry_run": config.dry_run,
        "device": device.get("name"),
        "device_details": device,
        **versions,
        "python": platform.python_version(),
        "commit": git_commit(),
        "config": {k: v for k, v in asdict(config).items() if k != "budgets"},
        "suite_seconds": round(time.perf_counter() - started, 1),
        "steps": steps,
        "figures": figures,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def run_suite(config: Config, out: Path, logs: Path, only: list[str]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    deadline = started + config.total_budget_s
    for group in only or GROUPS:
        budget = float(config.budgets[group])
        remaining = deadline - time.perf_counter()
        if remaining < min(budget, 15.0):
            spent = f"the suite's budget of {config.total_budget_s:.0f} s was spent"
            data = {"group": group, "status": "skipped", "figures": {}, "details": {},
                    "errors": {}, "budget_s": budget, "error": spent}  # fmt: skip
            (out / f"{group}.json").write_text(json.dumps(data, indent=2))
        else:
            data = launch(config, group, out, logs, min(budget, remaining))
        line = f"{group:15} {data['status']:9} {data.get('seconds', 0):6.1f} s"
        if data.get("error") or data.get("errors"):
            line += f"  {data.get('error') or data.get('errors')}"
        print(line, flush=True)
        write_summary(config, out, started, date)
    summary = write_summary(config, out, started, date)
    print(f"\n{summary['device']}  torch {summary['torch']}  cuda {summary['cuda']}  "
          f"{summary['suite_seconds']} s  ->  {out}/summary.json")  # fmt: skip
    for figure in summary["figures"]:
        print(
            f"  {figure['group']:15} {figure['name']:45} {figure['value']!s:>14} {figure['unit']}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where the JSON files go")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, about a minute")
    parser.add_argument("--only", default="", help=f"comma-separated groups of {','.join(GROUPS)}")
    parser.add_argument("--logs", type=Path, help="step logs (default: a temporary folder)")
    parser.add_argument("--budget-s", type=float, help="the whole suite's time budget")
    parser.add_argument("--step", choices=GROUPS, help=argparse.SUPPRESS)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--marker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--grpc-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = DRY if args.dry_run else FULL
    if args.budget_s:
        config = replace(config, total_budget_s=args.budget_s)
    logs = args.logs or Path(tempfile.gettempdir()) / "myriad-gpu-suite-logs"
    if args.serve:
        serve_synthetic(config, args.serve, args.port, args.marker, args.grpc_port)
        return 0
    if args.step:
        run_step(config, args.step, args.out, logs)
        return 0
    only = [g for g in args.only.split(",") if g]
    unknown = sorted(set(only) - set(GROUPS))
    if unknown:
        parser.error(f"unknown groups {unknown}; choose from {', '.join(GROUPS)}")
    return run_suite(config, args.out, logs, only)


if __name__ == "__main__":
    raise SystemExit(main())
