"""The model contract (load, ready, predict) and the repository that owns loading."""

from __future__ import annotations

import abc
import enum
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from serving.errors import InvalidInput, ModelNotFound, ModelNotReady, NotSupported  # noqa: F401
from serving.modeling import configure_tokenizer, encode, tensor_bytes
from serving.store import ArtifactStore, StoreError, materialize
from serving.tracing import artifact_prefix


class ModelState(enum.StrEnum):
    PENDING = "pending"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


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

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY

    def describe(self) -> dict:
        return describe(self)


@dataclass
class ServedModel(ServingModel):
    """A traced model from the store, with its tokenizer and post-processing; its texts are
    batched by the repository's :class:`serving.batching.Batcher` once one is attached."""

    model_id: str
    processor: str
    prefix: str
    state: ModelState = ModelState.PENDING
    reason: str | None = None
    task: str = ""
    max_length: int = 0
    labels: list[str] = field(default_factory=list)
    memory_bytes: int = 0
    load_seconds: float = 0.0
    module: torch.jit.ScriptModule | None = None
    tokenizer: Tokenizer | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    scheduler: Any = None  # serving.batching.Batcher

    def load(self, store: ArtifactStore, cache_dir: Path | None) -> None:
        started = time.perf_counter()
        self.state = ModelState.LOADING
        try:
            artifact = open_artifact(store, self.prefix, cache_dir)
            self.task, self.max_length = artifact.task, artifact.max_length
            self.labels, self.tokenizer = artifact.labels, artifact.tokenizer
            if self.processor == "gpu":
                self.device = torch.device("cuda")
            elif self.processor == "inf":
                load_neuron_runtime()
            self.module = torch.jit.load(
                str(artifact.directory / "model.ts"), map_location=self.device
            )
            self.memory_bytes = tensor_bytes(self.module.state_dict().values())
            # TorchScript's profiling executor optimises the graph over the first two calls;
            # doing them here keeps that cost off the first real requests.
            self.state = ModelState.READY
            for _ in range(2):
                self.predict(["warm-up"])
        except LOAD_ERRORS as exc:
            self.state = ModelState.FAILED
            self.reason = f"{type(exc).__name__}: {exc}"
            return
        finally:
            self.load_seconds = time.perf_counter() - started
        self.state = ModelState.READY

    def submit(self, texts: list[str], raw: bool = False) -> list[Future]:
        if self.scheduler is None:
            done: list[Future] = []
            for answer in self.predict(texts, raw):
                done.append(Future())
                done[-1].set_result(answer)
            return done
        return self.scheduler.submit(self, texts, raw)

    def predict(self, texts: list[str], raw: bool = False) -> list[dict]:
        """Run one batch now; safe to call from worker threads (TorchScript releases the GIL)."""
        if not self.ready or self.module is None or self.tokenizer is None:
            raise ModelNotReady(self.model_id, self.state, self.reason)
        if not texts:
            raise InvalidInput("no text given")
        return answers(self.task, self.labels, self.forward(texts), raw)

    def forward(self, texts: list[str]) -> torch.Tensor:
        """The model's raw output rows (logits or vectors) for a batch of texts."""
        if not self.ready or self.module is None or self.tokenizer is None:
            raise ModelNotReady(self.model_id, self.state, self.reason)
        # Neuron graphs are compiled for one shape; CPU and CUDA traces take any length.
        trim = None if self.processor == "inf" else TRIM_MULTIPLE
        input_ids, attention_mask = encode(self.tokenizer, texts, trim_to=trim)
        with torch.inference_mode():
            output = self.module(input_ids.to(self.device), attention_mask.to(self.device))
        return output.float().cpu()

    def predict_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, raw: bool = False
    ) -> list[dict]:
        """Run token ids the client tokenised itself (KServe v2 INT64 input)."""
        if not self.ready or self.module is None:
            raise ModelNotReady(self.model_id, self.state, self.reason)
        if input_ids.shape[1] > self.max_length:
            raise InvalidInput(
                f"{input_ids.shape[1]} tokens; model {self.model_id} takes at most "
                f"{self.max_length}"
            )
        vocab = self.tokenizer.get_vocab_size() if self.tokenizer is not None else None
        if int(input_ids.min()) < 0 or (vocab is not None and int(input_ids.max()) >= vocab):
            raise InvalidInput(
                f"input_ids must lie in [0, {vocab}): the vocabulary of model {self.model_id}"
            )
        with torch.inference_mode():
            output = self.module(input_ids.to(self.device), attention_mask.to(self.device))
        return answers(self.task, self.labels, output.float().cpu(), raw)


