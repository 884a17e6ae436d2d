"""The KServe v2 wire format in-process: every datatype in JSON and in binary, shapes that do
not match their data, and binary outputs read back as a client would."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

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


TEXT = {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}


def _request(**fields: object) -> bytes:
    return json.dumps({"inputs": [TEXT], **fields}).encode()


@pytest.mark.parametrize(
    "fields",
    [
        # KServe's Python SDK (InferRequest.to_rest): a uuid id and the model's name.
        {"id": "0b9c", "model_name": "m"},
        {"model_name": "m", "model_version": "1"},
        # Optional fields as null, as a pydantic client writes them.
        {"id": None, "parameters": None, "outputs": None, "model_version": None},
        # Parameters this server does not know are ignored (Triton's sequence and priority
        # parameters, a client's own), whatever their value.
        {"parameters": {"sequence_id": 3, "priority": 1, "timeout": 100, "mine": "x"}},
        {"outputs": [{"name": "logits", "parameters": {"binary_data": False, "x": 1}}]},
        {"outputs": [{"name": "logits", "parameters": None}]},
    ],
)
def test_what_clients_send_beside_the_tensors_is_accepted(fields: dict) -> None:
    request, (tensor,) = v2.decode_request(_request(**fields), None, "m", "1")
    assert tensor.values == [b"hi"]
    assert request.model_name == fields.get("model_name")


def test_input_parameters_besides_binary_size_are_ignored() -> None:
    entry = {**TEXT, "parameters": {"content_type": "str", "binary_data_size": None}}
    _, (tensor,) = v2.decode_request(json.dumps({"inputs": [entry]}).encode(), None)
    assert tensor.values == [b"hi"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model_name": "other"}, "model_name 'other' in the body does not match the model 'm'"),
        ({"model_version": "7"}, "model_version '7' in the body does not match the version '1'"),
        ({"parameters": {"binary_data_output": "yes"}}, "binary_data_output must be true or"),
        (
            {"outputs": [{"name": "logits", "parameters": {"binary_data": 1}}]},
            "output logits: parameter binary_data must be true or false",
        ),
        (
            {"outputs": [{"name": "logits", "parameters": {"classification": 2}}]},
            "output logits: parameter classification: .* classification extension",
        ),
        ({"outputs": [{"name": "a"}, {"name": "a"}]}, r"outputs named more than once: \['a'\]"),
        ({"model": "m"}, "unknown field `model`"),
        ({"inputs": [TEXT, TEXT]}, r"inputs named more than once: \['text'\]"),
        (
            {
                "inputs": [
                    {
                        **TEXT,
                        "data": None,
                        "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 8},
                    }
                ]
            },
            "input text: parameter shared_memory_region: .* shared memory extension",
        ),
        (
            {"inputs": [{**TEXT, "parameters": {"binary_data_size": "4"}}]},
            "binary_data_size must be an integer",
        ),
    ],
)
def test_what_the_server_cannot_honour_is_refused_by_name(fields: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        v2.decode_request(_request(**fields), None, "m", "1")


def test_a_body_naming_the_model_is_only_checked_against_a_path() -> None:
    # In-process callers that decode without a path (gRPC carries the name in the message).
    request, _ = v2.decode_request(_request(model_name="any", model_version="9"), None)
    assert (request.model_name, request.model_version) == ("any", "9")


METADATA = {
    "name": "m",
    "versions": ["1"],
    "platform": "myriad",
    "inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [-1]},
        {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
    ],
    "outputs": [
        {"name": "logits", "datatype": "FP32", "shape": [-1, -1]},
        {"name": "ok", "datatype": "BOOL", "shape": [-1]},
    ],
}


def test_model_config_is_a_triton_model_config() -> None:
    config = v2.model_config(
        METADATA,
        max_batch_size=64,
        backend="torchscript",
        instance_kind="KIND_CPU",
        optional_inputs=["input_ids"],
        parameters={"task": "sequence-classification"},
    )
    # Every field is one of Triton's ModelConfig message: its gRPC form parses from this. In a
    # process of its own: KServe's SDK, imported by other tests, registers protobuf messages
    # under the same names as Triton's, and the two cannot load in one process.
    parse = (
        "import json, sys\n"
        "from google.protobuf import json_format\n"
        "from tritonclient.grpc import model_config_pb2\n"
        "message = json_format.ParseDict(json.load(sys.stdin), model_config_pb2.ModelConfig())\n"
        "print(message.max_batch_size, message.backend)\n"
    )
    parsed = subprocess.run(
        [sys.executable, "-c", parse], input=json.dumps(config), capture_output=True, text=True
    )
    assert parsed.returncode == 0, parsed.stderr
    assert parsed.stdout.split() == ["64", "torchscript"]
    text, ids = config["input"]
    assert text == {
        "name": "text",
        "data_type": "TYPE_STRING",
        "dims": [1],
        "reshape": {"shape": []},
    }
    assert ids == {"name": "input_ids", "data_type": "TYPE_INT64", "dims": [-1], "optional": True}
    assert [o["data_type"] for o in config["output"]] == ["TYPE_FP32", "TYPE_BOOL"]
    assert config["parameters"] == {"task": {"string_value": "sequence-classification"}}
    unbatched = v2.model_config(METADATA, max_batch_size=0, backend="b", instance_kind="KIND_GPU")
    assert unbatched["input"][1]["dims"] == [-1, -1]
    assert {v2.config_type(name) for name in ("BYTES", "FP16", "UINT8")} == {
        "TYPE_STRING",
        "TYPE_FP16",
        "TYPE_UINT8",
    }
