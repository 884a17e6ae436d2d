"""A standard KServe v2 client (tritonclient's HTTP client), unchanged and at its defaults,
against a real server: server and model metadata, readiness with and without versions, infer
with the binary tensor data extension both ways and with JSON, the repository index, load and
unload, and errors it can read."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from packing.contracts import ModelSpec
from serving.build.tracing import TraceSettings, trace_to_store
from serving.store import open_store
from tests.servers import model_server

pytestmark = pytest.mark.slow

TOKEN = "kserve-admin"
SPECS = [
    ModelSpec(id="kv-cls", source="synthetic:bert-tiny", num_labels=3, max_length=32),
    ModelSpec(id="kv-emb", source="synthetic:bert-tiny", task="embedding", max_length=32),
]


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "two-front-ends"])
def client(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[triton.InferenceServerClient]:
    """The same conformance checks on a one-process server and on one whose HTTP is answered
    by two front-end processes feeding the engine process (``--workers 2``)."""
    root: Path = tmp_path_factory.mktemp("kserve")
    uri = f"file://{root}/store"
    for spec in SPECS:
        trace_to_store(spec, "cpu", open_store(uri), TraceSettings(profile_batch_sizes=(1,)))
    ids = [s.id for s in SPECS]
    with model_server(
        uri,
        ids,
        root / "server.log",
        extra_args=("--workers", str(request.param)),
        env={"MYRIAD_ADMIN_TOKEN": TOKEN},
    ) as url:
        kserve = triton.InferenceServerClient(url.removeprefix("http://"))
        yield kserve
        kserve.close()


def text_input(texts: list[str], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_), binary)
    return tensor


def test_server_and_model_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    server = client.get_server_metadata()
    assert server["name"] == "myriad" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("kv-cls")
    assert meta["versions"] == ["1"]
    assert client.get_model_metadata("kv-cls", "1")["name"] == "kv-cls"
    assert client.is_model_ready("kv-cls") and client.is_model_ready("kv-cls", "1")
    with pytest.raises(InferenceServerException, match="not served here"):
        client.get_model_metadata("nope")
    with pytest.raises(InferenceServerException, match="versions/7"):
        client.get_model_metadata("kv-cls", "7")


def test_infer_binary_both_ways_matches_json(client: triton.InferenceServerClient) -> None:
    texts = ["a good day", "a bad day"]
    binary = client.infer("kv-cls", [text_input(texts)])  # defaults: binary in and out
    logits = binary.as_numpy("logits")
    assert logits.shape == (2, 3) and logits.dtype == np.float32
    assert binary.as_numpy("score").shape == (2,)
    assert [v.decode() for v in binary.as_numpy("label")] == [str(i) for i in logits.argmax(-1)]
    as_json = client.infer(
        "kv-cls",
        [text_input(texts, binary=False)],
        outputs=[triton.InferRequestedOutput("logits", binary_data=False)],
        request_id="r-7",
    )
    assert as_json.get_response()["id"] == "r-7"
    assert [o["name"] for o in as_json.get_response()["outputs"]] == ["logits"]
    np.testing.assert_allclose(as_json.as_numpy("logits"), logits, atol=1e-6)
    vectors = client.infer("kv-emb", [text_input(["hello"])], model_version="1")
    assert vectors.as_numpy("embedding").shape == (1, 32)  # bert-tiny: hidden size 32


def test_infer_token_ids_in_binary(client: triton.InferenceServerClient) -> None:
    ids = triton.InferInput("input_ids", [1, 4], "INT64")
    ids.set_data_from_numpy(np.array([[1, 20, 30, 2]], dtype=np.int64))
    mask = triton.InferInput("attention_mask", [1, 4], "INT64")
    mask.set_data_from_numpy(np.ones((1, 4), dtype=np.int64))
    result = client.infer("kv-cls", [ids, mask])
    assert result.as_numpy("logits").shape == (1, 3)
    bad = triton.InferInput("input_ids", [1, 2], "INT64")
    bad.set_data_from_numpy(np.array([[1, 99_999_999]], dtype=np.int64))
    with pytest.raises(InferenceServerException, match="vocabulary") as error:
        client.infer("kv-cls", [bad])
    assert error.value.status() == "400"


def test_repository_index_load_and_unload(client: triton.InferenceServerClient) -> None:
    index = {entry["name"]: entry for entry in client.get_model_repository_index()}
    assert index["kv-cls"]["state"] == "READY" and index["kv-cls"]["version"] == "1"
    with pytest.raises(InferenceServerException, match="Bearer"):
        client.unload_model("kv-emb")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    client.unload_model("kv-emb", headers=auth)
    assert "kv-emb" not in {e["name"] for e in client.get_model_repository_index()}
    client.load_model("kv-emb", headers=auth)
    for _ in range(100):
        if client.is_model_ready("kv-emb"):
            break
        time.sleep(0.1)
    assert client.is_model_ready("kv-emb")