def load_neuron_runtime() -> None:
    """Register the Neuron ops a traced ``inf`` artifact uses: torch-neuronx (inf2, trn1) or
    torch-neuron (inf1)."""
    import importlib

    for module in ("torch_neuronx", "torch_neuron"):
        try:
            importlib.import_module(module)
            return
        except ImportError:
            continue
    raise ImportError("processor 'inf' needs torch-neuronx (inf2, trn1) or torch-neuron (inf1)")


def answers(task: str, labels: list[str], output: torch.Tensor, raw: bool) -> list[dict]:
    """The JSON answers for a batch of outputs of one model: vectors for embeddings, logits
    when ``raw``, else the best label with its probability and every label's probability."""
    rows = len(output)
    return answer_rows(task, output, [labels] * rows, [raw] * rows)


def answer_rows(
    task: str, output: torch.Tensor, labels: Sequence[list[str]], raw: Sequence[bool]
) -> list[dict]:
    """:func:`answers` for a batch whose rows may belong to different models (``labels[i]``)
    and ask for different forms (``raw[i]``): one softmax over the whole batch in numpy, one
    conversion to Python floats, no tensor op per row."""
    values = output.float().numpy()
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


class ModelRepository:
    """Owns the models of one server: loads them in parallel and reports each one's state."""

    def __init__(
        self,
        store: ArtifactStore,
        model_ids: Iterable[str],
        processor: str = "cpu",
        cache_dir: Path | None = None,
        load_workers: int = 2,
    ) -> None:
        self.store = store
        self.cache_dir = cache_dir
        self.load_workers = load_workers
        self.processor = processor
        self.models: dict[str, ServingModel] = {
            model_id: ServedModel(model_id, processor, artifact_prefix(model_id, processor))
            for model_id in model_ids
        }
        self.batcher: Any = None
        self._loaded = threading.Event()

    def start(self, workers: int = 1, on_batch: Any = None, **batching: Any) -> None:
        """Start the backend's scheduler: a :class:`serving.batching.Batcher` over ``workers``
        compute threads, with its settings; ``on_batch(model_id, texts)`` for the metrics."""
        from serving.batching import Batcher

        self.batcher = Batcher(workers=workers, on_batch=on_batch, **batching)
        for model in self.models.values():
            model.scheduler = self.batcher

    def queue_depth(self) -> int:
        """Texts waiting for the scheduler."""
        return self.batcher.waiting if self.batcher is not None else 0

    def close(self) -> None:
        """Finish running batches, then stop the scheduler."""
        if self.batcher is not None:
            self.batcher.close()

    def get(self, model_id: str) -> ServingModel:
        try:
            return self.models[model_id]
        except KeyError:
            raise ModelNotFound(model_id) from None

    def load_all(self) -> None:
        # A few workers bound peak memory (one artifact being read per worker) while still
        # overlapping store I/O with deserialisation.
        with ThreadPoolExecutor(max_workers=self.load_workers, thread_name_prefix="load") as pool:
            list(pool.map(lambda m: m.load(self.store, self.cache_dir), self.models.values()))
        self._loaded.set()

    @property
    def ready(self) -> bool:
        return self._loaded.is_set() and all(m.ready for m in self.models.values())

    @property
    def finished_loading(self) -> bool:
        return self._loaded.is_set()

    def failed(self) -> list[ServingModel]:
        return [m for m in self.models.values() if m.state is ModelState.FAILED]

    def describe(self) -> list[dict]:
        return [m.describe() for m in self.models.values()]

    def load_model(self, model_id: str) -> ServedModel:
        """(Re)load one model from the store in the background; the old copy, if any, keeps
        answering until the new one is ready. Returns the copy being loaded."""
        fresh = ServedModel(model_id, self.processor, artifact_prefix(model_id, self.processor))
        fresh.scheduler = self.batcher
        previous = self.models.get(model_id)

        def run() -> None:
            fresh.load(self.store, self.cache_dir)
            if fresh.ready or previous is None:
                self.models[model_id] = fresh

        if previous is None:
            self.models[model_id] = fresh
        threading.Thread(target=run, name=f"load-{model_id}", daemon=True).start()
        return fresh

    def unload_model(self, model_id: str) -> None:
        self.get(model_id)
        del self.models[model_id]
