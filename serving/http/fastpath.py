"""The hot routes of a model server without a web framework per request.

``POST /predictions/{model}`` and ``POST /v2/models/{model}[/versions/{v}]/infer`` carry
nearly all of a server's traffic. :class:`FastPath` is bare ASGI in front of the Litestar app:
it answers those two routes itself (read the body under the size limit, decode with msgspec,
call the :class:`serving.dataplane.plane.DataPlane`, encode with msgspec) and hands every other
request to the app, so routing, middleware, dependency injection and response objects cost
nothing where it matters and the rest keeps Litestar's validation and OpenAPI schema.

The routes' logic is here once, as :func:`predict_answer` and :func:`infer_answer`; the app's
own handlers for the same paths (what the OpenAPI schema documents, and what an in-process
test client reaches) call the same functions. Errors become answers here too: problem details
on the TorchServe-style route, ``{"error": ...}`` on v2, a logged traceback and a 500 for
anything untyped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import msgspec

from serving.dataplane.plane import DataPlane, cold_start, logger
from serving.dataplane.v2 import decode_json
from serving.errors import InvalidInput, ServingError
from serving.wire import COLD_START_HEADER

__all__ = [
    "MAX_BODY_BYTES",
    "Answer",
    "Call",
    "FastPath",
    "answer_call",
    "infer_answer",
    "parse_texts",
    "predict_answer",
]

MAX_BODY_BYTES = 1 << 20
JSON = "application/json"
PROBLEM = "application/problem+json"
_encode = msgspec.json.Encoder().encode
# On an answer whose request waited for its model to load (an on-demand model's cold start).
COLD_START = {COLD_START_HEADER: "1"}


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    media_type: str
    headers: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Call:
    """One request to a hot route, as read off the wire: all a data plane needs to answer it,
    here or in another process (:mod:`serving.http.workers`)."""

    kind: str  # "predict" or "infer"
    model_id: str
    version: str | None
    body: bytes
    content_type: str = ""
    query_string: bytes = b""
    header_length: str | None = None


class BodyTooLarge(Exception):
    """The body is over :data:`MAX_BODY_BYTES`."""


def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> Answer:
    body = _encode({"status": status, "title": title, "detail": detail})
    return Answer(status, body, PROBLEM, headers)


def v2_error(status: int, message: str, headers: dict[str, str] | None = None) -> Answer:
    return Answer(status, _encode({"error": message}), JSON, headers)


def parse_texts(body: bytes, content_type: str) -> tuple[list[str], bool]:
    """Texts from a JSON ``{"text": str | [str]}`` / ``[str]`` body or a raw text body.

    Returns the texts and whether the caller sent a single text (so it gets one answer back).
    """
    if "json" in content_type or body[:1] in (b"{", b"["):
        payload: Any = decode_json(body, Any)
        if isinstance(payload, dict):
            unknown = sorted(set(payload) - {"text", "texts"})
            if unknown:
                raise InvalidInput(f'unknown fields {unknown}; send {{"text": ...}}')
            payload = payload.get("text", payload.get("texts"))
        texts = payload
    else:
        try:
            texts = body.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput("raw text body is not UTF-8") from None
    single = isinstance(texts, str)
    if single:
        texts = [texts]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise InvalidInput('"text" must be a string or a list of strings')
    return texts, single


def wants_raw(query_string: bytes) -> bool:
    if not query_string:
        return False
    values = parse_qs(query_string.decode("latin-1")).get("raw", [])
    return bool(values) and values[-1] in ("1", "true")


async def predict_answer(
    plane: DataPlane, model_id: str, body: bytes, content_type: str, query_string: bytes
) -> Answer:
    """``POST /predictions/{model}``: one answer for one text, a list for a list."""
    try:
        try:
            texts, single = parse_texts(body, content_type)
        except InvalidInput as exc:
            plane.refuse(model_id, exc)
            raise
        cold_start.set(False)
        results = await plane.predict(model_id, texts, wants_raw(query_string))
        headers = COLD_START if cold_start.get() else None
        return Answer(200, _encode(results[0] if single else results), JSON, headers)
    except ServingError as exc:
        return problem(exc.status, exc.title, str(exc), exc.headers)
    except Exception as exc:  # noqa: BLE001 - an answer, never a dropped connection
        logger.exception("internal error on /predictions/%s", model_id)
        return problem(500, "Internal error", type(exc).__name__)


async def infer_answer(
    plane: DataPlane, model_id: str, version: str | None, body: bytes, header_length: str | None
) -> Answer:
    """``POST /v2/models/{model}[/versions/{v}]/infer``: JSON or binary tensors."""
    try:
        cold_start.set(False)
        payload, headers = await plane.infer(model_id, body, header_length, version)
        media_type = headers.pop("content-type")
        if cold_start.get():
            headers = {**headers, **COLD_START}
        return Answer(200, payload, media_type, headers or None)
    except ServingError as exc:
        return v2_error(exc.status, str(exc), exc.headers)
    except Exception as exc:  # noqa: BLE001 - an answer, never a dropped connection
        logger.exception("internal error on /v2/models/%s/infer", model_id)
        return v2_error(500, f"internal error: {type(exc).__name__}")


async def answer_call(plane: DataPlane, call: Call) -> Answer:
    if call.kind == "predict":
        return await predict_answer(
            plane, call.model_id, call.body, call.content_type, call.query_string
        )
    return await infer_answer(plane, call.model_id, call.version, call.body, call.header_length)


# ---------------------------------------------------------------------------------- ASGI


async def read_body(
    receive: Any, declared: int | None, limit: int | None = MAX_BODY_BYTES
) -> bytes:
    """The request's body; :class:`BodyTooLarge` past ``limit`` (None: no limit), as soon as
    the declared length or the bytes received show it."""
    if limit is not None and declared is not None and declared > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("the client went away before sending its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_answer(send: Any, answer: Answer) -> None:
    headers = [
        (b"content-type", answer.media_type.encode()),
        (b"content-length", str(len(answer.body)).encode()),
    ]
    if answer.headers:
        headers += [(k.lower().encode(), v.encode()) for k, v in answer.headers.items()]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


def route(path: str) -> tuple[str, str, str | None] | None:
    """``("predict", model, None)`` or ``("infer", model, version)`` for a hot path."""
    if path.startswith("/predictions/"):
        model_id = path[len("/predictions/") :]
        return ("predict", model_id, None) if model_id and "/" not in model_id else None
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        parts = path[len("/v2/models/") : -len("/infer")].split("/")
        if len(parts) == 1 and parts[0]:
            return "infer", parts[0], None
        if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
            return "infer", parts[0], parts[2]
    return None


class FastPath:
    """ASGI: the hot routes answered by ``answer`` (a :class:`DataPlane` here, or the engine
    process behind :mod:`serving.http.workers`), everything else (and lifespan) by ``app``."""

    def __init__(self, app: Any, answer: Callable[[Call], Awaitable[Answer]]) -> None:
        self.app = app
        self.answer = answer

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        target = None
        if scope["type"] == "http" and scope["method"] == "POST":
            target = route(scope["path"])
        if target is None:
            await self.app(scope, receive, send)
            return
        kind, model_id, version = target
        content_type, header_length, declared = "", None, None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"content-length":
                declared = int(value) if value.isdigit() else None
            elif name == b"inference-header-content-length":
                header_length = value.decode("latin-1")
        try:
            body = await read_body(receive, declared)
        except BodyTooLarge:
            limit = f"the body is over {MAX_BODY_BYTES} bytes"
            too_large = (
                v2_error(413, limit)
                if kind == "infer"
                else problem(413, "Request entity too large", limit)
            )
            await send_answer(send, too_large)
            return
        except ConnectionResetError:
            return
        call = Call(
            kind, model_id, version, body, content_type, scope["query_string"], header_length
        )
        await send_answer(send, await self.answer(call))
