"""The KServe v2 wire format in-process: every datatype in JSON and in binary, shapes that do
not match their data, and binary outputs read back as a client would."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from serving.dataplane import v2
from serving.errors import InvalidInput

NUMERIC = [name for name, dtype in v2.DATATYPES.items() if dtype is not None]


def _binary_request(inputs: list[tuple[dict, bytes]], **extra: object) -> tuple[bytes, str]:
    header = json.dumps(
        {
            "inputs": [
                {**entry, "parameters": {"binary_data_size": len(raw)}} for entry, raw in inputs
            ],
            **extra,
        }
    ).encode()
    return header + b"".join(raw for _, raw in inputs), str(len(header))


@pytest.mark.parametrize("datatype", NUMERIC)
def test_every_numeric_datatype_in_json_and_binary(datatype: str) -> None:
    dtype = v2.DATATYPES[datatype]
    values = np.array([[1, 0, 1], [0, 1, 1]]).astype(dtype)
    entry = {"name": "x", "datatype": datatype, "shape": [2, 3]}
    as_json = json.dumps({"inputs": [{**entry, "data": values.flatten().tolist()}]}).encode()
    _, (tensor,) = v2.decode_request(as_json, None)
    np.testing.assert_array_equal(tensor.values.reshape(2, 3), values)
    body, length = _binary_request([(entry, values.astype(dtype.newbyteorder("<")).tobytes())])
    _, (binary,) = v2.decode_request(body, length)
    np.testing.assert_array_equal(binary.values.reshape(2, 3), values)


def test_bytes_in_binary_and_several_inputs_in_order() -> None:
    texts = [b"hello", b"", "héllo".encode()]
    raw = b"".join(struct.pack("<I", len(t)) + t for t in texts)
    ids = np.arange(4, dtype=np.int64)
    body, length = _binary_request(
        [
            ({"name": "text", "datatype": "BYTES", "shape": [3]}, raw),
            ({"name": "ids", "datatype": "INT64", "shape": [2, 2]}, ids.tobytes()),
        ]
    )
    _, (text, numbers) = v2.decode_request(body, length)
    assert text.values == texts
    np.testing.assert_array_equal(numbers.values, ids)


@pytest.mark.parametrize(
    ("body", "length", "message"),
    [
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0]}]}',
            None,
            "holds 2",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1.5]}]}',
            None,
            "another type",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}]}',
            None,
            "another type",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [-1]}]}',
            None,
            "out of range",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [3]}]}',
            None,
            "strings",
        ),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}', None, "no data"),
        (b'{"inputs": []}', None, "no inputs"),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], '
            b'"bogus": 1}]}',
            None,
            "bogus",
        ),
        (b"{}", "7", "does not fit"),
        (b"{}", "x", "not a number"),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": '
            + b"[" * 50_000
            + b"]" * 50_000
            + b"}]}",
            None,
            "nested too deeply",
        ),
    ],
)
def test_malformed_requests_name_what_is_wrong(
    body: bytes, length: str | None, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        v2.decode_request(body, length)


def test_binary_sizes_must_match() -> None:
    entry = {"name": "x", "datatype": "FP32", "shape": [2]}
    body, length = _binary_request([(entry, b"\0" * 4)])
    with pytest.raises(InvalidInput, match="needs 8"):
        v2.decode_request(body, length)
    body, length = _binary_request([(entry, b"\0" * 8)])
    with pytest.raises(InvalidInput, match="belong to no input"):
        v2.decode_request(body + b"\0", length)
    truncated = {"name": "t", "datatype": "BYTES", "shape": [1]}
    body, length = _binary_request([(truncated, struct.pack("<I", 9) + b"abc")])
    with pytest.raises(InvalidInput, match="runs past"):
        v2.decode_request(body, length)


def test_binary_outputs_follow_the_json_header() -> None:
    logits = np.array([[0.5, -1.0]], dtype=np.float32)
    outputs = [
        v2.Tensor(name="logits", datatype="FP32", shape=(1, 2), values=logits),
        v2.Tensor(name="label", datatype="BYTES", shape=(1,), values=[b"0"]),
    ]
    request = v2.InferRequest(
        inputs=[], outputs=[v2.RequestedOutput(name="logits", parameters={"binary_data": True})]
    )
    body, headers = v2.encode_response(request, "m", outputs)
    length = int(headers[v2.HEADER_LENGTH])
    header = json.loads(body[:length])
    assert [o["name"] for o in header["outputs"]] == ["logits"]
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 8
    np.testing.assert_array_equal(np.frombuffer(body[length:], dtype="<f4"), logits.flatten())
    plain, plain_headers = v2.encode_response(v2.InferRequest(inputs=[]), "m", outputs)
    assert plain_headers == {"content-type": "application/json"}
    assert json.loads(plain)["outputs"][1]["data"] == ["0"]
    with pytest.raises(InvalidInput, match="unknown outputs"):
        v2.encode_response(
            v2.InferRequest(inputs=[], outputs=[v2.RequestedOutput(name="nope")]), "m", outputs
        )
