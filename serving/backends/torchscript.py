"""The TorchScript backend: one traced module per model, with per-model dynamic batching by one
fair scheduler for all the models of a server.

Each model has its own bounded queue. When a worker is free, the scheduler thread visits models
round-robin; a model is due when it has ``max_batch`` texts waiting or its oldest has waited
``max_wait_s`` (0, the default: at once, so batches form only from what arrived while the
workers were busy, and a lone request pays no delay). Due batches run on a small worker pool
(the server's compute threads), so the event loop never computes, and one busy model cannot
starve the others: each gets at most one batch per turn.
Full queues refuse at once (:class:`Overloaded`, 503 with Retry-After); a text whose deadline
passed while it waited is dropped (:class:`DeadlineExceeded`) and never computed.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from serving.backends.contract import (
    LOAD_ERRORS,
    TRIM_MULTIPLE,
    ModelRepository,
    ModelState,
    ServingModel,
    answer_rows,
    answers,
    claim,
    open_artifact,
)
from serving.backends.ondemand import ColdLoadFailed, OnDemandSettings
from serving.build.modeling import encode, tensor_bytes
from serving.errors import InvalidInput, ModelNotReady, NotSupported, Overloaded
from serving.store import ArtifactStore, artifact_prefix


@dataclass
class _Item:
    text: str
    raw: bool
    arrived: float
    deadline: float
    future: Future = field(default_factory=Future)


class Batcher:
    def __init__(
        self,
        max_batch: int = 16,
        max_wait_s: float = 0.0,
        per_model_queue: int = 256,
        total_queue: int = 4096,
        deadline_s: float = 30.0,
        workers: int = 1,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.per_model_queue = per_model_queue
        self.total_queue = total_queue
        self.deadline_s = deadline_s
        self.on_batch = on_batch
        self.queues: dict[str, deque[_Item]] = {}
        self.models: dict[str, TorchScriptModel] = {}
        self.waiting = 0
        self.batches = 0
        self.batch_sizes: deque[int] = deque(maxlen=1024)
        self._busy = threading.Semaphore(workers)
        self._pool = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batch")
            if workers > 1
            else None
        )
        self._lock = threading.Condition()
        self._order: deque[str] = deque()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    def submit(self, model: TorchScriptModel, texts: list[str], raw: bool = False) -> list[Future]:
        now = time.monotonic()
        items = [_Item(t, raw, now, now + self.deadline_s) for t in texts]
        with self._lock:
            queue = self.queues.setdefault(model.model_id, deque())
            if len(queue) + len(items) > self.per_model_queue:
                raise Overloaded(
                    f"model {model.model_id} has {len(queue)} texts waiting; retry shortly"
                )
            if self.waiting + len(items) > self.total_queue:
                raise Overloaded(f"{self.waiting} texts are waiting in this server; retry shortly")
            if not queue:
                self._order.append(model.model_id)
            self.models[model.model_id] = model
            queue.extend(items)
            self.waiting += len(items)
            self._lock.notify()
        return [item.future for item in items]

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(timeout=5)
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _run(self) -> None:
        while True:
            # Wait for a free worker first: while all are busy, texts keep arriving and the
            # next batch grows (batching under load without a fixed delay at low load).
            self._busy.acquire()
            with self._lock:
                batch = None
                while batch is None:
                    if self._stop:
                        self._busy.release()
                        return
                    batch, wait = self._next_due()
                    if batch is None:
                        self._lock.wait(timeout=wait)
            model_id, items = batch
            if self._pool is None:
                # One compute thread: this one. A hand-off to a pool would cost a wake-up
                # per batch and buy nothing, as the next batch waits for this one anyway.
                self._execute(model_id, items)
            else:
                self._pool.submit(self._execute, model_id, items)

    def _next_due(self) -> tuple[tuple[str, list[_Item]] | None, float | None]:
        """The next model in round-robin order with a full batch or an old enough head; else
        how long until the earliest head comes due."""
        now = time.monotonic()
        soonest = None
        for _ in range(len(self._order)):
            model_id = self._order[0]
            self._order.rotate(-1)
            queue = self.queues[model_id]
            if not queue:
                continue
            due = queue[0].arrived + self.max_wait_s
            if len(queue) >= self.max_batch or due <= now:
                items = [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
                self.waiting -= len(items)
                if not queue:
                    self._order.remove(model_id)
                return (model_id, items), None
            soonest = due if soonest is None else min(soonest, due)
        return None, None if soonest is None else max(0.0, soonest - now)

    def _execute(self, model_id: str, items: list[_Item]) -> None:
        try:
            live = claim(items)
            if not live:
                return
            model = self.models[model_id]
            try:
                outputs = model.forward([item.text for item in live])
            except Exception as exc:  # noqa: BLE001 - each waiting caller hears of it
                for item in live:
                    item.future.set_exception(exc)
                return
            self.batches += 1
            self.batch_sizes.append(len(live))
            if self.on_batch is not None:
                self.on_batch(model_id, len(live))
            results = answer_rows(
                model.task, outputs, [model.labels] * len(live), [item.raw for item in live]
            )
            for item, result in zip(live, results, strict=True):
                item.future.set_result(result)
        finally:
            self._busy.release()


@dataclass
class TorchScriptModel(ServingModel):
    """A traced model from the store, with its tokenizer and post-processing; its texts are
    batched by the repository's :class:`Batcher` once one is attached."""

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
    scheduler: Batcher | None = None
    # CPU: serve the module frozen and optimised for inference (see :func:`optimised`).
    optimise: bool = False

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
            module = torch.jit.load(str(artifact.directory / "model.ts"), map_location=self.device)
            self.memory_bytes = max(
                tensor_bytes(module.state_dict().values()), profiled_bytes(artifact.directory)
            )
            self.module = optimised(module) if self.optimise and self.processor == "cpu" else module
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

    def expected_bytes(self, directory: Path, manifest: Any) -> int:
        # Counted as load counts it, so the first load reserves what the model will hold.
        return max(super().expected_bytes(directory, manifest), profiled_bytes(directory))

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

    def check_ids(self, input_ids: np.ndarray) -> None:
        """Refuse one request's rows the model cannot take (too long, ids outside the
        vocabulary), so that a group of requests forwarded together fails only where it must."""
        if not self.ready or self.module is None:
            raise ModelNotReady(self.model_id, self.state, self.reason)
        if not len(input_ids):
            raise InvalidInput("no text given")
        if input_ids.shape[1] > self.max_length:
            longest = self.max_length
            raise InvalidInput(
                f"{input_ids.shape[1]} tokens; model {self.model_id} takes at most {longest}"
            )
        vocab = self.tokenizer.get_vocab_size() if self.tokenizer is not None else None
        if int(input_ids.min()) < 0 or (vocab is not None and int(input_ids.max()) >= vocab):
            raise InvalidInput(
                f"input_ids must lie in [0, {vocab}): the vocabulary of model {self.model_id}"
            )

    def forward_ids(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, checked: bool = False
    ) -> np.ndarray:
        """Rows a front end tokenised (any integer dtype): the output rows as float32, checked as
        :meth:`predict_ids` checks (``checked``: :meth:`check_ids` ran already); blocking, for
        a worker thread."""
        if not checked:
            self.check_ids(input_ids)
        if not self.ready or self.module is None:
            raise ModelNotReady(self.model_id, self.state, self.reason)
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64))
        mask = torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64))
        with torch.inference_mode():
            output = self.module(ids.to(self.device), mask.to(self.device))
        return output.float().cpu().numpy()


