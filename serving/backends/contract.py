"""The model contract every backend implements, the answers it returns, and the repository
over one backend's models."""

from __future__ import annotations

import abc
import enum
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from packing.errors import MyriadError
from serving.backends.ondemand import OnDemandSettings, OnDemandTier, expected_bytes
from serving.build.modeling import configure_tokenizer
from serving.errors import DeadlineExceeded, InvalidInput, ModelNotFound, NotSupported
from serving.store import ArtifactStore, StoreError, materialize


class ModelState(enum.StrEnum):
    PENDING = "pending"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    # On demand: the artifact is verified in the local cache, the model is not in memory.
    UNLOADED = "unloaded"


# Sequence lengths are cut to a multiple of this past each batch's longest text.
TRIM_MULTIPLE = 8

# What loading an artifact can raise: the model is then FAILED with the reason.
LOAD_ERRORS = (StoreError, OSError, RuntimeError, KeyError, ValueError, ImportError)


@dataclass(frozen=True)
class Artifact:
    """A traced model's files on local disk, with what every backend reads from them."""

    directory: Path
    task: str
    max_length: int
    labels: list[str]
    tokenizer: Tokenizer


def open_artifact(store: ArtifactStore, prefix: str, cache_dir: Path | None) -> Artifact:
    directory, manifest = materialize(store, prefix, cache_dir)
    meta = manifest.metadata
    max_length = int(meta["max_length"])
    return Artifact(
        directory=directory,
        task=meta["task"],
        max_length=max_length,
        labels=list(meta.get("labels", [])),
        tokenizer=configure_tokenizer(
            Tokenizer.from_file(str(directory / "tokenizer.json")), max_length
        ),
    )


class ServingModel(abc.ABC):
    """The model contract every backend implements (TorchScript per model, the cross-model
    engine; Neuron and CUDA graphs next): load, state and reason, describe, and ``submit``,
    which queues texts on the backend's own scheduler and returns a future per text, so no
    thread waits for a result. ``predict`` is the blocking form, for loaders and scripts."""

    model_id: str
    processor: str
    prefix: str
    state: ModelState
    reason: str | None
    task: str
    max_length: int
    memory_bytes: int
    load_seconds: float

    @abc.abstractmethod
    def load(self, store: ArtifactStore, cache_dir: Path | None) -> None: ...

    @abc.abstractmethod
    def submit(self, texts: list[str], raw: bool = False) -> list[Future]: ...

    def predict(self, texts: list[str], raw: bool = False) -> list[dict]:
        return [future.result() for future in self.submit(texts, raw)]

    def predict_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, raw: bool = False
    ) -> list[dict]:
        raise InvalidInput(f"model {self.model_id} takes text; send a BYTES input")

    def forward_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Rows a front end tokenised: the output rows as float32 (blocking). A backend with a
        scheduler for ids offers ``submit_ids`` instead, as the cross-model engine does."""
        raise InvalidInput(f"model {self.model_id} takes text; send a BYTES input")

    def expected_bytes(self, directory: Path, manifest: Any) -> int:
        """What the model will hold once loaded, before it has been: its artifact's largest
        file (a backend that counts otherwise says so)."""
        return expected_bytes(manifest)

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY

    def describe(self) -> dict:
        return describe(self)


def answers(task: str, labels: list[str], output: torch.Tensor, raw: bool) -> list[dict]:
    """The JSON answers for a batch of outputs of one model: vectors for embeddings, logits
    when ``raw``, else the best label with its probability and every label's probability."""
    rows = len(output)
    return answer_rows(task, output, [labels] * rows, [raw] * rows)


