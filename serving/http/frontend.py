"""The per-request work of the hot routes, done where HTTP is parsed: decode the request,
tokenise with the model's own tokenizer, hand token ids to an engine, and turn the rows it
returns (logits or embeddings) into the answer.

:class:`FrontEnd` answers a :class:`serving.http.fastpath.Call` over an engine:

- :class:`LocalEngine`: the :class:`serving.dataplane.plane.DataPlane` of this process (one
  process, ``--workers 1``);
- :class:`serving.http.workers.EngineClient`: the engine process, over ZeroMQ with the binary
  frames of :mod:`serving.http.frames` (``--workers N``), so the engine process only batches
  and runs forwards.

What a front end needs of a model (tokenizer, max_length, task, labels, vocabulary) it asks the
engine once and keeps. A model the engine cannot describe yet (unknown here, not loaded, an
on-demand model not in memory, a backend without a tokenizer) is answered the old way: the
request goes to the engine whole (``forward_call``), which decodes, tokenises and answers it
(and loads the model when it is on demand); the front end asks again a moment later.

Metrics stay in one place, the engine's data plane: every request that reaches a model is
counted there by :meth:`DataPlane.run_ids` as any other, and a request the front end refuses
before (a body that does not decode, too many texts) is sent to the engine as a refusal and
counted there too.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import numpy as np
from tokenizers import Tokenizer

from serving.backends.contract import TRIM_MULTIPLE, answer_rows
from serving.build.modeling import encodings_of
from serving.dataplane import v2
from serving.dataplane.plane import (
    MODEL_VERSION,
    DataPlane,
    check_texts,
    logger,
    output_rows,
)
from serving.dataplane.plane import v2_inputs as plane_v2_inputs
from serving.errors import InvalidInput, ServingError
from serving.http.fastpath import JSON, Answer, Call, answer_call, parse_texts, problem, v2_error
from serving.http.fastpath import wants_raw as _wants_raw
from serving.wire import COLD_START_HEADER

__all__ = ["EngineError", "FrontEnd", "LocalEngine", "ModelInfo", "describe_model"]

COLD_START = {COLD_START_HEADER: "1"}
# How long a front end answers a model the engine could not describe the old way before it
# asks again (an on-demand model gets its tokenizer here soon after its first load).
RETRY_DESCRIBE_S = 1.0
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class ModelInfo:
    """What a front end needs to tokenise for a model and to format its answers."""

    task: str
    max_length: int
    labels: list[str]
    tokenizer: Tokenizer
    vocab: int
    trim: int | None  # cut padding to a multiple of this past the longest text (None: keep)


class EngineError(ServingError):
    """An error the engine answered with, re-raised in the front end with its status."""

    def __init__(
        self, status: int, title: str, message: str, headers: dict[str, str] | None
    ) -> None:
        super().__init__(message)
        self.status, self.title, self.headers = status, title, headers


class Engine(Protocol):
    async def describe(self, model_id: str) -> ModelInfo | None: ...

    async def run_ids(
        self, model_id: str, version: str | None, input_ids: np.ndarray, mask: np.ndarray
    ) -> tuple[np.ndarray, bool]: ...

    def refuse(self, model_id: str, status: int) -> None: ...

    async def forward_call(self, call: Call) -> Answer: ...


# ------------------------------------------------------------------------ the engine's side


def describe_model(plane: DataPlane, model_id: str) -> dict[str, Any] | None:
    """What :class:`ModelInfo` holds, from the loaded model in ``plane`` (the tokenizer as its
    JSON); None when the model is unknown, not in memory, or has no tokenizer here."""
    model = plane.repository.models.get(model_id)
    if model is None or not model.ready:
        return None
    tokenizer, labels, vocab = getattr(model, "tokenizer", None), getattr(model, "labels", None), 0
    engine = getattr(model, "engine", None)
    if engine is not None:  # the cross-model engine keeps them per member
        member = engine.members.get(model_id)
        if member is None or engine.shape is None:
            return None
        tokenizer, labels, vocab = member.tokenizer, member.labels, engine.shape.vocab
    if tokenizer is None or labels is None or not model.max_length:
        return None
    return {
        "task": model.task,
        "max_length": model.max_length,
        "labels": list(labels),
        "tokenizer": tokenizer.to_str(),
        "vocab": vocab or tokenizer.get_vocab_size(),
        # Neuron graphs are compiled for one shape: the padding stays.
        "trim": None if model.processor == "inf" else TRIM_MULTIPLE,
    }


def model_info(described: dict[str, Any]) -> ModelInfo:
    return ModelInfo(
        task=described["task"],
        max_length=described["max_length"],
        labels=described["labels"],
        tokenizer=Tokenizer.from_str(described["tokenizer"]),
        vocab=described["vocab"],
        trim=described["trim"],
    )


class LocalEngine:
    """The data plane of this process as a front end's engine (``--workers 1``). Requests are
    coalesced as a front end's frames are: what arrives within one turn of the loop goes to
    :meth:`DataPlane.run_ids_frame` together, so one process batches as the engine process
    does."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self._waiting: dict[tuple[str, str | None], list[tuple[Any, asyncio.Future]]] = {}

    async def describe(self, model_id: str) -> ModelInfo | None:
        described = describe_model(self.plane, model_id)
        return None if described is None else model_info(described)

    async def run_ids(
        self, model_id: str, version: str | None, input_ids: np.ndarray, mask: np.ndarray
    ) -> tuple[np.ndarray, bool]:
        loop = asyncio.get_running_loop()
        if not self._waiting:
            loop.call_soon(self._flush)
        future = loop.create_future()
        waiting = self._waiting.setdefault((model_id, version), [])
        waiting.append(((input_ids, mask), future))
        result, cold = await future
        if isinstance(result, BaseException):
            raise result
        return result, cold

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, {}
        self.plane.run_ids_frame(
            [
                (model_id, version, [arrays for arrays, _ in items], _answer(items))
                for (model_id, version), items in waiting.items()
            ]
        )

    def refuse(self, model_id: str, status: int) -> None:
        self.plane.metrics.observe(model_id, status, 0.0, 0)

    async def forward_call(self, call: Call) -> Answer:
        return await answer_call(self.plane, call)


