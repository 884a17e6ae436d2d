"""The data plane of one model server, with no web framework in it: predict, KServe v2 infer,
metadata, readiness and the model repository, taking and returning plain values and structs,
recording metrics, raising the typed errors of :mod:`serving.errors`. The REST front ends in
:mod:`serving.http.app` only decode, call and encode.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextvars import ContextVar
from typing import Any

import anyio
import numpy as np

from packing.contracts import is_model_id
from serving.backends.contract import ModelState
from serving.dataplane import v2
from serving.dataplane.metrics import ServerMetrics
from serving.errors import (
    Forbidden,
    InvalidInput,
    LoadFailed,
    ModelNotFound,
    ModelNotReady,
    ServingError,
    Unauthorized,
)
from serving.errors import status_of as error_status

logger = logging.getLogger("myriad.server")

# Set in a request's context when it waited for its model to load (an on-demand model's cold
# start); the front ends answer it with COLD_START_HEADER. Each front end clears it before the
# call and reads it after, in the request's own task.
cold_start: ContextVar[bool] = ContextVar("myriad_cold_start", default=False)

SERVER_NAME = "myriad"
# The one version each model has: KServe v2 clients may name it or leave it out.
MODEL_VERSION = "1"
MAX_TEXTS_PER_REQUEST = 64
# Triton's instance kinds by processor; a Neuron core is a device Triton has no kind for, so
# the model manages it (KIND_MODEL).
INSTANCE_KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}


def backend_name(model: Any) -> str:
    """The backend serving ``model``, as ``python -m serving --backend`` names it (the tail of
    its module's name otherwise)."""
    module = type(model).__module__.rsplit(".", 1)[-1]
    return {"crossmodel": "cross-model"}.get(module, module)


class DataPlane:
    def __init__(
        self,
        repository: Any,
        metrics: ServerMetrics,
        *,
        workers: int = 1,
        admin_token: str | None = None,
        version: str = "0.1.0",
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self.workers = workers
        self.admin_token = admin_token
        self.version = version
        self._limiter: anyio.CapacityLimiter | None = None

    # ------------------------------------------------------------------ inference

    def _model(self, model_id: str, version: str | None = None) -> Any:
        if version not in (None, "", MODEL_VERSION):
            raise ModelNotFound(f"{model_id}/versions/{version}")
        return self.repository.get(model_id)

    async def _run(
        self,
        model_id: str,
        count: int,
        texts: tuple[list[str], bool] | None = None,
        call: Callable[[Any], list[dict]] | None = None,
        version: str | None = None,
        submit: Callable[[Any], list[Future]] | None = None,
    ) -> list[Any]:
        """Submit ``texts`` (and ``raw``) to the model's own scheduler, or run ``call`` on a
        worker thread, recording status and latency; an untyped error is logged with its
        traceback. ``submit``: queue the work on the model's scheduler some other way (token
        ids, :meth:`run_ids`) and wait for its futures."""
        started = time.perf_counter()
        tier = getattr(self.repository, "tier", None)
        held = False
        try:
            model = self._model(model_id, version)
            if tier is not None and tier.manages(model_id):
                # On demand: wait for its load if it is not in memory, and hold it until the
                # answers are settled so that no eviction takes it from under its batch.
                cold = await tier.acquire(model_id)
                held = True
                if cold:
                    cold_start.set(True)
                    self.metrics.observe_cold_start(model_id)
            if not model.ready:
                raise ModelNotReady(model_id, model.state, model.reason)
            if submit is not None:
                result = await settled(submit(model))
            elif texts is not None:
                # The backend's scheduler computes; this request waits on the loop, not a thread.
                result = await settled(model.submit(*texts))
            else:
                if self._limiter is None:
                    self._limiter = anyio.CapacityLimiter(self.workers)
                result = await anyio.to_thread.run_sync(lambda: call(model), limiter=self._limiter)
        except BaseException as exc:
            if held:
                tier.release(model_id)
            if not isinstance(exc, Exception):
                raise
            status = error_status(exc)
            self.metrics.observe(model_id, status, time.perf_counter() - started, count)
            if not isinstance(exc, ServingError):
                logger.exception("internal error serving %s", model_id)
            raise
        if held:
            tier.release(model_id)
        self.metrics.observe(model_id, 200, time.perf_counter() - started, count)
        return result

    async def predict(self, model_id: str, texts: list[str], raw: bool = False) -> list[dict]:
        try:
            check_texts(texts)
        except InvalidInput as exc:
            self.refuse(model_id, exc)
            raise
        return await self._run(model_id, len(texts), (texts, raw))

    async def run_ids(
        self,
        model_id: str,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        version: str | None = None,
    ) -> np.ndarray:
        """Rows tokenised by a front end (:mod:`serving.http.frontend`): the model's output rows
        (logits or embeddings) as one float32 array, through :meth:`run_ids_group` (a group of
        one); sets :data:`cold_start` when it waited for an on-demand load."""
        done = asyncio.get_running_loop().create_future()

        def answered(results: list[Any], cold: bool) -> None:
            if not done.done():
                done.set_result((results[0], cold))

        self.run_ids_group(model_id, version, [(input_ids, attention_mask)], answered)
        result, cold = await done
        if cold:
            cold_start.set(True)
        if isinstance(result, BaseException):
            raise result
        return result

    def run_ids_group(
        self,
        model_id: str,
        version: str | None,
        items: list[tuple[np.ndarray, np.ndarray]],
        done: Callable[[list[Any], bool], None],
    ) -> None:
        """Several requests' token ids for one model, run as one (see :meth:`run_ids_frame`)."""
        self.run_ids_frame([(model_id, version, items, done)])

    def run_ids_frame(
        self,
        groups: list[
            tuple[
                str,
                str | None,
                list[tuple[np.ndarray, np.ndarray]],
                Callable[[list[Any], bool], None],
            ]
        ],
    ) -> None:
        """A front end's frame: per model, its requests' token ids (``model_id, version, items,
        done``). Each model's group is run as one: one lookup, one readiness check, one hold
        of an on-demand model (loading it first), metrics counted once for the group; each
        request's ids are checked on their own, so a bad one fails alone. The rows that pass
        go to the backends stacked: the groups of one cross-model engine as one queue entry
        and one completion for the whole frame (``submit_rows``), another backend's group as
        one ``submit_ids`` or one ``forward_ids`` on a worker thread.

        Called on the event loop; each group's ``done(results, cold)`` is called on it once,
        maybe before this returns: per item its output rows (float32) or the exception it
        failed with (typed errors carry their status); ``cold``: the group waited for its
        model's load."""
        tier = getattr(self.repository, "tier", None)
        shared: dict[Any, list[tuple[_IdsGroup, Any]]] = {}
        for model_id, version, items, done in groups:
            group = _IdsGroup(self, model_id, items, done)
            try:
                model = self._model(model_id, version)
            except Exception as exc:  # noqa: BLE001 - every item answers with it
                group.fail(exc)
                continue
            if tier is not None and tier.manages(model_id):
                task = asyncio.get_running_loop().create_task(group.acquire_and_submit(model, tier))
                _groups_waiting.add(task)
                task.add_done_callback(_groups_waiting.discard)
                continue
            engine = getattr(model, "engine", None)
            if engine is None or not hasattr(engine, "submit_rows"):
                group.submit(model)
                continue
            if not model.ready:
                group.fail(ModelNotReady(model_id, model.state, model.reason))
                continue
            shared.setdefault(engine, []).append((group, model))
        for engine, members in shared.items():
            submit_checked_rows(engine, members)

    def refuse(self, model_id: str, exc: Exception) -> None:
        """Count a request refused before it reached a model (undecodable body)."""
        self.metrics.observe(model_id, error_status(exc), 0.0, 0)

    async def infer(
        self, model_id: str, body: bytes, header_length: str | None, version: str | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """A KServe v2 inference over REST: the body decoded (JSON or binary tensors), run by
        :meth:`infer_tensors`, and the answer encoded as the request asks."""
        try:
            request, tensors = v2.decode_request(
                body, header_length, model_id, version or MODEL_VERSION
            )
        except InvalidInput as exc:
            self.refuse(model_id, exc)
            raise
        outputs = await self.infer_tensors(model_id, tensors, version)
        return v2.encode_response(request, model_id, outputs, MODEL_VERSION if version else None)

    async def infer_tensors(
        self, model_id: str, inputs: list[v2.Tensor], version: str | None = None
    ) -> list[v2.Tensor]:
        """A KServe v2 inference on decoded inputs, whatever the wire (REST, gRPC): a BYTES
        input of texts, or INT64/INT32 ``input_ids`` (and ``attention_mask``) the client
        tokenised itself; returns every output of the model (the caller picks those asked for).
        """
        try:
            texts, input_ids, attention_mask = v2_inputs(inputs)
        except InvalidInput as exc:
            self.refuse(model_id, exc)
            raise
        if texts is not None:
            results = await self._run(model_id, len(texts), (texts, True), version=version)
        else:
            results = await self._run(
                model_id,
                len(input_ids),
                call=lambda m: m.predict_ids(input_ids, attention_mask, raw=True),
                version=version,
            )
        return output_tensors(results)

    # ------------------------------------------------------------------ metadata

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": self.version, "extensions": v2.EXTENSIONS}

    def model_metadata(self, model_id: str, version: str | None = None) -> dict[str, Any]:
        model = self._model(model_id, version)
        if model.task == "embedding":
            outputs = [{"name": "embedding", "datatype": "FP32", "shape": [-1, -1]}]
        else:
            outputs = [
                {"name": "logits", "datatype": "FP32", "shape": [-1, -1]},
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "score", "datatype": "FP32", "shape": [-1]},
            ]
        return {
            "name": model_id,
            "versions": [MODEL_VERSION],
            "platform": "myriad",
            "inputs": [
                {"name": "text", "datatype": "BYTES", "shape": [-1]},
                {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
            ],
            "outputs": outputs,
        }

    def model_config(self, model_id: str, version: str | None = None) -> dict[str, Any]:
        """The model's configuration as Triton's clients read it (``GET .../config`` over REST,
        ``ModelConfig`` over gRPC): its metadata's tensors batched up to
        :data:`MAX_TEXTS_PER_REQUEST` rows, each input optional (texts or token ids, with or
        without a mask), the backend and device kind, and the task and sequence length as
        parameters."""
        model = self._model(model_id, version)
        parameters = {"task": model.task or "", "processor": model.processor}
        if model.max_length:
            parameters["max_length"] = str(model.max_length)
        metadata = self.model_metadata(model_id, version)
        return v2.model_config(
            metadata,
            max_batch_size=MAX_TEXTS_PER_REQUEST,
            backend=backend_name(model),
            instance_kind=INSTANCE_KINDS.get(model.processor, "KIND_MODEL"),
            optional_inputs=[entry["name"] for entry in metadata["inputs"]],
            parameters=parameters,
        )

    def model_ready(self, model_id: str, version: str | None = None) -> bool:
        return self._model(model_id, version).ready

    @property
    def ready(self) -> bool:
        return self.repository.ready

    def readiness(self) -> dict[str, Any]:
        return {"ready": self.ready, "failed": [m.model_id for m in self.repository.failed()]}

    def models(self) -> dict[str, Any]:
        return {"ready": self.ready, "models": self.repository.describe()}

    # ------------------------------------------------------------------ repository

    def authorise(self, authorization: str | None) -> None:
        if not self.admin_token:
            raise Forbidden(
                "the management API is disabled: start the server with MYRIAD_ADMIN_TOKEN"
            )
        if not hmac.compare_digest(
            (authorization or "").encode(), f"Bearer {self.admin_token}".encode()
        ):
            raise Unauthorized("a valid Authorization: Bearer token is required")

    def repository_index(self) -> list[dict[str, Any]]:
        """KServe v2 repository index: every model with its version and state."""
        index = []
        for entry in self.repository.describe():
            item = {"name": entry["id"], "version": MODEL_VERSION, "state": entry["state"].upper()}
            if entry.get("reason"):
                item["reason"] = entry["reason"]
            index.append(item)
        return index

    async def load(self, model_id: str, wait: bool = True) -> dict[str, str]:
        """(Re)load a model from the store. ``wait`` (KServe v2's semantics): answer once it is
        loaded, or raise :class:`LoadFailed` with the reason; else answer at once."""
        if not is_model_id(model_id):
            raise InvalidInput(f"{model_id!r} is not a valid model id")
        tier = getattr(self.repository, "tier", None)
        if tier is not None and tier.manages(model_id):
            # An on-demand model loads through its tier, under the memory budget.
            loading = tier.preload(model_id)
            if not wait:
                return {"name": model_id, "status": "loading"}
            try:
                await asyncio.wrap_future(loading)
            except ServingError as exc:
                raise LoadFailed(f"model {model_id!r} did not load: {exc}") from None
            return {"name": model_id, "status": "ready"}
        fresh = self.repository.load_model(model_id)
        if not wait:
            return {"name": model_id, "status": "loading"}
        while fresh.state in (ModelState.PENDING, ModelState.LOADING):
            await asyncio.sleep(0.02)
        if not fresh.ready:
            raise LoadFailed(f"model {model_id!r} did not load: {fresh.reason}")
        return {"name": model_id, "status": "ready"}

    def unload(self, model_id: str) -> dict[str, str]:
        self.repository.unload_model(model_id)
        return {"name": model_id, "status": "unloaded"}

    def close(self) -> None:
        self.repository.close()


# Groups waiting for an on-demand load (a task each), kept from the garbage collector.
_groups_waiting: set[asyncio.Task] = set()


class _IdsGroup:
    """One :meth:`DataPlane.run_ids_group` call: its hold, its submission, its answers."""

    __slots__ = ("plane", "model_id", "items", "done", "started", "results", "cold", "tier")

    def __init__(
        self,
        plane: DataPlane,
        model_id: str,
        items: list[tuple[np.ndarray, np.ndarray]],
        done: Callable[[list[Any], bool], None],
    ) -> None:
        self.plane, self.model_id, self.items, self.done = plane, model_id, items, done
        self.started = time.perf_counter()
        self.results: list[Any] = [None] * len(items)
        self.cold = False
        self.tier: Any = None  # the on-demand tier holding the model for this group

    async def acquire_and_submit(self, model: Any, tier: Any) -> None:
        try:
            # On demand: wait for its load if it is not in memory, and hold it until the
            # answers are settled so that no eviction takes it from under its batch.
            self.cold = await tier.acquire(self.model_id)
        except Exception as exc:  # noqa: BLE001 - every item answers with it
            self.fail(exc)
            return
        self.tier = tier
        if self.cold:
            self.plane.metrics.observe_cold_start(self.model_id, len(self.items))
        self.submit(model)

    def fail(self, exc: Exception) -> None:
        for index in range(len(self.items)):
            self.results[index] = exc
        self.finish()

    def prepare(self, model: Any) -> tuple[list[int], np.ndarray, np.ndarray] | None:
        """Check each item: those that pass, stacked; None when none did (answered)."""
        if not model.ready:
            self.fail(ModelNotReady(self.model_id, model.state, model.reason))
            return None
        items = self.items
        if len(items) > 1:
            # Usually every request passes: one check of them all stacked, and the requests
            # one by one only when that fails.
            input_ids, mask = stack_rows(items)
            try:
                model.check_ids(input_ids)
            except Exception:  # noqa: BLE001 - found below, request by request
                pass
            else:
                # (Rows past a shorter request's end are padding, masked out.)
                if all(len(ids) for ids, _ in items):
                    return list(range(len(items))), input_ids, mask
        passed: list[int] = []
        for index, (input_ids, _) in enumerate(items):
            try:
                model.check_ids(input_ids)
            except Exception as exc:  # noqa: BLE001 - this item answers with it
                self.results[index] = exc
            else:
                passed.append(index)
        if not passed:
            self.finish()
            return None
        if len(passed) == 1:
            return passed, *items[passed[0]]
        return (passed, *stack_rows([items[i] for i in passed]))

    def submit(self, model: Any) -> None:
        """Check each item, stack those that pass, hand them to the model in one go."""
        try:
            if not model.ready:
                raise ModelNotReady(self.model_id, model.state, model.reason)
        except Exception as exc:  # noqa: BLE001 - every item answers with it
            self.fail(exc)
            return
        engine = getattr(model, "engine", None)
        if engine is not None and hasattr(engine, "submit_rows"):
            prepared = self.prepare(model)
            if prepared is not None:
                submit_rows(engine, [(self, *prepared)])
            return
        check = getattr(model, "check_ids", None)
        passed: list[int] = []
        for index, (input_ids, _) in enumerate(self.items):
            if check is None:
                passed.append(index)
                continue
            try:
                check(input_ids)
            except Exception as exc:  # noqa: BLE001 - this item answers with it
                self.results[index] = exc
            else:
                passed.append(index)
        if not passed:
            self.finish()
            return
        input_ids, mask = stack_rows([self.items[i] for i in passed])
        if hasattr(model, "submit_ids"):
            try:
                futures = model.submit_ids(input_ids, mask, checked=True)
            except Exception as exc:  # noqa: BLE001 - the items that passed answer with it
                self.settle(passed, exc)
                return
            box = mailbox()
            (future,) = futures
            future.add_done_callback(lambda f: box.post(lambda: self.settle_future(passed, f)))
            return
        task = asyncio.get_running_loop().create_task(
            self.forward(model, passed, input_ids, mask, check is not None)
        )
        _groups_waiting.add(task)
        task.add_done_callback(_groups_waiting.discard)

    async def forward(
        self, model: Any, passed: list[int], input_ids: Any, mask: Any, checked: bool
    ) -> None:
        plane = self.plane
        if plane._limiter is None:
            plane._limiter = anyio.CapacityLimiter(plane.workers)
        if checked:
            run = lambda: model.forward_ids(input_ids, mask, checked=True)  # noqa: E731
        else:
            # A backend that cannot check a request's ids apart: forwarded one by one, so a
            # bad one fails alone.
            def run() -> list[Any]:
                outputs: list[Any] = []
                for index in passed:
                    try:
                        outputs.append(model.forward_ids(*self.items[index]))
                    except Exception as exc:  # noqa: BLE001 - this item answers with it
                        outputs.append(exc)
                return outputs

        try:
            output = await anyio.to_thread.run_sync(run, limiter=plane._limiter)
        except Exception as exc:  # noqa: BLE001 - the items that passed answer with it
            self.settle(passed, exc)
            return
        if checked:
            self.settle(passed, output)
        else:
            for index, result in zip(passed, output, strict=True):
                self.results[index] = result
            self.finish()

    def settle_future(self, passed: list[int], future: Future) -> None:
        try:
            output = future.result()
        except BaseException as exc:  # noqa: BLE001 - handed to the items
            self.settle(passed, exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            return
        self.settle(passed, output)

    def settle(self, passed: list[int], output: Any) -> None:
        """The stacked rows' output (or the error they failed with) back to their items."""
        if isinstance(output, BaseException):
            for index in passed:
                self.results[index] = output
        else:
            row = 0
            for index in passed:
                rows = len(self.items[index][0])
                self.results[index] = output[row : row + rows]
                row += rows
        self.finish()

    def finish(self) -> None:
        if self.tier is not None:
            self.tier.release(self.model_id)
            self.tier = None
        seconds = time.perf_counter() - self.started
        metrics, model_id = self.plane.metrics, self.model_id
        answered, failures = 0, {}
        for result in self.results:
            if isinstance(result, BaseException):
                status = error_status(result)
                failures[status] = failures.get(status, 0) + 1
                if not isinstance(result, ServingError):
                    logger.error("internal error serving %s", model_id, exc_info=result)
            else:
                answered += 1
        if answered:
            metrics.observe_many(model_id, 200, seconds, answered)
        for status, count in failures.items():
            metrics.observe_many(model_id, status, seconds, count)
        self.done(self.results, self.cold)


def submit_checked_rows(engine: Any, members: list[tuple[_IdsGroup, Any]]) -> None:
    """Ready models' groups of one cross-model engine: every request's rows stacked once and
    checked once against the engine (vocabulary, each model's sequence length), then one
    :func:`submit_rows`. Only when that check fails are the requests checked one by one, so
    that a bad request fails alone."""
    items = [item for group, _ in members for item in group.items]
    input_ids, mask = stack_rows(items)
    try:
        if not all(len(ids) for ids, _ in items):
            raise InvalidInput("no text given")
        engine.check_rows([group.model_id for group, _ in members], input_ids)
    except Exception:  # noqa: BLE001 - found below, request by request
        prepared = []
        for group, model in members:
            checked = group.prepare(model)
            if checked is not None:
                prepared.append((group, *checked))
        if prepared:
            submit_rows(engine, prepared)
        return
    row = 0
    blocks = []
    for group, _ in members:
        rows = sum(len(ids) for ids, _ in group.items)
        blocks.append((group, list(range(len(group.items))), input_ids[row : row + rows], None))
        row += rows
    submit_rows(engine, blocks, (input_ids, mask))


def submit_rows(
    engine: Any,
    members: list[tuple[_IdsGroup, list[int], np.ndarray, np.ndarray | None]],
    stacked: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """Groups of one cross-model engine, checked and stacked, as one block of rows: one queue
    entry (or as few as its slots allow) and one completion for all of them."""
    blocks = [(group.model_id, len(ids)) for group, _, ids, _ in members]
    if stacked is not None:  # (the members' ids are views of it, their masks unused)
        input_ids, mask = stacked
    elif len(members) == 1:
        _, _, input_ids, mask = members[0]
    else:
        input_ids, mask = stack_rows([(ids, mask) for _, _, ids, mask in members])
    try:
        entries = engine.submit_rows(blocks, input_ids, mask)
    except Exception as exc:  # noqa: BLE001 - the items that passed answer with it
        for group, passed, _, _ in members:
            group.settle(passed, exc)
        return
    box = mailbox()
    first = 0
    for future, count in entries:
        part = members[first : first + count]
        first += count
        future.add_done_callback(lambda f, part=part: box.post(lambda: _split(part, f)))


def _split(
    members: list[tuple[_IdsGroup, list[int], np.ndarray, np.ndarray]], future: Future
) -> None:
    try:
        output = future.result()
    except BaseException as exc:  # noqa: BLE001 - handed to the items
        failure = exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
        for group, passed, _, _ in members:
            group.settle(passed, failure)
        return
    row = 0
    for group, passed, ids, _ in members:
        group.settle(passed, output[row : row + len(ids)])
        row += len(ids)


def stack_rows(items: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Several requests' ids and masks as one block of rows, padded (id 0, mask 0) to the
    longest: padding the model masks out, as every batch pads to its bucket."""
    if len(items) == 1:
        return items[0]
    cols = max(ids.shape[1] for ids, _ in items)
    if all(ids.shape[1] == cols for ids, _ in items) and len({ids.dtype for ids, _ in items}) == 1:
        return (
            np.concatenate([ids for ids, _ in items]),
            np.concatenate([mask for _, mask in items]),
        )
    rows = sum(len(ids) for ids, _ in items)
    dtype = np.result_type(*(ids.dtype for ids, _ in items))
    input_ids = np.zeros((rows, cols), dtype=dtype)
    mask = np.zeros((rows, cols), dtype=np.uint8)
    row = 0
    for ids, item_mask in items:
        input_ids[row : row + len(ids), : ids.shape[1]] = ids
        mask[row : row + len(ids), : ids.shape[1]] = item_mask
        row += len(ids)
    return input_ids, mask


class Mailbox:
    """Hands results from compute threads to one event loop in bulk.

    A backend completes a batch's futures one after another in its own thread; each completion
    posts here, and only the first post since the loop last drained wakes the loop (one
    ``call_soon_threadsafe``, one write to its self-pipe), so a batch of N requests costs one
    wake-up, not N."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.wakeups = 0
        self._pending: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def post(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._pending.append(callback)
            wake = len(self._pending) == 1
        if wake:
            self.wakeups += 1
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            callbacks, self._pending = self._pending, []
        for callback in callbacks:
            callback()


_mailboxes: dict[asyncio.AbstractEventLoop, Mailbox] = {}


def mailbox() -> Mailbox:
    """The running loop's mailbox (one per loop; a server has one loop per process)."""
    loop = asyncio.get_running_loop()
    box = _mailboxes.get(loop)
    if box is None:
        _mailboxes.clear()  # a loop that is gone (tests start many) leaves no mailbox behind
        box = _mailboxes[loop] = Mailbox(loop)
    return box


def settled(futures: list[Future]) -> asyncio.Future:
    """One awaitable for a request's futures, settled through the loop's :class:`Mailbox`
    when the last of them is done (no loop wake-up per text, and at most one per batch); the
    first error among them is raised."""
    box = mailbox()
    done = box.loop.create_future()
    remaining = len(futures)
    lock = threading.Lock()

    def settle() -> None:
        if done.cancelled():
            return
        try:
            done.set_result([future.result() for future in futures])
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting request
            done.set_exception(exc)

    def finished(_: Future) -> None:
        nonlocal remaining
        with lock:
            remaining -= 1
            last = remaining == 0
        if last:
            box.post(settle)

    def abandon(_: asyncio.Future) -> None:
        # The caller went away: texts not yet claimed by a batch are never computed.
        if done.cancelled():
            for future in futures:
                future.cancel()

    done.add_done_callback(abandon)
    if not futures:
        done.set_result([])
    for future in futures:
        future.add_done_callback(finished)
    return done


def check_texts(texts: list[str]) -> None:
    if not texts:
        raise InvalidInput("no text given")
    if len(texts) > MAX_TEXTS_PER_REQUEST:
        raise InvalidInput(
            f"{len(texts)} texts in one request; the limit is {MAX_TEXTS_PER_REQUEST}"
        )
    if any(not t.strip() for t in texts):
        raise InvalidInput("empty text")


def token_tensors(named: dict[str, v2.Tensor]) -> tuple[Any, Any]:
    """``input_ids`` and ``attention_mask`` as 2-d int64 tensors, checked: integer datatypes,
    2-d shapes that agree, at most :data:`MAX_TEXTS_PER_REQUEST` rows, a 0/1 mask."""
    import torch

    def tensor(entry: v2.Tensor) -> torch.Tensor:
        if entry.datatype not in v2.INTEGER_TYPES:
            raise InvalidInput(f"input {entry.name} must be INT64 (or another integer type)")
        if len(entry.shape) != 2 or 0 in entry.shape:
            raise InvalidInput(
                f"input {entry.name} needs a non-empty 2-d shape, got {list(entry.shape)}"
            )
        values = np.asarray(entry.values)
        if values.dtype.kind == "u" and values.size and values.max() > np.iinfo(np.int64).max:
            raise InvalidInput(f"input {entry.name}: a value is out of range")
        return torch.from_numpy(values.astype(np.int64).reshape(entry.shape))

    input_ids = tensor(named["input_ids"])
    if input_ids.shape[0] > MAX_TEXTS_PER_REQUEST:
        raise InvalidInput(f"{input_ids.shape[0]} rows; the limit is {MAX_TEXTS_PER_REQUEST}")
    mask = tensor(named["attention_mask"]) if "attention_mask" in named else None
    if mask is None:
        mask = (input_ids != 0).long()
    if mask.shape != input_ids.shape:
        raise InvalidInput("attention_mask must have the shape of input_ids")
    if bool(((mask != 0) & (mask != 1)).any()):
        raise InvalidInput("attention_mask values must be 0 or 1")
    return input_ids, mask


def v2_inputs(inputs: list[v2.Tensor]) -> tuple[list[str] | None, Any, Any]:
    """What a v2 inference asks to run, checked: texts from a BYTES input, or else the ids and
    mask tensors of a client that tokenised itself (``input_ids``, ``attention_mask``)."""
    texts_input = next((t for t in inputs if t.datatype == "BYTES"), None)
    if texts_input is not None:
        try:
            texts = [v.decode("utf-8") for v in texts_input.values]
        except UnicodeDecodeError:
            raise InvalidInput(f"input {texts_input.name}: BYTES are not UTF-8") from None
        check_texts(texts)
        return texts, None, None
    named = {t.name: t for t in inputs}
    if "input_ids" in named:
        input_ids, attention_mask = token_tensors(named)
        return None, input_ids, attention_mask
    raise InvalidInput('send a BYTES input ("text") or an INT64 input ("input_ids")')


def output_tensors(results: list[dict]) -> list[v2.Tensor]:
    """The v2 outputs of a batch of answers (see :func:`output_rows`)."""
    if "embedding" in results[0]:
        vectors = np.asarray([r["embedding"] for r in results], dtype=np.float32)
        return output_rows("embedding", vectors)
    return output_rows("sequence-classification", [r["logits"] for r in results])


def output_rows(task: str, values: Any) -> list[v2.Tensor]:
    """The v2 outputs of a batch of output rows: ``embedding``, or ``logits``, ``label`` (the
    best class index) and ``score`` (its probability)."""
    values = np.asarray(values, dtype=np.float32)
    if task == "embedding":
        return [v2.Tensor(name="embedding", datatype="FP32", shape=values.shape, values=values)]
    logits = values
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=-1, keepdims=True)
    best = probabilities.argmax(axis=-1)
    rows = len(values)
    return [
        v2.Tensor(name="logits", datatype="FP32", shape=logits.shape, values=logits),
        v2.Tensor(
            name="label",
            datatype="BYTES",
            shape=(rows,),
            values=[str(int(i)).encode() for i in best],
        ),
        v2.Tensor(
            name="score",
            datatype="FP32",
            shape=(rows,),
            values=probabilities[np.arange(rows), best].astype(np.float32),
        ),
    ]
