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
from collections.abc import Collection, Sequence
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


# What a request may carry: the protocol's fields, each optional one also as null (KServe's own
# server, pydantic, takes null for them), and the model's name and version that KServe's SDK and
# the gRPC form of the protocol put in the body. Parameters are free-form per the protocol: the
# ones this server honours are checked (see :func:`_check_request`), the others ignored.
class RequestInput(_Wire, kw_only=True):
    name: str
    datatype: str
    shape: list[int]
    data: Any = None
    parameters: dict[str, Any] | None = None


class RequestedOutput(_Wire, kw_only=True):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(_Wire, kw_only=True):
    id: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    inputs: list[RequestInput]
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None


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


def unpack_values(
    name: str, datatype: str, shape: Sequence[int], raw: bytes, count: int, what: str
) -> np.ndarray | list[bytes]:
    """A tensor's values from its raw little-endian bytes, as the binary data extension (REST)
    and ``raw_input_contents`` (gRPC) carry them: BYTES elements each after a 4-byte length,
    other types packed; ``what`` names the bytes in errors ("binary data", "raw contents")."""
    if datatype == "BYTES":
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
                f"input {name}: shape {list(shape)} holds {count} values, got {len(values)}"
            )
        return values
    dtype = DATATYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"input {name}: {len(raw)} bytes of {what}; shape {list(shape)} of "
            f"{datatype} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)


# Parameters of Triton's extensions this server does not implement: ignoring them would answer
# something other than what was asked (data left in a shared-memory region, top-k classes), so
# they are refused by name.
UNSUPPORTED_PARAMETERS = {
    "shared_memory_region": "shared memory",
    "shared_memory_byte_size": "shared memory",
    "shared_memory_offset": "shared memory",
    "classification": "classification",
}


def _parameter(parameters: dict[str, Any] | None, key: str, kind: type, where: str) -> Any:
    """A parameter this server honours, checked to be of ``kind`` (bool or int); None if
    absent."""
    value = (parameters or {}).get(key)
    if value is not None and (
        not isinstance(value, kind) or (kind is int and isinstance(value, bool))
    ):
        expected = "true or false" if kind is bool else "an integer"
        raise InvalidInput(f"{where}: parameter {key} must be {expected}, got {value!r}")
    return value


def _refuse_unsupported(parameters: dict[str, Any] | None, where: str) -> None:
    for key in parameters or {}:
        if key in UNSUPPORTED_PARAMETERS:
            raise InvalidInput(
                f"{where}: parameter {key}: this server does not implement the "
                f"{UNSUPPORTED_PARAMETERS[key]} extension (see GET /v2 for the ones it does)"
            )


def _check_request(request: InferRequest, model_id: str | None, version: str | None) -> None:
    """What the body says beside its tensors: the model it names agrees with the path, input
    and output names are distinct, and the parameters this server honours are well-typed."""
    if model_id is not None and request.model_name and request.model_name != model_id:
        raise InvalidInput(
            f"model_name {request.model_name!r} in the body does not match the model "
            f"{model_id!r} in the path"
        )
    if version is not None and request.model_version and request.model_version != version:
        raise InvalidInput(
            f"model_version {request.model_version!r} in the body does not match the version "
            f"{version!r} the path addresses"
        )
    if not request.inputs:
        raise InvalidInput("no inputs")
    for kind, names in (
        ("input", [entry.name for entry in request.inputs]),
        ("output", [entry.name for entry in request.outputs or []]),
    ):
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise InvalidInput(f"{kind}s named more than once: {repeated}")
    _parameter(request.parameters, "binary_data_output", bool, "request")
    _refuse_unsupported(request.parameters, "request")
    for entry in request.inputs:
        _refuse_unsupported(entry.parameters, f"input {entry.name}")
    for output in request.outputs or []:
        _parameter(output.parameters, "binary_data", bool, f"output {output.name}")
        _refuse_unsupported(output.parameters, f"output {output.name}")


def decode_request(
    body: bytes,
    header_length: str | None,
    model_id: str | None = None,
    version: str | None = None,
) -> tuple[InferRequest, list[Tensor]]:
    """The request and its inputs as checked tensors, from JSON or the binary extension.

    ``model_id`` and ``version``: what the path addresses (the version the server resolves
    when the path names none); a ``model_name`` or ``model_version`` in the body must agree."""
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
    _check_request(request, model_id, version)
    tensors = []
    offset = 0
    for entry in request.inputs:
        if entry.datatype not in DATATYPES:
            raise InvalidInput(
                f"input {entry.name}: unknown datatype {entry.datatype!r}; one of "
                + ", ".join(DATATYPES)
            )
        count = _count(entry.shape, entry.name)
        size = _parameter(entry.parameters, "binary_data_size", int, f"input {entry.name}")
        if size is not None:
            if size < 0 or offset + size > len(binary):
                raise InvalidInput(
                    f"input {entry.name}: binary_data_size {size!r} runs past the body"
                )
            if entry.data is not None:
                raise InvalidInput(f"input {entry.name}: both data and binary_data_size")
            values = unpack_values(
                entry.name,
                entry.datatype,
                entry.shape,
                binary[offset : offset + size],
                count,
                "binary data",
            )
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


def config_type(datatype: str) -> str:
    """A v2 datatype as Triton's model configuration spells it (BYTES is ``TYPE_STRING``)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def model_config(
    metadata: dict[str, Any],
    *,
    max_batch_size: int,
    backend: str,
    instance_kind: str,
    optional_inputs: Collection[str] = (),
    parameters: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Triton model configuration (the JSON form of Triton's ``ModelConfig`` message, as its
    ``GET /v2/models/{m}/config`` answers and its clients read) from a model's v2 metadata.

    With ``max_batch_size`` > 0 every tensor is batched along its first dimension, which
    Triton leaves out of ``dims``; a tensor that is only a batch of scalars is ``dims [1]``
    reshaped to ``[]``, as Triton writes it."""

    def tensor(entry: dict[str, Any]) -> dict[str, Any]:
        dims = list(entry["shape"][1:] if max_batch_size > 0 else entry["shape"])
        config: dict[str, Any] = {
            "name": entry["name"],
            "data_type": config_type(entry["datatype"]),
            "dims": dims or [1],
        }
        if not dims:
            config["reshape"] = {"shape": []}
        return config

    inputs = [tensor(entry) for entry in metadata["inputs"]]
    for entry in inputs:
        if entry["name"] in optional_inputs:
            entry["optional"] = True
    return {
        "name": metadata["name"],
        "platform": metadata["platform"],
        "backend": backend,
        "version_policy": {"specific": {"versions": [int(v) for v in metadata["versions"]]}},
        "max_batch_size": max_batch_size,
        "input": inputs,
        "output": [tensor(entry) for entry in metadata["outputs"]],
        "instance_group": [{"name": metadata["name"], "kind": instance_kind, "count": 1}],
        "parameters": {key: {"string_value": value} for key, value in (parameters or {}).items()},
    }


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
    binary_all = bool((request.parameters or {}).get("binary_data_output", False))
    if request.outputs:
        unknown = [o.name for o in request.outputs if o.name not in by_name]
        if unknown:
            raise InvalidInput(f"unknown outputs {unknown}; this model has {sorted(by_name)}")
        wanted = [
            (by_name[o.name], bool((o.parameters or {}).get("binary_data", binary_all)))
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
