"""The KServe v2 (Open Inference Protocol) wire format: typed request and response structs, the
tensor datatypes, and the binary tensor data extension both ways.

No web framework here: :func:`decode_request` takes the body and the value of the
``Inference-Header-Content-Length`` header and returns the request with every input as a
checked array; :func:`encode_response` gives the body and headers of an answer, with the outputs
asked for in binary after the JSON header. Every malformed request is an :class:`InvalidInput`
naming the input and what is wrong with it.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec
import numpy as np

from serving.errors import InvalidInput

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data", "model_repository"]

DATATYPES: dict[str, np.dtype | None] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": None,
}
INTEGER_TYPES = {
    name for name, dtype in DATATYPES.items() if dtype is not None and dtype.kind in "iu"
}


class _Wire(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


class RequestInput(_Wire, kw_only=True):
    name: str
    datatype: str
    shape: list[int]
    data: Any = None
    parameters: dict[str, Any] = {}


class RequestedOutput(_Wire, kw_only=True):
    name: str
    parameters: dict[str, Any] = {}


class InferRequest(_Wire, kw_only=True):
    id: str | None = None
    inputs: list[RequestInput]
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] = {}


class ResponseOutput(_Wire, kw_only=True):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = None
    parameters: dict[str, Any] = {}


class InferResponse(_Wire, kw_only=True):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[ResponseOutput]


class Tensor(msgspec.Struct, kw_only=True):
    """An input or output as an array: numbers as numpy, BYTES as a list of bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: np.ndarray | list[bytes]


def decode_json(body: bytes, kind: type) -> Any:
    """``body`` as ``kind``; a body that is not valid, or nested past what the decoder
    recurses into, is an :class:`InvalidInput` (msgspec raises RecursionError cleanly)."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"not a KServe v2 request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidInput("JSON nested too deeply") from None


def _count(shape: list[int], name: str) -> int:
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise InvalidInput(f"input {name}: shape {shape} must be non-negative integers")
    count = 1
    for dim in shape:
        count *= dim
    return count


def _flatten(data: Any, name: str) -> list:
    """Row-major values of a flat or nested ``data`` list (without recursion: a client may
    nest as deep as the decoder allows)."""
    if not isinstance(data, list):
        raise InvalidInput(f"input {name}: data must be a list")
    if all(not isinstance(item, list) for item in data):
        return data
    flat: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _json_values(entry: RequestInput, count: int) -> np.ndarray | list[bytes]:
    name, datatype = entry.name, entry.datatype
    if entry.data is None:
        raise InvalidInput(f"input {name}: no data (and no binary_data_size parameter)")
    flat = _flatten(entry.data, name)
    if len(flat) != count:
        raise InvalidInput(
            f"input {name}: shape {entry.shape} holds {count} values, got {len(flat)}"
        )
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise InvalidInput(f"input {name}: BYTES data must be strings")
        return [v.encode() for v in flat]
    dtype = DATATYPES[datatype]
    if datatype == "BOOL":
        ok = all(isinstance(v, bool) for v in flat)
    elif datatype in INTEGER_TYPES:
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in flat)
    else:
        ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat)
    if not ok:
        raise InvalidInput(f"input {name}: {datatype} data has values of another type")
    if datatype in INTEGER_TYPES:
        info = np.iinfo(dtype)
        if flat and (min(flat) < info.min or max(flat) > info.max):
            raise InvalidInput(f"input {name}: a value is out of range for {datatype}")
    return np.asarray(flat, dtype=dtype)


def _binary_values(entry: RequestInput, raw: bytes, count: int) -> np.ndarray | list[bytes]:
    name = entry.name
    if entry.datatype == "BYTES":
        values: list[bytes] = []
        offset = 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise InvalidInput(f"input {name}: truncated BYTES element length")
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise InvalidInput(f"input {name}: BYTES element runs past its data")
            values.append(raw[offset : offset + length])
            offset += length
        if len(values) != count:
            raise InvalidInput(
                f"input {name}: shape {entry.shape} holds {count} values, got {len(values)}"
            )
        return values
    dtype = DATATYPES[entry.datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"input {name}: {len(raw)} bytes of binary data; shape {entry.shape} of "
            f"{entry.datatype} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)


def decode_request(body: bytes, header_length: str | None) -> tuple[InferRequest, list[Tensor]]:
    """The request and its inputs as checked tensors, from JSON or the binary extension."""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH}: {header_length!r} is not a number") from None
        if not 0 < length <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} {length} does not fit a body of {len(body)} bytes")
        header, binary = body[:length], body[length:]
    else:
        header, binary = body, b""
    request = decode_json(header, InferRequest)
    if not request.inputs:
        raise InvalidInput("no inputs")
    tensors = []
    offset = 0
    for entry in request.inputs:
        if entry.datatype not in DATATYPES:
            raise InvalidInput(
                f"input {entry.name}: unknown datatype {entry.datatype!r}; one of "
                + ", ".join(DATATYPES)
            )
        count = _count(entry.shape, entry.name)
        size = entry.parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput(
                    f"input {entry.name}: binary_data_size {size!r} runs past the body"
                )
            if entry.data is not None:
                raise InvalidInput(f"input {entry.name}: both data and binary_data_size")
            values = _binary_values(entry, binary[offset : offset + size], count)
            offset += size
        else:
            values = _json_values(entry, count)
        tensors.append(
            Tensor(
                name=entry.name, datatype=entry.datatype, shape=tuple(entry.shape), values=values
            )
        )
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data belong to no input")
    return request, tensors


def _binary_bytes(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in tensor.values)
    return np.ascontiguousarray(
        tensor.values, dtype=DATATYPES[tensor.datatype].newbyteorder("<")
    ).tobytes()


def _json_data(tensor: Tensor) -> list[Any]:
    if tensor.datatype == "BYTES":
        return [v.decode("utf-8", errors="replace") for v in tensor.values]
    return np.asarray(tensor.values).reshape(-1).tolist()


def encode_response(
    request: InferRequest, model_name: str, outputs: list[Tensor], model_version: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """The answer's body and headers. Only the outputs the request names are sent (all when it
    names none); those asked for with ``binary_data`` (or all, with the request's
    ``binary_data_output``) follow the JSON header as raw bytes."""
    by_name = {o.name: o for o in outputs}
    binary_all = bool(request.parameters.get("binary_data_output", False))
    if request.outputs:
        unknown = [o.name for o in request.outputs if o.name not in by_name]
        if unknown:
            raise InvalidInput(f"unknown outputs {unknown}; this model has {sorted(by_name)}")
        wanted = [
            (by_name[o.name], bool(o.parameters.get("binary_data", binary_all)))
            for o in request.outputs
        ]
    else:
        wanted = [(o, binary_all) for o in outputs]
    entries, chunks = [], []
    for tensor, binary in wanted:
        if binary:
            raw = _binary_bytes(tensor)
            chunks.append(raw)
            entries.append(
                ResponseOutput(
                    name=tensor.name,
                    datatype=tensor.datatype,
                    shape=list(tensor.shape),
                    parameters={"binary_data_size": len(raw)},
                )
            )
        else:
            entries.append(
                ResponseOutput(
                    name=tensor.name,
                    datatype=tensor.datatype,
                    shape=list(tensor.shape),
                    data=_json_data(tensor),
                )
            )
    header = msgspec.json.encode(
        InferResponse(
            model_name=model_name, model_version=model_version, id=request.id, outputs=entries
        )
    )
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {
        "content-type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }
