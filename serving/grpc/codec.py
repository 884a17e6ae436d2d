"""The Open Inference Protocol's gRPC messages to and from the data plane's values: infer
inputs (typed ``contents`` or ``raw_input_contents``) as checked
:class:`serving.dataplane.v2.Tensor` arrays, outputs back as typed contents or raw bytes, and the
metadata, repository index and model configuration as their messages.

Every malformed request is an :class:`InvalidInput` naming the input and what is wrong, as on
REST.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from google.protobuf import json_format

from serving.dataplane import v2
from serving.dataplane.v2 import DATATYPES, INTEGER_TYPES, Tensor
from serving.errors import InvalidInput
from serving.grpc import grpc_service_pb2 as pb
from serving.grpc import model_config_pb2

# Which field of InferTensorContents carries each datatype (FP16 travels only as raw bytes).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _count(name: str, shape: list[int]) -> int:
    if any(dim < 0 for dim in shape):
        raise InvalidInput(f"input {name}: shape {shape} must be non-negative integers")
    count = 1
    for dim in shape:
        count *= dim
    return count


def _raw_values(name: str, datatype: str, shape: list[int], raw: bytes) -> np.ndarray | list:
    return v2.unpack_values(name, datatype, shape, raw, _count(name, shape), "raw contents")


def _typed_values(entry: pb.ModelInferRequest.InferInputTensor) -> np.ndarray | list:
    name, datatype, shape = entry.name, entry.datatype, list(entry.shape)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"input {name}: {datatype} travels only as raw_input_contents")
    count = _count(name, shape)
    used = [f.name for f, _ in entry.contents.ListFields()]
    if any(other != field for other in used):
        raise InvalidInput(f"input {name}: {datatype} data belongs in contents.{field}, not {used}")
    data = getattr(entry.contents, field)
    if len(data) != count:
        raise InvalidInput(f"input {name}: shape {shape} holds {count} values, got {len(data)}")
    if datatype == "BYTES":
        return list(data)
    dtype = DATATYPES[datatype]
    # The wide fields (int32, uint32) carry narrower types: their values must fit.
    if datatype in INTEGER_TYPES and count:
        wide = np.asarray(data, dtype=np.int64 if datatype != "UINT64" else np.uint64)
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidInput(f"input {name}: a value is out of range for {datatype}")
        return wide.astype(dtype)
    return np.asarray(data, dtype=dtype)


def decode_inputs(request: pb.ModelInferRequest) -> tuple[list[Tensor], bool]:
    """The request's inputs as checked tensors, and whether they came as raw contents (the
    answer then comes the same way)."""
    if not request.inputs:
        raise InvalidInput("no inputs")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
            "give one per input, in order, or use contents"
        )
    tensors = []
    for index, entry in enumerate(request.inputs):
        if entry.datatype not in DATATYPES:
            raise InvalidInput(
                f"input {entry.name}: unknown datatype {entry.datatype!r}; one of "
                + ", ".join(DATATYPES)
            )
        if raw:
            if entry.HasField("contents"):
                raise InvalidInput(f"input {entry.name}: both contents and raw_input_contents")
            values = _raw_values(entry.name, entry.datatype, list(entry.shape), raw[index])
        else:
            values = _typed_values(entry)
        shape = tuple(entry.shape)
        tensors.append(Tensor(name=entry.name, datatype=entry.datatype, shape=shape, values=values))
    return tensors, bool(raw)


def _raw_bytes(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in tensor.values)
    dtype = DATATYPES[tensor.datatype]
    return np.ascontiguousarray(tensor.values, dtype=dtype.newbyteorder("<")).tobytes()


def encode_response(
    request: pb.ModelInferRequest, outputs: list[Tensor], raw: bool, model_version: str
) -> pb.ModelInferResponse:
    """The answer: the outputs the request names (all when it names none), as raw contents
    when ``raw``, else in the typed contents field of each datatype."""
    by_name = {o.name: o for o in outputs}
    if request.outputs:
        unknown = [o.name for o in request.outputs if o.name not in by_name]
        if unknown:
            raise InvalidInput(f"unknown outputs {unknown}; this model has {sorted(by_name)}")
        outputs = [by_name[o.name] for o in request.outputs]
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version=model_version, id=request.id
    )
    for tensor in outputs:
        entry = response.outputs.add(
            name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape)
        )
        if raw:
            response.raw_output_contents.append(_raw_bytes(tensor))
        elif tensor.datatype == "BYTES":
            entry.contents.bytes_contents.extend(tensor.values)
        else:
            values = np.asarray(tensor.values).reshape(-1).tolist()
            getattr(entry.contents, CONTENTS_FIELD[tensor.datatype]).extend(values)
    return response


def server_metadata(metadata: dict[str, Any]) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(
        name=metadata["name"], version=metadata["version"], extensions=metadata["extensions"]
    )


def model_metadata(metadata: dict[str, Any]) -> pb.ModelMetadataResponse:
    def tensors(entries: list[dict[str, Any]]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
        return [
            pb.ModelMetadataResponse.TensorMetadata(
                name=e["name"], datatype=e["datatype"], shape=e["shape"]
            )
            for e in entries
        ]

    return pb.ModelMetadataResponse(
        name=metadata["name"],
        versions=metadata["versions"],
        platform=metadata["platform"],
        inputs=tensors(metadata["inputs"]),
        outputs=tensors(metadata["outputs"]),
    )


def repository_index(index: list[dict[str, Any]]) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(
                name=e["name"], version=e["version"], state=e["state"], reason=e.get("reason", "")
            )
            for e in index
        ]
    )


def model_config(config: dict[str, Any]) -> pb.ModelConfigResponse:
    """Triton's JSON form of a model configuration (what REST answers) as its message."""
    message = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    return pb.ModelConfigResponse(config=message)