def profiled_bytes(directory: Path) -> int:
    """The memory the packer counts for this model (its profile's ``memory_bytes``: what a
    process grew by loading it, beyond its tensors), 0 when the artifact has no profile; a
    server's memory budget holds models in the same unit its plan was sized in."""
    try:
        profile = json.loads((directory / "profile.json").read_bytes())
    except (OSError, ValueError):
        return 0
    value = profile.get("memory_bytes") if isinstance(profile, dict) else None
    return int(value) if isinstance(value, int | float) and value > 0 else 0


def optimised(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """The traced module frozen (weights as constants) and optimised for inference (fused
    ops, linear weights pre-packed for oneDNN), with answers equal to float rounding.

    A trade, so a server opts in (``--optimise``): a 14-token bert-mini forward costs about 30%
    less CPU (1.27 -> 0.89 ms over 40 models with cold caches), and each model keeps a
    pre-packed copy of its linear weights resident (bert-mini: 6.4 -> 7.7 MiB of RSS per
    model). The packer's profiles measure the module as traced, so with it a plan's CPU is
    conservative and its RAM is not: worth it for hot, CPU-bound servers, not where RAM binds."""
    return torch.jit.optimize_for_inference(torch.jit.freeze(module.eval()))


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


class TorchScriptRepository(ModelRepository):
    """The models of one server as TorchScript modules, batched by one :class:`Batcher`."""

    def __init__(
        self,
        store: ArtifactStore,
        model_ids: Iterable[str],
        processor: str = "cpu",
        cache_dir: Path | None = None,
        load_workers: int = 2,
        optimise: bool = False,
        on_demand: OnDemandSettings | None = None,
    ) -> None:
        self.optimise = optimise
        models: dict[str, ServingModel] = {
            model_id: self._model(model_id, processor) for model_id in model_ids
        }
        super().__init__(store, models, processor, cache_dir, load_workers, on_demand)
        self.batcher: Batcher | None = None

    def _model(self, model_id: str, processor: str) -> TorchScriptModel:
        return TorchScriptModel(
            model_id, processor, artifact_prefix(model_id, processor), optimise=self.optimise
        )

    def start(self, workers: int = 1, on_batch: Any = None, **batching: Any) -> None:
        """A :class:`Batcher` over ``workers`` compute threads, with its settings."""
        self.batcher = Batcher(workers=workers, on_batch=on_batch, **batching)
        for model in self.models.values():
            model.scheduler = self.batcher  # type: ignore[attr-defined]

    def queue_depth(self) -> int:
        return self.batcher.waiting if self.batcher is not None else 0

    def close(self) -> None:
        self.close_tier()
        if self.batcher is not None:
            self.batcher.close()

    def load_on_demand(self, model_id: str) -> int:
        model = self.models[model_id]
        model.load(self.store, self.cache_dir)
        if not model.ready:
            raise ColdLoadFailed(model_id, model.reason or "did not load")
        model.reason = None
        return model.memory_bytes

    def unload_on_demand(self, model_id: str) -> None:
        model = self.models[model_id]
        assert isinstance(model, TorchScriptModel)
        # Its tokenizer goes too: the next load reads both from the cache again.
        model.module, model.tokenizer = None, None
        model.state = ModelState.UNLOADED

    def load_model(self, model_id: str) -> TorchScriptModel:
        """(Re)load one model from the store in the background; the old copy, if any, keeps
        answering until the new one is ready. Returns the copy being loaded. An on-demand model
        is loaded by its tier (under the budget), in place."""
        if self.tier is not None and self.tier.manages(model_id):
            self.tier.preload(model_id)
            return self.models[model_id]  # type: ignore[return-value]
        fresh = self._model(model_id, self.processor)
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
        if self.tier is not None and self.tier.manages(model_id):
            # An on-demand model stays served: it leaves memory and loads on its next request.
            if not self.tier.evict(model_id) and self.models[model_id].ready:
                raise NotSupported(f"model {model_id} has requests in flight; unload it later")
            return
        del self.models[model_id]