def _answer(items: list[tuple[Any, asyncio.Future]]) -> Any:
    def done(results: list[Any], cold: bool) -> None:
        for (_, future), result in zip(items, results, strict=True):
            if not future.done():
                future.set_result((result, cold))

    return done


# ------------------------------------------------------------------------ the front end


def tokenise(info: ModelInfo, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ids (in the narrowest type for the vocabulary) and 0/1 mask as uint8, cut as
    :func:`serving.build.modeling.encode` cuts them, so the answers are the engine's own."""
    encodings = encodings_of(info.tokenizer, texts)
    dtype = np.uint16 if info.vocab <= 1 << 16 else np.int32
    input_ids = np.array([e.ids for e in encodings], dtype=dtype)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.uint8)
    if info.trim:
        longest = int(mask.sum(axis=1).max())
        keep = min(input_ids.shape[1], -(-longest // info.trim) * info.trim)
        input_ids, mask = input_ids[:, :keep], mask[:, :keep]
    return np.ascontiguousarray(input_ids), np.ascontiguousarray(mask)


def v2_inputs(
    inputs: list[v2.Tensor],
) -> tuple[list[str] | None, np.ndarray | None, np.ndarray | None]:
    """Texts, or client-tokenised ids and mask as arrays, checked as the data plane checks
    them (:func:`serving.dataplane.plane.v2_inputs`)."""
    texts, input_ids, mask = plane_v2_inputs(inputs)
    if texts is not None:
        return texts, None, None
    return None, input_ids.numpy(), mask.numpy()


def wire_ids(model_id: str, info: ModelInfo, input_ids: np.ndarray) -> np.ndarray:
    """Client ids in the narrowest type that holds them; ids no type holds are refused with the
    engine's own message (the engine checks the rest against the vocabulary)."""
    low, high = int(input_ids.min()), int(input_ids.max())
    if low >= 0 and high < 1 << 16:
        return np.ascontiguousarray(input_ids, dtype=np.uint16)
    if low < 0 or high >= 1 << 31:
        raise InvalidInput(
            f"input_ids must lie in [0, {info.vocab}): the vocabulary of model {model_id}"
        )
    return np.ascontiguousarray(input_ids, dtype=np.int32)


class FrontEnd:
    """Answers hot-route calls: decode, tokenise, ``engine.run_ids``, format."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.infos: dict[str, ModelInfo] = {}
        self._retry_at: dict[str, float] = {}
        self._asking: dict[str, asyncio.Future] = {}

    async def info(self, model_id: str) -> ModelInfo | None:
        known = self.infos.get(model_id)
        if known is not None:
            return known
        if self._retry_at.get(model_id, 0.0) > time.monotonic():
            return None
        asking = self._asking.get(model_id)
        if asking is not None:  # one question per model, however many requests wait on it
            return await asyncio.shield(asking)
        asking = self._asking[model_id] = asyncio.get_running_loop().create_future()
        found = None
        try:
            found = await self.engine.describe(model_id)
        except Exception:  # noqa: BLE001 - the old way answers meanwhile
            logger.exception("could not describe model %s", model_id)
        finally:
            del self._asking[model_id]
            asking.set_result(found)
        if found is None:
            # Bounded: only ids the engine was asked about, and forgotten once past.
            if len(self._retry_at) > 10_000:
                self._retry_at.clear()
            self._retry_at[model_id] = time.monotonic() + RETRY_DESCRIBE_S
        else:
            self.infos[model_id] = found
        return found

    async def __call__(self, call: Call) -> Answer:
        info = await self.info(call.model_id)
        if info is None:
            return await self.engine.forward_call(call)
        if call.kind == "predict":
            return await self.predict(call, info)
        return await self.infer(call, info)

    async def predict(self, call: Call, info: ModelInfo) -> Answer:
        try:
            try:
                texts, single = parse_texts(call.body, call.content_type)
                check_texts(texts)
            except InvalidInput as exc:
                self.engine.refuse(call.model_id, exc.status)
                raise
            input_ids, mask = tokenise(info, texts)
            output, cold = await self.engine.run_ids(call.model_id, None, input_ids, mask)
            rows = len(texts)
            results = answer_rows(
                info.task, output, [info.labels] * rows, [_wants_raw(call.query_string)] * rows
            )
            body = _encode(results[0] if single else results)
            return Answer(200, body, JSON, COLD_START if cold else None)
        except ServingError as exc:
            return problem(exc.status, exc.title, str(exc), exc.headers)
        except Exception as exc:  # noqa: BLE001 - an answer, never a dropped connection
            logger.exception("internal error on /predictions/%s", call.model_id)
            return problem(500, "Internal error", type(exc).__name__)

    async def infer(self, call: Call, info: ModelInfo) -> Answer:
        model_id, version = call.model_id, call.version
        try:
            try:
                request, tensors = v2.decode_request(
                    call.body, call.header_length, model_id, version or MODEL_VERSION
                )
                texts, input_ids, mask = v2_inputs(tensors)
                if texts is not None:
                    input_ids, mask = tokenise(info, texts)
                else:
                    assert input_ids is not None and mask is not None
                    input_ids = wire_ids(model_id, info, input_ids)
                    mask = mask.astype(np.uint8)
            except InvalidInput as exc:
                self.engine.refuse(model_id, exc.status)
                raise
            output, cold = await self.engine.run_ids(model_id, version, input_ids, mask)
            outputs = output_rows(info.task, output)
            payload, headers = v2.encode_response(
                request, model_id, outputs, MODEL_VERSION if version else None
            )
            media_type = headers.pop("content-type")
            if cold:
                headers = {**headers, **COLD_START}
            return Answer(200, payload, media_type, headers or None)
        except EngineError as exc:
            message = str(exc)
            if exc.status == 500 and exc.title == "Internal error":
                message = f"internal error: {message}"
            return v2_error(exc.status, message, exc.headers)
        except ServingError as exc:
            return v2_error(exc.status, str(exc), exc.headers)
        except Exception as exc:  # noqa: BLE001 - an answer, never a dropped connection
            logger.exception("internal error on /v2/models/%s/infer", model_id)
            return v2_error(500, f"internal error: {type(exc).__name__}")
