"""The cross-model engine behind the model contract: requests to different models of one BERT shape
are batched together and run by :class:`serving.backends.weightbank.CrossModelExecutor`.

The :class:`CrossModelEngine` owns one scheduler thread. Callers (the server's worker threads)
submit texts and wait; the scheduler takes what has arrived within ``max_wait_s`` (up to
``max_batch`` texts, at most one bank's worth of distinct models), drops requests past their
deadline, pads to a sequence-length bucket, swaps in models that are not resident, and runs one
cross-model forward. A full queue is refused at once (:class:`Overloaded`), never queued
without end.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from serving.backends.contract import (
    LOAD_ERRORS,
    ModelRepository,
    ModelState,
    ServingModel,
    answer_rows,
    claim,
    describe,
    open_artifact,
)
from serving.backends.ondemand import ColdLoadFailed, OnDemandSettings
from serving.backends.weightbank import (
    BertShape,
    CrossModelError,
    CrossModelExecutor,
    ModelPool,
    WeightBank,
    bert_weights,
)
from serving.build.modeling import encodings_of, tensor_bytes
from serving.errors import InvalidInput, ModelNotReady, NotSupported, Overloaded
from serving.store import ArtifactStore, artifact_prefix

BUCKETS = (16, 32, 64, 128, 256, 512)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class CrossModelSettings:
    slots: int = 64
    precision: str = "fp32"
    int8: bool = False
    max_batch: int = 64
    max_wait_s: float = 0.005
    max_queue: int = 4096
    deadline_s: float = 30.0
    device: str = "cpu"
    # Benchmarks only (python -m serving --null-forward): after one real forward (for the
    # output's width), batches are formed and answered with zeros, so what is measured is the
    # server around the model.
    null_forward: bool = False


@dataclass
class _Member:
    tokenizer: Tokenizer
    labels: list[str]
    max_length: int


@dataclass
class _Request:
    model_id: str
    text: str
    raw: bool
    deadline: float
    future: Future = field(default_factory=Future)
    # Pre-tokenised (submit_ids): rows x cols of ids and their 0/1 mask, one queue entry and one
    # future for all its rows (a front end's frame holds several requests of one model); the
    # answer is the rows x width float32 output.
    ids: np.ndarray | None = None
    mask: np.ndarray | None = None
    rows: int = 1
    # Rows of several models in one entry (submit_rows): each row's model.
    row_models: list[str] | None = None


class CrossModelEngine:
    def __init__(self, settings: CrossModelSettings) -> None:
        if settings.precision not in DTYPES:
            raise ValueError(f"precision {settings.precision!r}: choose fp32, bf16 or fp16")
        self.settings = settings
        self.shape: BertShape | None = None
        self.pool: ModelPool | None = None
        self.executor: CrossModelExecutor | None = None
        self.members: dict[str, _Member] = {}
        self.queue: queue.Queue[_Request] = queue.Queue(maxsize=settings.max_queue)
        self.batches = 0
        self.batched_texts = 0
        self._width = 0  # of the output rows, for null_forward
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cross-model-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------ membership

    def add(
        self,
        model_id: str,
        shape: BertShape,
        weights: dict[str, torch.Tensor],
        tokenizer: Tokenizer,
        labels: list[str],
        max_length: int,
    ) -> None:
        with self._lock:
            if self.shape is None:
                bank = WeightBank(
                    shape,
                    self.settings.slots,
                    device=self.settings.device,
                    dtype=DTYPES[self.settings.precision],
                    int8=self.settings.int8,
                )
                self.shape = shape
                self.pool = ModelPool(bank)
                self.executor = CrossModelExecutor(bank)
            elif shape != self.shape:
                raise CrossModelError(
                    f"model {model_id} has shape {shape}, this engine serves {self.shape}"
                )
            assert self.pool is not None
            self.pool.add(model_id, weights)
            self.members[model_id] = _Member(tokenizer, labels, max_length)

    def remove(self, model_id: str) -> None:
        """An on-demand model leaves the engine: its slot and its host-tier weights are freed.
        The caller holds no request of it (see :class:`serving.backends.ondemand.OnDemandTier`)."""
        with self._lock:
            self.members.pop(model_id, None)
            if self.pool is not None:
                self.pool.remove(model_id)

    # --------------------------------------------------------------------------- requests

    def submit(self, model_id: str, texts: list[str], raw: bool = False) -> list[Future]:
        if model_id not in self.members:
            raise ModelNotReady(model_id, ModelState.PENDING, "not in the engine")
        deadline = time.monotonic() + self.settings.deadline_s
        requests = [_Request(model_id, text, raw, deadline) for text in texts]
        for request in requests:
            try:
                self.queue.put_nowait(request)
            except queue.Full:
                for queued in requests:
                    queued.future.cancel()
                raise Overloaded(
                    f"{self.settings.max_queue} requests are waiting; retry shortly"
                ) from None
        return [r.future for r in requests]

    def check_ids(self, model_id: str, input_ids: np.ndarray) -> None:
        """Refuse ids outside the vocabulary or rows past the position table, so they never
        fail the batch they would join."""
        if model_id not in self.members:
            raise ModelNotReady(model_id, ModelState.PENDING, "not in the engine")
        assert self.shape is not None
        cols = input_ids.shape[1]
        longest, vocab = self.members[model_id].max_length, self.shape.vocab
        if cols > longest:
            raise InvalidInput(f"{cols} tokens; model {model_id} takes at most {longest}")
        if self._outside_vocabulary(input_ids):
            raise InvalidInput(
                f"input_ids must lie in [0, {vocab}): the vocabulary of model {model_id}"
            )

    def check_rows(self, model_ids: list[str], input_ids: np.ndarray) -> None:
        """:meth:`check_ids` for the stacked rows of several models at once (one pass over the
        ids; the caller checks request by request when this raises)."""
        assert self.shape is not None
        cols, members = input_ids.shape[1], self.members
        for model_id in model_ids:
            member = members.get(model_id)
            if member is None or cols > member.max_length:
                self.check_ids(model_id, input_ids)  # raises, naming what is wrong
        if self._outside_vocabulary(input_ids):
            raise InvalidInput(f"input_ids must lie in [0, {self.shape.vocab})")

    def _outside_vocabulary(self, input_ids: np.ndarray) -> bool:
        assert self.shape is not None
        # uint16 ids (what front ends send for small vocabularies) cannot be negative.
        return bool(input_ids.size) and (
            (input_ids.dtype.kind == "i" and int(input_ids.min()) < 0)
            or int(input_ids.max()) >= self.shape.vocab
        )

    def submit_ids(
        self,
        model_id: str,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        checked: bool = False,
    ) -> list[Future]:
        """Rows a front end (or a client) tokenised, as one queue entry: one future, settled
        with the rows' output as a rows x width float32 array. ``checked``: the caller ran
        :meth:`check_ids` already."""
        if not checked:
            self.check_ids(model_id, input_ids)
        elif model_id not in self.members:
            raise ModelNotReady(model_id, ModelState.PENDING, "not in the engine")
        deadline = time.monotonic() + self.settings.deadline_s
        request = _Request(
            model_id, "", True, deadline, ids=input_ids, mask=attention_mask, rows=len(input_ids)
        )
        try:
            self.queue.put_nowait(request)
        except queue.Full:
            raise Overloaded(
                f"{self.settings.max_queue} requests are waiting; retry shortly"
            ) from None
        return [request.future]

    def submit_rows(
        self, blocks: list[tuple[str, int]], input_ids: np.ndarray, attention_mask: np.ndarray
    ) -> list[tuple[Future, int]]:
        """Checked rows of several models (a front end's frame) as few queue entries as the
        bank's slots allow, usually one: ``blocks`` names each model and its row count, in the
        order of the rows. Returns each entry's future (settled with its rows' output, rows x
        width float32) and how many blocks it covers, in order."""
        for model_id, _ in blocks:
            if model_id not in self.members:
                raise ModelNotReady(model_id, ModelState.PENDING, "not in the engine")
        limit = self.pool.bank.slots if self.pool is not None else 1
        deadline = time.monotonic() + self.settings.deadline_s
        entries: list[_Request] = []
        covered: list[int] = []
        start = row = 0
        names: set[str] = set()
        for index, (model_id, _) in enumerate(blocks + [("", 0)]):
            last = index == len(blocks)
            if last or (model_id not in names and len(names) == limit):
                row_models = [m for m, rows in blocks[start:index] for _ in range(rows)]
                end = row + len(row_models)
                entries.append(
                    _Request(
                        blocks[start][0],
                        "",
                        True,
                        deadline,
                        ids=input_ids[row:end],
                        mask=attention_mask[row:end],
                        rows=end - row,
                        row_models=row_models,
                    )
                )
                covered.append(index - start)
                start, row, names = index, end, set()
            names.add(model_id)
        for position, entry in enumerate(entries):
            try:
                self.queue.put_nowait(entry)
            except queue.Full:
                for queued in entries[position:]:
                    queued.future.set_exception(
                        Overloaded(f"{self.settings.max_queue} requests are waiting; retry shortly")
                    )
                break
        return [(e.future, count) for e, count in zip(entries, covered, strict=True)]

    def predict(self, model_id: str, texts: list[str], raw: bool = False) -> list[dict]:
        futures = self.submit(model_id, texts, raw)
        return [f.result(timeout=self.settings.deadline_s + 5) for f in futures]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # -------------------------------------------------------------------------- scheduler

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # noqa: BLE001 - the scheduler must outlive any one batch
                continue

    def _step(self) -> None:
        try:
            first = self.queue.get(timeout=0.1)
        except queue.Empty:
            return
        batch = [first]
        taken = first.rows
        until = time.monotonic() + self.settings.max_wait_s
        while taken < self.settings.max_batch:
            remaining = until - time.monotonic()
            try:
                if remaining > 0:
                    request = self.queue.get(timeout=remaining)
                else:
                    request = self.queue.get_nowait()
            except queue.Empty:
                break
            batch.append(request)
            taken += request.rows
        for chunk in self._chunks(claim(batch)):
            try:
                self._execute(chunk)
            except Exception as exc:  # noqa: BLE001 - every waiting caller must hear of it
                for request in chunk:
                    if not request.future.done():
                        request.future.set_exception(exc)

    def _chunks(self, requests: list[_Request]) -> list[list[_Request]]:
        """Split so that no chunk names more distinct models than the bank has slots."""
        assert self.pool is not None or not requests
        limit = self.pool.bank.slots if self.pool else 1
        chunks: list[list[_Request]] = []
        current: list[_Request] = []
        models: set[str] = set()
        for request in requests:
            if request.row_models is None:
                if request.model_id not in models and len(models) == limit:
                    chunks.append(current)
                    current, models = [], set()
                current.append(request)
                models.add(request.model_id)
                continue
            # At most ``limit`` models in one entry (submit_rows splits to that).
            names = set(request.row_models)
            if current and len(models | names) > limit:
                chunks.append(current)
                current, models = [], set()
            current.append(request)
            models |= names
        if current:
            chunks.append(current)
        return chunks

    def _execute(self, chunk: list[_Request]) -> None:
        assert self.pool is not None and self.executor is not None and self.shape is not None
        # One tokenizer call per model in the chunk (the texts of a model go through it as a
        # batch), then the rows are laid out in the chunk's order (a pre-tokenised request
        # brings a block of rows).
        by_model: dict[str, list[int]] = {}
        encoded: list = [None] * len(chunk)
        longest = 0
        for index, request in enumerate(chunk):
            if request.ids is not None:
                longest = max(longest, request.ids.shape[1])  # tokenised by a front end
            else:
                by_model.setdefault(request.model_id, []).append(index)
        for model_id, indices in by_model.items():
            tokenizer = self.members[model_id].tokenizer
            texts = [chunk[i].text for i in indices]
            for index, encoding in zip(indices, encodings_of(tokenizer, texts), strict=True):
                # The tokenizer may pad to max_length itself; keep the real tokens only.
                ids = encoding.ids[: sum(encoding.attention_mask)]
                encoded[index] = ids
                longest = max(longest, len(ids))
        length = next((b for b in BUCKETS if b >= longest), longest)
        total = sum(r.rows for r in chunk)
        input_ids = np.zeros((total, length), dtype=np.int64)
        attention_mask = np.zeros((total, length), dtype=np.int64)
        starts, row = [], 0
        for index, request in enumerate(chunk):
            starts.append(row)
            if request.ids is not None:
                assert request.mask is not None
                rows, cols = request.ids.shape
                input_ids[row : row + rows, :cols] = request.ids
                attention_mask[row : row + rows, :cols] = request.mask
                row += rows
            else:
                ids = encoded[index]
                input_ids[row, : len(ids)] = ids
                attention_mask[row, : len(ids)] = 1
                row += 1
        models: list[str] = []
        for request in chunk:
            if request.row_models is not None:
                models += request.row_models
            elif request.rows == 1:
                models.append(request.model_id)
            else:
                models += [request.model_id] * request.rows
        slots = self.pool.acquire(models)
        try:
            if self.settings.null_forward and self._width:
                output = torch.zeros(total, self._width)
            else:
                output = self.executor.forward(
                    torch.tensor(slots),
                    torch.from_numpy(input_ids),
                    torch.from_numpy(attention_mask),
                )
                self._width = output.shape[1]
        finally:
            self.pool.release(slots)
        self.batches += 1
        self.batched_texts += total
        if not by_model:
            # Every row pre-tokenised: the answers are the output rows, formatted elsewhere.
            values = output.float().cpu().numpy()
            for start, request in zip(starts, chunk, strict=True):
                request.future.set_result(values[start : start + request.rows])
            return
        texts_only = all(r.ids is None for r in chunk)
        if not texts_only:
            values = output.float().cpu().numpy()
            for start, request in zip(starts, chunk, strict=True):
                if request.ids is not None:
                    request.future.set_result(values[start : start + request.rows])
        text_chunk = [r for r in chunk if r.ids is None]
        text_rows = [start for start, r in zip(starts, chunk, strict=True) if r.ids is None]
        results = answer_rows(
            self.shape.task,
            output if texts_only else output[text_rows],
            [self.members[r.model_id].labels for r in text_chunk],
            [r.raw for r in text_chunk],
        )
        for request, result in zip(text_chunk, results, strict=True):
            request.future.set_result(result)


class CrossModel(ServingModel):
    """One model behind the model contract, run by the engine of its shape.

    Loading has two steps: :meth:`load` reads and verifies the artifact (in the repository's
    loader threads); the repository then hands it to the engine of its shape (:meth:`join`).
    """

    def __init__(self, model_id: str, processor: str) -> None:
        self.model_id = model_id
        self.processor = processor
        self.prefix = artifact_prefix(model_id, processor)
        self.engine: CrossModelEngine | None = None
        self.state = ModelState.PENDING
        self.reason: str | None = None
        self.task = ""
        self.max_length = 0
        self.memory_bytes = 0
        self.load_seconds = 0.0
        self.shape: BertShape | None = None
        self._loaded: tuple[dict[str, torch.Tensor], Tokenizer, list[str]] | None = None

    def load(self, store: ArtifactStore, cache_dir: Path | None) -> None:
        started = time.perf_counter()
        self.state = ModelState.LOADING
        try:
            artifact = open_artifact(store, self.prefix, cache_dir)
            self.task, self.max_length = artifact.task, artifact.max_length
            self.shape, weights = bert_weights(
                rebuild_module(artifact.directory, self.task), self.task
            )
            self._loaded = (weights, artifact.tokenizer, artifact.labels)
            self.memory_bytes = tensor_bytes(weights.values())
        except LOAD_ERRORS as exc:
            self._fail(exc)
        finally:
            self.load_seconds = time.perf_counter() - started

    def join(self, engine: CrossModelEngine) -> None:
        if self._loaded is None or self.shape is None:
            return
        weights, tokenizer, labels = self._loaded
        try:
            engine.add(self.model_id, self.shape, weights, tokenizer, labels, self.max_length)
        except (RuntimeError, ValueError) as exc:
            self._fail(exc)
            return
        self.engine = engine
        self._loaded = None
        self.state = ModelState.READY

    def _fail(self, exc: Exception) -> None:
        self.state = ModelState.FAILED
        self.reason = f"{type(exc).__name__}: {exc}"

    def submit(self, texts: list[str], raw: bool = False) -> list[Future]:
        if not self.ready or self.engine is None:
            raise ModelNotReady(self.model_id, self.state, self.reason)
        if not texts:
            raise InvalidInput("no text given")
        return self.engine.submit(self.model_id, texts, raw)

    def predict_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, raw: bool = False):
        raise InvalidInput("the cross-model engine takes text; send a BYTES input")

    def check_ids(self, input_ids: np.ndarray) -> None:
        """Refuse one request's rows that no batch may take (see
        :meth:`CrossModelEngine.check_ids`)."""
        if not self.ready or self.engine is None:
            raise ModelNotReady(self.model_id, self.state, self.reason)
        if not len(input_ids):
            raise InvalidInput("no text given")
        self.engine.check_ids(self.model_id, input_ids)

    def submit_ids(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, checked: bool = False
    ) -> list[Future]:
        """Pre-tokenised rows, one future for them all (see
        :meth:`CrossModelEngine.submit_ids`); ``checked``: :meth:`check_ids` ran already."""
        if not self.ready or self.engine is None:
            raise ModelNotReady(self.model_id, self.state, self.reason)
        if not len(input_ids):
            raise InvalidInput("no text given")
        return self.engine.submit_ids(self.model_id, input_ids, attention_mask, checked)

    def describe(self) -> dict:
        return {**describe(self), "engine": "cross-model"}


def rebuild_module(directory: Path, task: str) -> torch.nn.Module:
    """The eager BERT of a traced artifact, from its config.json and weights.safetensors."""
    from safetensors.torch import load_model
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from serving.build.modeling import ClassificationLogits, MeanPoolEmbedding

    config = BertConfig.from_json_file(str(directory / "config.json"))
    if config.model_type != "bert":
        raise CrossModelError(f"the cross-model engine runs BERT encoders, not {config.model_type}")
    if task == "embedding":
        module: torch.nn.Module = MeanPoolEmbedding(BertModel(config))
    else:
        module = ClassificationLogits(BertForSequenceClassification(config))
    load_model(module, str(directory / "weights.safetensors"), strict=False)
    return module.eval()


class CrossModelRepository(ModelRepository):
    """A repository whose models run on cross-model engines, one per BERT shape and head."""

    def __init__(
        self,
        store: ArtifactStore,
        model_ids: list[str],
        processor: str = "cpu",
        cache_dir: Path | None = None,
        settings: CrossModelSettings | None = None,
        on_demand: OnDemandSettings | None = None,
    ) -> None:
        models = {m: CrossModel(m, processor) for m in model_ids}
        super().__init__(store, models, processor, cache_dir, on_demand=on_demand)  # type: ignore[arg-type]
        # transformers' lazy module is not safe to import from several loader threads at once.
        from transformers import BertConfig, BertForSequenceClassification, BertModel  # noqa: F401

        self.settings = settings or CrossModelSettings(slots=0)
        if processor == "gpu":
            self.settings.device = "cuda"
        self.engines: dict[BertShape, CrossModelEngine] = {}
        self._engines_lock = threading.Lock()

    def budget_bytes(self) -> int | None:
        """The ledger counts the models joined to the engines: their weights in the engines'
        host tier. It is bounded by the host budget, and on a CPU server (where the device is
        host memory) by the device budget too. The weight bank's slots are a fixed area sized
        at start (:meth:`slots_for`)."""
        budgets = [self.on_demand.host_memory_budget_bytes]
        if self.processor == "cpu" or self.on_demand.host_memory_budget_bytes is None:
            budgets.append(self.on_demand.memory_budget_bytes)
        given = [b for b in budgets if b is not None]
        return min(given) if given else None

    def slots_for(self, residents: int) -> int:
        """Slots of an engine with ``residents`` resident members: ``--slots``, else one per
        resident model and one per on-demand model the budget holds at once (swaps beyond)."""
        on_demand = 0
        if self.tier is not None:
            ids = self.tier.on_demand_ids()
            largest = max((self.tier.entries[m].expected_bytes for m in ids), default=0)
            budget = self.tier.budget_bytes
            fit = len(ids) if budget is None or not largest else budget // largest
            on_demand = min(len(ids), max(1, fit))
        wanted = residents + on_demand
        return max(1, min(self.settings.slots, wanted) if self.settings.slots else wanted)

    def load_on_demand(self, model_id: str) -> int:
        model = self.models[model_id]
        assert isinstance(model, CrossModel)
        model.load(self.store, self.cache_dir)
        if model.state is ModelState.FAILED or model.shape is None:
            raise ColdLoadFailed(model_id, model.reason or "did not load")
        with self._engines_lock:
            engine = self.engines.get(model.shape)
            if engine is None:
                engine = CrossModelEngine(replace(self.settings, slots=self.slots_for(0)))
                self.engines[model.shape] = engine
        model.join(engine)
        if not model.ready:
            raise ColdLoadFailed(model_id, model.reason or "did not join its engine")
        model.reason = None
        return model.memory_bytes

    def unload_on_demand(self, model_id: str) -> None:
        model = self.models[model_id]
        assert isinstance(model, CrossModel)
        if model.engine is not None:
            model.engine.remove(model_id)
        model.engine = None
        model.state = ModelState.UNLOADED

    def start(self, workers: int = 1, on_batch: object = None, **batching: object) -> None:
        """Nothing to start: each engine is its models' scheduler (it starts with the engine)."""

    def queue_depth(self) -> int:
        return sum(engine.queue.qsize() for engine in self.engines.values())

    def close(self) -> None:
        self.close_tier()
        for engine in self.engines.values():
            engine.close()

    def load_model(self, model_id: str) -> None:
        raise NotSupported("loading models one by one is not supported by the cross-model engine")

    def unload_model(self, model_id: str) -> None:
        raise NotSupported("unloading models is not supported by the cross-model engine")

    def load_all(self) -> None:
        self.load_models()
        by_shape: dict[BertShape, list[CrossModel]] = {}
        for model in self.models.values():
            if model.shape is not None and model.state is ModelState.LOADING:
                by_shape.setdefault(model.shape, []).append(model)  # type: ignore[arg-type]
        for shape, members in by_shape.items():
            engine = CrossModelEngine(replace(self.settings, slots=self.slots_for(len(members))))
            self.engines[shape] = engine
            for model in members:
                model.join(engine)
        self.finish_loading()
