"""The binary frames between front ends and the engine process (``--workers N``).

A front end tokenises and sends token ids; the engine process runs forwards and sends back
output rows. Several requests travel in one frame (a front end coalesces what it has within
one turn of its event loop), so the engine pays one ZeroMQ message, one decode and one reply
for many requests, and never parses JSON or builds Python lists of tokens.

Request frame (front end to engine), little-endian::

    "MQ" u8 version u16 items
    per item: u32 request id, u8 kind, u8 ids dtype, u16 model-id length, u8 version length,
              u8 reserved, u16 rows, u16 cols,
              model id (UTF-8), version (UTF-8, empty for none),
              ids: rows x cols of the dtype (1: uint16, 2: int32), row-major,
              mask: rows x cols uint8 (0/1)

A refusal item (kind 2) has no rows: ``rows`` holds the HTTP status of a request the front end
refused before any model saw it, so the engine counts it in its metrics as a one-process server
does.

Reply frame (engine to front end)::

    "MR" u8 version u16 items
    per item: u32 request id, u16 status, u8 flags (1: the request waited for a cold load),
              u8 reserved, u16 rows, u16 cols,
              status 200: rows x cols float32 (logits or embeddings), row-major;
              otherwise: u32 length, then msgpack [title, message, headers] (errors only)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgspec
import numpy as np

VERSION = 1
IDS, REFUSAL = 1, 2
COLD_START = 1
DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<i4")}
CODES = {np.dtype("<u2"): 1, np.dtype("<i4"): 2}

_FRAME = struct.Struct("<2sBH")
_REQUEST_ITEM = struct.Struct("<IBBHBBHH")
_REPLY_ITEM = struct.Struct("<IHBBHH")
_LENGTH = struct.Struct("<I")
_errors = msgspec.msgpack.Encoder()
_error_fields = msgspec.msgpack.Decoder(tuple)


class FrameError(ValueError):
    """A frame that does not parse (a bug or a foreign peer, never a client's input)."""


@dataclass(slots=True)
class IdsItem:
    """One request's token ids (kind ``IDS``) or a refusal (kind ``REFUSAL``, status in
    ``status``)."""

    request_id: int
    model_id: str
    version: str | None
    input_ids: np.ndarray | None  # rows x cols, uint16 or int32
    attention_mask: np.ndarray | None  # rows x cols, uint8
    kind: int = IDS
    status: int = 0


@dataclass(slots=True)
class ReplyItem:
    request_id: int
    status: int
    output: np.ndarray | None = None  # rows x cols float32 when status is 200
    cold_start: bool = False
    title: str = ""
    message: str = ""
    headers: dict[str, str] | None = None


def ids_dtype(vocab: int) -> np.dtype:
    """The narrowest wire type for a vocabulary's ids."""
    return np.dtype("<u2") if vocab <= 1 << 16 else np.dtype("<i4")


def encode_ids_item(
    request_id: int,
    model_id: str,
    version: str | None,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
) -> bytes:
    """One item's bytes; ``input_ids`` must already be uint16 or int32 (see :func:`ids_dtype`)."""
    rows, cols = input_ids.shape
    name = model_id.encode()
    tag = (version or "").encode()
    head = _REQUEST_ITEM.pack(
        request_id, IDS, CODES[input_ids.dtype], len(name), len(tag), 0, rows, cols
    )
    mask = attention_mask if attention_mask.dtype == np.uint8 else attention_mask.astype(np.uint8)
    return b"".join((head, name, tag, input_ids.tobytes(), mask.tobytes()))


def encode_refusal(request_id: int, model_id: str, status: int) -> bytes:
    name = model_id.encode()
    return _REQUEST_ITEM.pack(request_id, REFUSAL, 0, len(name), 0, 0, status, 0) + name


def frame(magic: bytes, items: list[bytes]) -> bytes:
    return _FRAME.pack(magic, VERSION, len(items)) + b"".join(items)


def request_frame(items: list[bytes]) -> bytes:
    return frame(b"MQ", items)


def reply_frame(items: list[bytes]) -> bytes:
    return frame(b"MR", items)


def _open(data: bytes, magic: bytes) -> tuple[int, int]:
    if len(data) < _FRAME.size:
        raise FrameError("frame shorter than its header")
    found, version, count = _FRAME.unpack_from(data, 0)
    if found != magic or version != VERSION:
        raise FrameError(f"not a version-{VERSION} {magic!r} frame")
    return count, _FRAME.size


def decode_request_frame(data: bytes) -> list[IdsItem]:
    """The items of a request frame; the arrays are read-only views into ``data``."""
    count, offset = _open(data, b"MQ")
    items = []
    try:
        for _ in range(count):
            request_id, kind, code, name_len, tag_len, _, rows, cols = _REQUEST_ITEM.unpack_from(
                data, offset
            )
            offset += _REQUEST_ITEM.size
            model_id = data[offset : offset + name_len].decode()
            offset += name_len
            version = data[offset : offset + tag_len].decode() if tag_len else None
            offset += tag_len
            if kind == REFUSAL:
                items.append(IdsItem(request_id, model_id, version, None, None, REFUSAL, rows))
                continue
            dtype = DTYPES[code]
            size = rows * cols
            # (one ndarray call each: frombuffer and reshape cost twice as much)
            ids = np.ndarray((rows, cols), dtype, data, offset)
            offset += size * dtype.itemsize
            mask = np.ndarray((rows, cols), np.uint8, data, offset)
            offset += size
            items.append(IdsItem(request_id, model_id, version, ids, mask))
    except (struct.error, ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise FrameError(f"malformed request frame: {exc}") from None
    if offset != len(data):
        raise FrameError(f"{len(data) - offset} bytes past the frame's last item")
    return items


def encode_output(request_id: int, output: np.ndarray, cold_start: bool = False) -> bytes:
    rows, cols = output.shape
    values = output if output.dtype == np.float32 else output.astype(np.float32)
    head = _REPLY_ITEM.pack(request_id, 200, COLD_START if cold_start else 0, 0, rows, cols)
    return head + values.tobytes()


def encode_error(
    request_id: int,
    status: int,
    title: str,
    message: str,
    headers: dict[str, str] | None = None,
    cold_start: bool = False,
) -> bytes:
    payload = _errors.encode([title, message, headers])
    head = _REPLY_ITEM.pack(request_id, status, COLD_START if cold_start else 0, 0, 0, 0)
    return head + _LENGTH.pack(len(payload)) + payload


def decode_reply_frame(data: bytes) -> list[ReplyItem]:
    count, offset = _open(data, b"MR")
    items = []
    try:
        for _ in range(count):
            request_id, status, flags, _, rows, cols = _REPLY_ITEM.unpack_from(data, offset)
            offset += _REPLY_ITEM.size
            cold = bool(flags & COLD_START)
            if status == 200:
                size = rows * cols
                output = np.frombuffer(data, np.float32, size, offset).reshape(rows, cols)
                offset += size * 4
                items.append(ReplyItem(request_id, 200, output, cold))
                continue
            (length,) = _LENGTH.unpack_from(data, offset)
            offset += _LENGTH.size
            title, message, headers = _error_fields.decode(data[offset : offset + length])
            offset += length
            items.append(ReplyItem(request_id, status, None, cold, title, message, headers))
    except (struct.error, ValueError, msgspec.DecodeError) as exc:
        raise FrameError(f"malformed reply frame: {exc}") from None
    if offset != len(data):
        raise FrameError(f"{len(data) - offset} bytes past the frame's last item")
    return items
