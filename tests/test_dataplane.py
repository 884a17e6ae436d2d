"""The data plane in-process, with no HTTP: a real traced model behind a real repository, and
KServe v2 requests generated over every datatype, shape and value (ids out of range, shapes
that do not match their data, binary sizes that lie). No request may end in anything but an
answer or a typed error with a status below 500."""

from __future__ import annotations

import asyncio
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from packing.contracts import ModelSpec
from serving.backends.torchscript import TorchScriptRepository
from serving.build.tracing import TraceSettings, trace_to_store
from serving.dataplane import v2
from serving.dataplane.metrics import ServerMetrics
from serving.dataplane.plane import DataPlane
from serving.errors import ModelNotFound, ServingError
from serving.store import open_store

SPEC = ModelSpec(id="dp-0", source="synthetic:bert-tiny", num_labels=2, max_length=16)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> DataPlane:
    store = open_store(f"file://{tmp_path_factory.mktemp('dataplane')}/store")
    trace_to_store(SPEC, "cpu", store, TraceSettings(profile_batch_sizes=(1,)))
    repository = TorchScriptRepository(store, [SPEC.id])
    repository.load_all()
    assert repository.ready
    return DataPlane(repository, ServerMetrics(repository))


def infer(plane: DataPlane, body: bytes, length: str | None = None) -> tuple[bytes, dict]:
    return asyncio.run(plane.infer(SPEC.id, body, length))


def test_text_and_token_ids_answer_alike(plane: DataPlane) -> None:
    text = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}
    body, headers = infer(plane, json.dumps(text).encode())
    assert headers == {"content-type": "application/json"}
    answer = json.loads(body)
    assert [o["name"] for o in answer["outputs"]] == ["logits", "label", "score"]
    ids = {
        "inputs": [{"name": "input_ids", "datatype": "INT32", "shape": [1, 3], "data": [1, 5, 2]}]
    }
    assert json.loads(infer(plane, json.dumps(ids).encode())[0])["outputs"][0]["shape"] == [1, 2]
    with pytest.raises(ModelNotFound):
        asyncio.run(plane.infer("nope", json.dumps(text).encode(), None))
    assert plane.server_metadata()["extensions"] == v2.EXTENSIONS
    assert plane.repository_index() == [{"name": SPEC.id, "version": "1", "state": "READY"}]


values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=8),
    st.none(),
)
entries = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["text", "input_ids", "attention_mask", "other"]),
        "datatype": st.sampled_from([*v2.DATATYPES, "TEXT"]),
        "shape": st.lists(st.integers(min_value=-2, max_value=70), min_size=0, max_size=3),
        "data": st.lists(st.one_of(values, st.lists(values, max_size=4)), max_size=12),
    }
)


@given(inputs=st.lists(entries, min_size=0, max_size=3), binary=st.binary(max_size=64))
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_generated_request_is_a_server_error(
    plane: DataPlane, inputs: list[dict], binary: bytes
) -> None:
    as_json = json.dumps({"inputs": inputs}).encode()
    for body, length in (
        (as_json, None),
        # The same inputs claimed as binary data, with whatever bytes follow.
        (
            json.dumps(
                {
                    "inputs": [
                        {k: v for k, v in e.items() if k != "data"}
                        | {"parameters": {"binary_data_size": len(binary) // max(1, len(inputs))}}
                        for e in inputs
                    ]
                }
            ).encode(),
            "header",
        ),
    ):
        if length == "header":
            length = str(len(body))
            body = body + binary
        try:
            infer(plane, body, length)
        except ServingError as exc:
            assert exc.status < 500, exc


def test_binary_token_ids_out_of_the_vocabulary_are_refused(plane: DataPlane) -> None:
    ids = np.array([[1, 10**6]], dtype=np.int64).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input_ids",
                    "datatype": "INT64",
                    "shape": [1, 2],
                    "parameters": {"binary_data_size": len(ids)},
                }
            ]
        }
    ).encode()
    with pytest.raises(ServingError, match="vocabulary") as error:
        infer(plane, header + ids, str(len(header)))
    assert error.value.status == 400
    text = b"".join(struct.pack("<I", len(t)) + t for t in [b"ok", b"\xff\xfe"])
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": len(text)},
                }
            ]
        }
    ).encode()
    with pytest.raises(ServingError, match="UTF-8"):
        infer(plane, header + text, str(len(header)))
