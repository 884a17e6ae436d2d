"""Trace a model for a processor, check the trace against the eager model, profile it and commit
the artifact to the store. The whole step is keyed by a content hash, so an unchanged model is
never traced twice.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgspec
import torch

from packing.contracts import ModelSpec, Precision, Processor
from packing.errors import MyriadError
from serving.build import sources
from serving.build.modeling import EagerModel, configure_tokenizer, encode, load_eager, tensor_bytes
from serving.process import resident_bytes
from serving.store import (
    MANIFEST_NAME,
    ArtifactStore,
    FileStore,
    artifact_prefix,
    build_manifest,
    open_store,
    put_artifact,
    read_manifest,
    sha256_text,
)

# Bump when the traced artifact would differ for the same source and settings.
TRACE_FORMAT_VERSION = 1

# At most this many loads per load figure (fewer when ``profile_repeats`` is lower); the profile
# keeps their median. Not a TraceSettings field: that would change every trace key.
LOAD_TRIES = 3

PARITY_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Serving thousands of models at once is mostly a packing problem.",
    "ok",
    "A much longer sentence that keeps going, so that the attention mask and the padding both "
    "matter for the result, with numbers like 3.14 and 2,718 and punctuation!",
]


class TraceError(MyriadError, RuntimeError):
    """Tracing, the parity check or profiling failed; the message names the model."""


class TraceSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    precision: Precision | None = None  # None: fp32 on cpu, fp16 on gpu, bf16 on inf
    profile_batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    profile_repeats: int = 5
    # Absolute tolerance of the parity check on the traced output (logits or unit vectors).
    parity_atol_fp32: float = 1e-4
    parity_atol_half: float = 3e-2
    neuron_pipeline_cores: int | None = None

    def precision_for(self, processor: Processor) -> Precision:
        if self.precision is not None:
            return self.precision
        return {"cpu": "fp32", "gpu": "fp16", "inf": "bf16"}[processor]


@dataclass(frozen=True)
class TraceResult:
    model_id: str
    processor: str
    prefix: str
    trace_key: str
    cached: bool
    seconds: float
    profile: dict


def trace_key(
    spec: ModelSpec, processor: Processor, settings: TraceSettings, content_hash: str
) -> str:
    return sha256_text(
        sources.canonical_json(
            {
                "format": TRACE_FORMAT_VERSION,
                "source": content_hash,
                "processor": processor,
                "task": spec.task,
                "max_length": spec.max_length,
                "num_labels": spec.num_labels,
                "settings": msgspec.to_builtins(settings),
                "torch": torch.__version__.split("+")[0],
            }
        )
    )


def trace_to_store(
    spec: ModelSpec,
    processor: Processor,
    store: ArtifactStore,
    settings: TraceSettings | None = None,
    *,
    base_dir: Path | None = None,
    force: bool = False,
) -> TraceResult:
    """Trace ``spec`` for ``processor`` unless the store already holds this exact trace."""
    settings = settings or TraceSettings()
    started = time.perf_counter()
    source = sources.resolve(spec, base_dir)
    key = trace_key(spec, processor, settings, source.content_hash)
    prefix = artifact_prefix(spec.id, processor)
    existing = read_manifest(store, prefix)
    if existing is not None and existing.metadata.get("trace_key") == key and not force:
        profile = json.loads(store.get_bytes(f"{prefix}/profile.json"))
        return TraceResult(spec.id, processor, prefix, key, True, 0.0, profile)

    device = _device_for(processor)
    eager = load_eager(spec, source)
    with tempfile.TemporaryDirectory(prefix=f"myriad-trace-{spec.id}-") as tmp:
        # The artifact is written where a file store rooted at ``scratch`` holds it, so that a
        # server's own loader can load it from there (see :func:`measure_load`).
        scratch = FileStore(Path(tmp) / "store")
        out = scratch.root / prefix
        out.mkdir(parents=True)
        precision = settings.precision_for(processor)
        traced = _trace(spec, processor, eager, precision, device, settings)
        torch.jit.save(traced, str(out / "model.ts"))
        _save_weights(eager, out / "weights.safetensors")
        (out / "config.json").write_text(eager.config_json)
        eager.tokenizer.save(str(out / "tokenizer.json"))
        max_error = parity_check(spec, eager, traced, precision, device, settings)
        profile = profile_artifact(out / "model.ts", spec, processor, eager, device, settings)
        profile["parity_max_abs_error"] = max_error
        metadata = {
            "trace_key": key,
            "model_id": spec.id,
            "processor": processor,
            "task": spec.task,
            "max_length": spec.max_length,
            "precision": precision,
            "labels": eager.labels,
            "source": spec.source,
            "source_hash": source.content_hash,
        }
        tries = max(1, min(settings.profile_repeats, LOAD_TRIES))
        (out / "profile.json").write_text(json.dumps(profile, indent=2))
        (out / MANIFEST_NAME).write_bytes(msgspec.json.encode(build_manifest(out, metadata)))
        engine = profile["engine_bytes"] is not None
        loaded = measure_load(scratch, spec.id, processor, tries, engine=engine)
        profile.update(loaded)
        remote = store.local_path(prefix) is None
        if not remote:
            # Servers read a file store's artifact in place: no fetch, so a load from the store
            # is the load from the cache.
            profile.update(_from_store(loaded))
        (out / "profile.json").write_text(json.dumps(profile, indent=2))
        put_artifact(store, prefix, out, metadata)
        if remote:
            fetched = measure_load(
                store, spec.id, processor, tries, engine=engine, fresh_cache=True
            )
            profile.update(_from_store(fetched))
            (out / "profile.json").write_text(json.dumps(profile, indent=2))
            _recommit_profile(store, prefix, out, metadata)
    seconds = time.perf_counter() - started
    return TraceResult(spec.id, processor, prefix, key, False, seconds, profile)


def _device_for(processor: Processor) -> torch.device:
    if processor == "gpu":
        if not torch.cuda.is_available():
            raise TraceError("processor 'gpu' asked for, but torch sees no CUDA device here")
        return torch.device("cuda")
    return torch.device("cpu")


def _dtype(precision: Precision) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _example_inputs(
    spec: ModelSpec, eager: EagerModel, device: torch.device, batch: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = configure_tokenizer(eager.tokenizer, spec.max_length)
    texts = (PARITY_TEXTS * batch)[:batch]
    input_ids, attention_mask = encode(tokenizer, texts)
    return input_ids.to(device), attention_mask.to(device)


def _trace(
    spec: ModelSpec,
    processor: Processor,
    eager: EagerModel,
    precision: Precision,
    device: torch.device,
    settings: TraceSettings,
) -> torch.jit.ScriptModule:
    example = _example_inputs(spec, eager, device)
    if processor == "inf":
        return _trace_neuron(spec, eager, example, settings)
    module = eager.module.to(device=device, dtype=_dtype(precision))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The trace is fixed to max_length tokens; the warnings are about exactly that.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(module, example, check_trace=False)
    except Exception as exc:  # torch raises many types here; all mean "cannot trace"
        raise TraceError(f"model {spec.id}: torch.jit.trace failed: {exc}") from exc
    finally:
        eager.module.to(device="cpu", dtype=torch.float32)
    return traced


def _trace_neuron(
    spec: ModelSpec,
    eager: EagerModel,
    example: tuple[torch.Tensor, torch.Tensor],
    settings: TraceSettings,
) -> torch.jit.ScriptModule:
    compiler_args = []
    if settings.neuron_pipeline_cores:
        compiler_args = ["--neuroncore-pipeline-cores", str(settings.neuron_pipeline_cores)]
    try:
        # inf2 and trn1 (what Dockerfiles/inf.Dockerfile installs).
        import torch_neuronx
    except ImportError:
        torch_neuronx = None
    if torch_neuronx is not None:
        return torch_neuronx.trace(eager.module, example, compiler_args=compiler_args)
    try:
        import torch_neuron  # noqa: F401  (inf1; registers torch.neuron)
    except ImportError:
        raise TraceError(
            f"model {spec.id}: processor 'inf' needs torch-neuronx (inf2, trn1) or torch-neuron "
            "(inf1) from the AWS Neuron SDK (pip install torch-neuronx --extra-index-url "
            "https://pip.repos.neuron.amazonaws.com); neither is installed here"
        ) from None
    return torch.neuron.trace(eager.module, example, compiler_args=compiler_args)  # type: ignore[attr-defined]


def parity_check(
    spec: ModelSpec,
    eager: EagerModel,
    traced: torch.jit.ScriptModule,
    precision: Precision,
    device: torch.device,
    settings: TraceSettings,
) -> float:
    """Compare traced and eager fp32 outputs at several batch sizes; raise past the tolerance."""
    tolerance = settings.parity_atol_fp32 if precision == "fp32" else settings.parity_atol_half
    worst = 0.0
    for batch in (1, len(PARITY_TEXTS)):
        input_ids, attention_mask = _example_inputs(spec, eager, torch.device("cpu"), batch)
        with torch.no_grad():
            expected = eager.module(input_ids, attention_mask).float()
            got = traced(input_ids.to(device), attention_mask.to(device)).float().cpu()
        if got.shape != expected.shape:
            raise TraceError(
                f"model {spec.id}: traced output shape {tuple(got.shape)} differs from eager "
                f"{tuple(expected.shape)}"
            )
        worst = max(worst, float((got - expected).abs().max()))
    if not worst <= tolerance:
        raise TraceError(
            f"model {spec.id}: traced output differs from eager by {worst:.3g} "
            f"(tolerance {tolerance:g} at {precision})"
        )
    return worst


def _save_weights(eager: EagerModel, path: Path) -> None:
    from safetensors.torch import save_model

    save_model(eager.module, str(path))


def profile_artifact(
    model_path: Path,
    spec: ModelSpec,
    processor: Processor,
    eager: EagerModel,
    device: torch.device,
    settings: TraceSettings,
) -> dict:
    """Resident memory (device and host) and seconds per request at each batch size, measured
    on this machine.

    On CPU it measures one intra-op thread, as servers run (serving.http.server), so that the
    packer's CPU capacity (one request per physical core) matches what is profiled.
    """
    with _intra_op_threads(1 if device.type == "cpu" else torch.get_num_threads()):
        rss_before = resident_bytes()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        module = torch.jit.load(str(model_path), map_location=device)
        weights_bytes = tensor_bytes(module.state_dict().values())
        timings: dict[str, float] = {}
        with torch.no_grad():
            for batch in settings.profile_batch_sizes:
                input_ids, attention_mask = _example_inputs(spec, eager, device, batch)
                module(input_ids, attention_mask)  # warm-up: first calls run the profiling executor
                samples = []
                for _ in range(settings.profile_repeats):
                    start = time.perf_counter()
                    module(input_ids, attention_mask)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    samples.append(time.perf_counter() - start)
                timings[str(batch)] = statistics.median(samples)
        host_growth = resident_bytes() - rss_before
        if device.type == "cuda":
            measured = torch.cuda.max_memory_allocated() - base
        else:
            measured = host_growth
        # Freed pages from earlier work can be reused, so RSS growth can undercount; the weights
        # themselves are a floor.
        memory_bytes = max(measured, weights_bytes)
        # What the model keeps of the host's RAM in a server: on a CPU its memory itself; on
        # an accelerator what loading it left resident beside the device's copy.
        host_memory_bytes = memory_bytes if device.type == "cpu" else max(host_growth, 0)
        best_batch = min(timings, key=lambda b: timings[b] / int(b))
        return {
            "engine_bytes": _engine_bytes(eager, spec),
            "processor": processor,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else _cpu_name(),
            "torch_threads": torch.get_num_threads(),
            "max_length": spec.max_length,
            "weights_bytes": weights_bytes,
            "measured_bytes": measured,
            "memory_bytes": memory_bytes,
            "host_memory_bytes": host_memory_bytes,
            "seconds_per_batch": timings,
            "batch_size": int(best_batch),
            "seconds_per_request": timings[best_batch] / int(best_batch),
            "seconds_per_request_batch1": timings[str(min(settings.profile_batch_sizes))],
        }


def measure_load(
    store: ArtifactStore,
    model_id: str,
    processor: Processor,
    tries: int = LOAD_TRIES,
    *,
    engine: bool = False,
    fresh_cache: bool = False,
) -> dict[str, float]:
    """Seconds to load the committed artifact of ``model_id`` from ``store`` with a server's own
    loaders (what its on-demand tier calls on a cold start): ``load_seconds`` for the
    TorchScript backend (verify, tokenizer, ``torch.jit.load``, the warm-up calls), the median
    of ``tries``; and with ``engine`` also ``engine_load_seconds`` for the cross-model engine
    (verify, rebuild, extract the weights; writing them into the engine's weight bank is not
    counted), one try only: it rebuilds the eager model, the slowest load (MiniLM: 0.9 s).

    With ``fresh_cache`` each try starts from an empty local cache, so a remote store's
    artifact is fetched first, as on a server that never held it.
    """
    from serving.backends.contract import ModelState, ServingModel
    from serving.backends.crossmodel import CrossModel
    from serving.backends.torchscript import TorchScriptModel

    prefix = artifact_prefix(model_id, processor)
    makers: dict[str, Callable[[], ServingModel]] = {
        "load_seconds": lambda: TorchScriptModel(model_id, processor, prefix)
    }
    if engine:
        makers["engine_load_seconds"] = lambda: CrossModel(model_id, processor)
    figures = {}
    # Servers compute with one intra-op thread on a CPU (as profile_artifact measures).
    with _intra_op_threads(1 if processor == "cpu" else torch.get_num_threads()):
        for key, make in makers.items():
            samples = []
            for _ in range(tries if key == "load_seconds" else 1):
                with tempfile.TemporaryDirectory(prefix="myriad-load-") as cache:
                    model = make()
                    started = time.perf_counter()
                    model.load(store, Path(cache) if fresh_cache else None)
                    samples.append(time.perf_counter() - started)
                    if model.state is ModelState.FAILED:
                        raise TraceError(
                            f"model {model_id}: a server could not load the traced artifact: "
                            f"{model.reason}"
                        )
                    del model
            figures[key] = statistics.median(samples)
    return figures


def _from_store(figures: dict[str, float]) -> dict[str, float]:
    """Load figures under the names of loads from the store: ``store_load_seconds`` and
    ``engine_store_load_seconds``."""
    return {key.replace("load_seconds", "store_load_seconds"): v for key, v in figures.items()}


def _recommit_profile(store: ArtifactStore, prefix: str, out: Path, metadata: dict) -> None:
    """Replace the committed artifact's profile.json with ``out``'s, under put_artifact's
    protocol (the manifest goes first and comes back last), without uploading the unchanged
    files again."""
    manifest = build_manifest(out, metadata)
    store.delete(f"{prefix}/{MANIFEST_NAME}")
    store.put_file(f"{prefix}/profile.json", out / "profile.json")
    store.put_bytes(f"{prefix}/{MANIFEST_NAME}", msgspec.json.encode(manifest))


@contextmanager
def _intra_op_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _engine_bytes(eager: EagerModel, spec: ModelSpec) -> dict[str, int] | None:
    """Bytes per model in the cross-model engine at each precision; None for non-BERT models."""
    from serving.backends.weightbank import CrossModelError, bert_weights, planned_bytes

    try:
        shape, _ = bert_weights(eager.module, spec.task)
    except CrossModelError:
        return None
    return planned_bytes(shape)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def stored_profiles(jobs: list[str], store_uri: str | None) -> list[dict]:
    """The stored profile of each ``id/processor`` job, in the shape of a trace result; a
    job never traced into ``store_uri`` is a ValueError naming it."""
    store = open_store(store_uri)
    results = []
    for job in jobs:
        model_id, processor = job.rsplit("/", 1)
        prefix = artifact_prefix(model_id, processor)
        manifest = read_manifest(store, prefix)
        if manifest is None:
            raise ValueError(
                f"model {model_id} has no {processor} trace in {store.uri}; trace it first "
                "(the myriad-trace flow)"
            )
        results.append(
            {
                "model_id": model_id,
                "processor": processor,
                "prefix": prefix,
                "trace_key": manifest.metadata.get("trace_key"),
                "cached": True,
                "seconds": 0.0,
                "profile": json.loads(store.get_bytes(f"{prefix}/profile.json")),
            }
        )
    return results
