"""Standard KServe v2 clients, unchanged and at their defaults, against a real server.

tritonclient's HTTP client: server and model metadata, readiness with and without versions,
the model configuration, infer with the binary tensor data extension both ways and with JSON,
the repository index, load and unload, and errors it can read. KServe's own Python SDK
(``InferenceRESTClient`` with protocol v2, which names the model in the body): health, infer
with texts and with token ids, in binary and in JSON, and a body naming another model refused.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from kserve import InferenceRESTClient, InferInput, InferRequest, InferResponse, RESTConfig
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
def server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[str]:
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
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    kserve = triton.InferenceServerClient(server.removeprefix("http://"))
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


def test_model_configuration(client: triton.InferenceServerClient) -> None:
    config = client.get_model_config("kv-cls")
    assert config["name"] == "kv-cls" and config["max_batch_size"] == 64
    assert config["backend"] == "torchscript" and config["platform"] == "myriad"
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert {i["name"]: (i["data_type"], i["dims"]) for i in config["input"]} == {
        "text": ("TYPE_STRING", [1]),
        "input_ids": ("TYPE_INT64", [-1]),
        "attention_mask": ("TYPE_INT64", [-1]),
    }
    assert all(i["optional"] for i in config["input"])
    assert [(o["name"], o["data_type"]) for o in config["output"]] == [
        ("logits", "TYPE_FP32"),
        ("label", "TYPE_STRING"),
        ("score", "TYPE_FP32"),
    ]
    assert config["parameters"]["max_length"] == {"string_value": "32"}
    embedding = client.get_model_config("kv-emb", "1")
    assert embedding["output"] == [{"name": "embedding", "data_type": "TYPE_FP32", "dims": [-1]}]
    for name, version, message in (("nope", "", "not served here"), ("kv-cls", "7", "versions/7")):
        with pytest.raises(InferenceServerException, match=message) as error:
            client.get_model_config(name, version)
        assert error.value.status() == "404"


def test_triton_parameters_are_ignored(client: triton.InferenceServerClient) -> None:
    """Triton's own request parameters (priority, timeout) and a client's custom ones do not
    change the answer."""
    plain = client.infer("kv-cls", [text_input(["fine"])]).as_numpy("logits")
    with_parameters = client.infer(
        "kv-cls",
        [text_input(["fine"])],
        priority=1,
        timeout=10_000_000,
        parameters={"tenant": "a", "tries": 2},
    )
    np.testing.assert_allclose(with_parameters.as_numpy("logits"), plain, atol=1e-6)


def kserve_text(texts: list[str], binary: bool = True) -> InferInput:
    tensor = InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_), binary)
    return tensor


def output(response: InferResponse, name: str) -> np.ndarray:
    return next(o for o in response.outputs if o.name == name).as_numpy()


async def test_kserve_sdk_infers_with_texts_and_with_ids(
    server: str, client: triton.InferenceServerClient
) -> None:
    texts = ["a good day", "a bad day"]
    expected = client.infer("kv-cls", [text_input(texts)]).as_numpy("logits")
    async with InferenceRESTClient(RESTConfig(protocol="v2")) as kserve:
        assert await kserve.is_server_live(server) and await kserve.is_server_ready(server)
        assert await kserve.is_model_ready(server, "kv-cls")
        for binary in (True, False):
            response = await kserve.infer(
                server, InferRequest("kv-cls", [kserve_text(texts, binary)]), model_name="kv-cls"
            )
            assert response.model_name == "kv-cls"
            np.testing.assert_allclose(output(response, "logits"), expected, atol=1e-6)
            assert [str(v) for v in output(response, "label")] == [
                str(i) for i in expected.argmax(-1)
            ]
        ids = InferInput("input_ids", [1, 4], "INT64")
        ids.set_data_from_numpy(np.array([[1, 20, 30, 2]], dtype=np.int64))
        mask = InferInput("attention_mask", [1, 4], "INT64", data=[1, 1, 1, 1])
        response = await kserve.infer(server, InferRequest("kv-cls", [ids, mask]), "kv-cls")
        assert output(response, "logits").shape == (1, 3)
        vectors = await kserve.infer(
            server, InferRequest("kv-emb", [kserve_text(["hello"])]), model_name="kv-emb"
        )
        assert output(vectors, "embedding").shape == (1, 32)
        with pytest.raises(httpx.HTTPStatusError, match="'kv-emb' in the body") as error:
            await kserve.infer(
                server, InferRequest("kv-emb", [kserve_text(["hello"])]), model_name="kv-cls"
            )
        assert error.value.response.status_code == 400