def answer_rows(
    task: str, output: torch.Tensor | np.ndarray, labels: Sequence[list[str]], raw: Sequence[bool]
) -> list[dict]:
    """:func:`answers` for a batch whose rows may belong to different models (``labels[i]``)
    and ask for different forms (``raw[i]``): one softmax over the whole batch in numpy, one
    conversion to Python floats, no tensor op per row."""
    # A front end's rows arrive as numpy (serving.http.frontend); a backend's as a tensor.
    values = output if isinstance(output, np.ndarray) else output.float().numpy()
    if task == "embedding":
        return [{"embedding": row} for row in values.tolist()]
    shifted = np.exp(values - values.max(axis=-1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=-1, keepdims=True)
    best = probabilities.argmax(axis=-1).tolist()
    results = []
    for logits, row, top, names, as_logits in zip(
        values.tolist(), probabilities.tolist(), best, labels, raw, strict=True
    ):
        if as_logits:
            results.append({"logits": logits})
            continue
        if len(names) < len(row):
            names = [*names, *(str(i) for i in range(len(names), len(row)))]
        probabilities = dict(zip(names, row, strict=False))
        results.append({"label": names[top], "score": row[top], "probabilities": probabilities})
    return results


def describe(model: ServingModel) -> dict:
    """A model's entry in ``GET /models``: state, reason, task and memory."""
    return {
        "id": model.model_id,
        "processor": model.processor,
        "state": model.state.value,
        "reason": model.reason,
        "task": model.task or None,
        "max_length": model.max_length or None,
        "memory_bytes": model.memory_bytes,
        "load_seconds": round(model.load_seconds, 4),
    }


def claim(queued: list) -> list:
    """The queued requests (anything with ``future`` and ``deadline``) still worth computing.

    Each future is marked running, so from here on its caller can no longer cancel it and no
    result lands on a cancelled future; a cancelled one is skipped, and one whose deadline
    passed while it waited gets :class:`DeadlineExceeded` instead of being computed.
    """
    now = time.monotonic()
    live = []
    for request in queued:
        if not request.future.set_running_or_notify_cancel():
            continue
        if request.deadline < now:
            request.future.set_exception(
                DeadlineExceeded("request waited past its deadline; not computed")
            )
        else:
            live.append(request)
    return live


class UnknownOnDemandModel(MyriadError, ValueError):
    """``--on-demand`` names a model the server does not serve."""


class ModelRepository(abc.ABC):
    """Owns the models of one server, all run by one backend: loads them in parallel, reports
    each one's state, and owns the backend's scheduler (``start``, ``queue_depth``, ``close``).

    With ``on_demand`` settings, the models it names are only verified into the local cache at
    start and loaded on their first request, under the budget of :meth:`budget_bytes`, by the
    :class:`serving.backends.ondemand.OnDemandTier` in ``tier`` (the backend supplies
    :meth:`load_on_demand` and :meth:`unload_on_demand`)."""

    def __init__(
        self,
        store: ArtifactStore,
        models: dict[str, ServingModel],
        processor: str = "cpu",
        cache_dir: Path | None = None,
        load_workers: int = 2,
        on_demand: OnDemandSettings | None = None,
    ) -> None:
        self.store = store
        self.cache_dir = cache_dir
        self.load_workers = load_workers
        self.processor = processor
        self.models = models
        self._loaded = threading.Event()
        # The metrics (anything with model_loaded / model_evicted), set by the server.
        self.observer: Any = None
        self.on_demand = on_demand or OnDemandSettings()
        self.tier: OnDemandTier | None = None
        if self.on_demand.model_ids:
            unknown = sorted(self.on_demand.model_ids - set(models))
            if unknown:
                raise UnknownOnDemandModel(
                    f"on-demand models {unknown[:5]} are not among this server's models"
                )
            self.tier = OnDemandTier(
                models,
                self.on_demand,
                self.budget_bytes(),
                self.load_on_demand,
                self.unload_on_demand,
            )

    def budget_bytes(self) -> int | None:
        """The bytes the tier's ledger may hold: the device's budget (host memory on CPU)."""
        return self.on_demand.memory_budget_bytes

    def load_on_demand(self, model_id: str) -> int:
        """Load one on-demand model now (in a tier's loader thread); return the bytes it holds,
        or raise with the reason it could not load."""
        raise NotSupported(f"{type(self).__name__} has no on-demand models")

    def unload_on_demand(self, model_id: str) -> None:
        """Drop one on-demand model (no work of it is in flight)."""
        raise NotSupported(f"{type(self).__name__} has no on-demand models")

    @abc.abstractmethod
    def start(self, workers: int = 1, on_batch: Any = None, **batching: Any) -> None:
        """Start the backend's scheduler; ``on_batch(model_id, texts)`` feeds the metrics."""

    @abc.abstractmethod
    def queue_depth(self) -> int:
        """Texts waiting for the scheduler."""

    @abc.abstractmethod
    def close(self) -> None:
        """Finish running batches, then stop the scheduler."""

    @abc.abstractmethod
    def load_model(self, model_id: str) -> ServingModel | None:
        """(Re)load one model in the background, or raise NotSupported."""

    @abc.abstractmethod
    def unload_model(self, model_id: str) -> None: ...

    def get(self, model_id: str) -> ServingModel:
        try:
            return self.models[model_id]
        except KeyError:
            raise ModelNotFound(model_id) from None

    def is_on_demand(self, model_id: str) -> bool:
        return self.tier is not None and self.tier.manages(model_id)

    def load_models(self) -> None:
        """Load the resident models; verify the on-demand ones' artifacts into the cache."""

        def start(model: ServingModel) -> None:
            if self.is_on_demand(model.model_id):
                self.verify(model)
            else:
                model.load(self.store, self.cache_dir)

        # A few workers bound peak memory (one artifact being read per worker) while still
        # overlapping store I/O with deserialisation.
        with ThreadPoolExecutor(max_workers=self.load_workers, thread_name_prefix="load") as pool:
            list(pool.map(start, self.models.values()))

    def verify(self, model: ServingModel) -> None:
        """An on-demand model's artifact fetched and checked into the local cache: UNLOADED, or
        FAILED with the reason (its first request tries again)."""
        assert self.tier is not None
        try:
            directory, manifest = materialize(self.store, model.prefix, self.cache_dir)
        except LOAD_ERRORS as exc:
            model.state, model.reason = ModelState.FAILED, f"{type(exc).__name__}: {exc}"
            self.tier.verified(model.model_id, 0, model.reason)
            return
        model.state, model.reason = ModelState.UNLOADED, None
        self.tier.verified(model.model_id, model.expected_bytes(directory, manifest))

    def finish_loading(self) -> None:
        """After the start's loads: the resident models' bytes into the ledger and their load
        times to the metrics; on-demand loads may begin."""
        for model in self.models.values():
            if self.is_on_demand(model.model_id) or not model.ready:
                continue
            if self.tier is not None:
                self.tier.resident_loaded(model.model_id, model.memory_bytes)
            if self.observer is not None:
                self.observer.model_loaded(model.model_id, model.load_seconds)
        if self.tier is not None:
            self.tier.residents_in()
        self._loaded.set()

    def load_all(self) -> None:
        self.load_models()
        self.finish_loading()

    @property
    def loaded(self) -> bool:
        """Every model has been tried (each is ready or failed)."""
        return self._loaded.is_set()

    @property
    def ready(self) -> bool:
        """Every resident model loaded and every on-demand model's artifact verified."""
        if not self._loaded.is_set():
            return False
        if self.tier is not None and not self.tier.ready:
            return False
        return all(m.ready for m in self.models.values() if not self.is_on_demand(m.model_id))

    def close_tier(self) -> None:
        if self.tier is not None:
            self.tier.close()

    def failed(self) -> list[ServingModel]:
        return [m for m in self.models.values() if m.state is ModelState.FAILED]

    def describe(self) -> list[dict]:
        return [m.describe() for m in self.models.values()]
