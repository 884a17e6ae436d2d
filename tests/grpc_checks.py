"""The checks of tests/test_grpc.py, run in a process of their own: tritonclient.grpc registers
Triton's protobuf messages (package ``inference``) in the process's descriptor pool, and
KServe's SDK (tests/test_kserve_client.py) registers its own, different messages of the same
names, so the two cannot load in one process. Each check takes the server's gRPC target and its
HTTP URL."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

TOKEN = "grpc-admin"


def text_input(texts: list[str]) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    return tensor


def ids_input(ids: list[list[int]], name: str = "input_ids") -> triton.InferInput:
    tensor = triton.InferInput(name, [len(ids), len(ids[0])], "INT64")
    tensor.set_data_from_numpy(np.array(ids, dtype=np.int64))
    return tensor


def status(error: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return error.value.status()


def check_liveness_readiness_and_metadata(
    client: triton.InferenceServerClient, target: str, url: str
) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("g-cls") and client.is_model_ready("g-emb", "1")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "myriad" and "model_repository" in server["extensions"]
    meta = client.get_model_metadata("g-cls")
    assert meta.name == "g-cls" and list(meta.versions) == ["1"] and meta.platform == "myriad"
    assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [
        ("text", "BYTES", [-1]),
        ("input_ids", "INT64", [-1, -1]),
        ("attention_mask", "INT64", [-1, -1]),
    ]
    assert [o.name for o in meta.outputs] == ["logits", "label", "score"]
    assert [o.name for o in client.get_model_metadata("g-emb", "1").outputs] == ["embedding"]


def check_infer_texts_as_raw_contents_matches_rest(
    client: triton.InferenceServerClient, target: str, url: str
) -> None:
    texts = ["a good day", "a bad day"]
    result = client.infer("g-cls", [text_input(texts)], request_id="r-1")
    response = result.get_response()
    assert response.id == "r-1" and response.model_name == "g-cls"
    assert len(response.raw_output_contents) == 3  # raw in, raw out
    logits = result.as_numpy("logits")
    assert logits.shape == (2, 3) and logits.dtype == np.float32
    assert [v.decode() for v in result.as_numpy("label")] == [str(i) for i in logits.argmax(-1)]
    assert result.as_numpy("score").shape == (2,)
    rest = triton_http.InferenceServerClient(url.removeprefix("http://"))
    http_input = triton_http.InferInput("text", [2], "BYTES")
    http_input.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    over_rest = rest.infer("g-cls", [http_input]).as_numpy("logits")
    rest.close()
    np.testing.assert_allclose(logits, over_rest, atol=1e-6)
    only = client.infer(
        "g-emb", [text_input(["hello"])], outputs=[triton.InferRequestedOutput("embedding")]
    )
    assert only.as_numpy("embedding").shape == (1, 32)  # bert-tiny: hidden size 32


def check_infer_int64_ids(client: triton.InferenceServerClient, target: str, url: str) -> None:
    ids = [[1, 20, 30, 2]]
    with_mask = client.infer("g-cls", [ids_input(ids), ids_input([[1, 1, 1, 1]], "attention_mask")])
    without = client.infer("g-cls", [ids_input(ids)], model_version="1")
    assert with_mask.as_numpy("logits").shape == (1, 3)
    np.testing.assert_allclose(with_mask.as_numpy("logits"), without.as_numpy("logits"), atol=1e-6)


def check_typed_contents_both_ways(
    client: triton.InferenceServerClient, target: str, url: str
) -> None:
    """Without raw contents the answer comes in the typed contents fields, with the same
    values as raw."""
    texts = ["a good day", "a bad day"]
    raw = client.infer("g-cls", [text_input(texts)])
    request = service_pb2.ModelInferRequest(model_name="g-cls", id="typed")
    entry = request.inputs.add(name="text", datatype="BYTES", shape=[2])
    entry.contents.bytes_contents.extend(t.encode() for t in texts)
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, timeout=30)
        assert not response.raw_output_contents and response.id == "typed"
        outputs = {o.name: o for o in response.outputs}
        logits = np.array(outputs["logits"].contents.fp32_contents, dtype=np.float32)
        np.testing.assert_allclose(logits.reshape(2, 3), raw.as_numpy("logits"), atol=1e-6)
        assert list(outputs["logits"].shape) == [2, 3]
        assert list(outputs["label"].contents.bytes_contents) == list(raw.as_numpy("label"))
        ids = service_pb2.ModelInferRequest(model_name="g-cls")
        ids.inputs.add(name="input_ids", datatype="INT64", shape=[1, 4])
        ids.inputs[0].contents.int64_contents.extend([1, 20, 30, 2])
        ids.outputs.add(name="logits")
        answer = stub.ModelInfer(ids, timeout=30)
        assert [o.name for o in answer.outputs] == ["logits"]
        assert len(answer.outputs[0].contents.fp32_contents) == 3
        # INT32 ids in the wide int field; a value past INT8's range in an INT8 input refused.
        narrow = service_pb2.ModelInferRequest(model_name="g-cls")
        narrow.inputs.add(name="input_ids", datatype="INT8", shape=[1, 2])
        narrow.inputs[0].contents.int_contents.extend([1, 300])
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(narrow, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "out of range for INT8" in error.value.details()


def check_unknown_models_are_not_found(
    client: triton.InferenceServerClient, target: str, url: str
) -> None:
    for call in (
        lambda: client.infer("nope", [text_input(["hi"])]),
        lambda: client.infer("g-cls", [text_input(["hi"])], model_version="7"),
        lambda: client.get_model_metadata("nope"),
        lambda: client.is_model_ready("nope"),
        lambda: client.get_model_config("nope"),
    ):
        with pytest.raises(InferenceServerException) as error:
            call()
        assert status(error) == "StatusCode.NOT_FOUND"


def check_bad_requests_are_invalid_arguments(
    client: triton.InferenceServerClient, target: str, url: str
) -> None:
    """A client's mistake is INVALID_ARGUMENT with a message naming it, never INTERNAL."""
    cases = [
        ([ids_input([[1, 99_999_999]])], None, "vocabulary"),
        ([ids_input([[1, 2]]), ids_input([[1, 1, 1]], "attention_mask")], None, "shape"),
        ([text_input([" "])], None, "empty text"),
        ([text_input(["x"] * 65)], None, "limit is 64"),
        ([text_input(["x"])], [triton.InferRequestedOutput("nope")], "unknown outputs"),
    ]
    for inputs, outputs, message in cases:
        with pytest.raises(InferenceServerException, match=message) as error:
            client.infer("g-cls", inputs, outputs=outputs)
        assert status(error) == "StatusCode.INVALID_ARGUMENT", message
    short = triton.InferInput("input_ids", [1, 4], "INT64")
    short.set_data_from_numpy(np.array([[1, 2, 3, 4]], dtype=np.int64))
    short._raw_content = short._raw_content[:-8]  # a truncated raw tensor, as a buggy client sends
    with pytest.raises(InferenceServerException, match="needs 32") as error:
        client.infer("g-cls", [short])
    assert status(error) == "StatusCode.INVALID_ARGUMENT"


def check_errors_are_counted_in_the_metrics(
    client: triton.InferenceServerClient, target: str, url: str
) -> None:
    def count(status: str) -> float:
        text = httpx.get(f"{url}/metrics").text
        line = f'myriad_requests_total{{model="g-emb",status="{status}"}}'
        return sum(float(row.split()[-1]) for row in text.splitlines() if row.startswith(line))

    ok, bad = count("200"), count("400")
    client.infer("g-emb", [text_input(["counted"])])
    with pytest.raises(InferenceServerException):
        client.infer("g-emb", [text_input([""])])
    assert count("200") == ok + 1 and count("400") == bad + 1


def check_repository_index_and_model_config(
    client: triton.InferenceServerClient, target: str, url: str
) -> None:
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert set(index) == {"g-cls", "g-emb"}
    assert index["g-cls"].state == "READY" and index["g-cls"].version == "1"
    config = client.get_model_config("g-cls", as_json=True)["config"]
    assert config["name"] == "g-cls" and config["platform"] == "myriad"
    assert int(config["max_batch_size"]) == 64
    assert {i["name"]: i["data_type"] for i in config["input"]} == {
        "text": "TYPE_STRING",
        "input_ids": "TYPE_INT64",
        "attention_mask": "TYPE_INT64",
    }
    assert [o["name"] for o in config["output"]] == ["logits", "label", "score"]
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    embedding = client.get_model_config("g-emb", "1").config
    assert [(o.name, list(o.dims)) for o in embedding.output] == [("embedding", [-1])]


def check_many_concurrent_async_infers(
    client: triton.InferenceServerClient, target: str, url: str
) -> None:
    """200 infers in flight at once over one channel of the asyncio client, texts and ids over
    both models: every one answered, each with its own input's answer."""
    texts = [f"request number {i}" for i in range(200)]
    expected = client.infer("g-cls", [text_input([texts[7]])]).as_numpy("logits")

    async def infer_all() -> list[np.ndarray]:
        async with triton_aio.InferenceServerClient(target) as kserve:

            async def one(i: int) -> np.ndarray:
                model = "g-cls" if i % 2 else "g-emb"
                inputs = [text_input([texts[i]])] if i % 3 else [ids_input([[1, 5 + i, 2]])]
                result = await kserve.infer(model, inputs, request_id=str(i))
                assert result.get_response().id == str(i)
                return result.as_numpy("logits" if model == "g-cls" else "embedding")

            return await asyncio.gather(*(one(i) for i in range(200)))

    answers = asyncio.run(infer_all())
    assert len(answers) == 200
    assert all(a.shape == ((1, 3) if i % 2 else (1, 32)) for i, a in enumerate(answers))
    np.testing.assert_allclose(answers[7], expected, atol=1e-5)


def check_load_and_unload_need_the_admin_token(
    client: triton.InferenceServerClient, target: str, url: str
) -> None:
    with pytest.raises(InferenceServerException, match="Bearer") as error:
        client.unload_model("g-emb")
    assert status(error) == "StatusCode.UNAUTHENTICATED"
    auth = {"authorization": f"Bearer {TOKEN}"}
    client.unload_model("g-emb", headers=auth)
    assert "g-emb" not in {m.name for m in client.get_model_repository_index().models}
    client.load_model("g-emb", headers=auth)  # answers once the model is loaded
    assert client.is_model_ready("g-emb")


def check_status_codes(client: triton.InferenceServerClient, target: str, url: str) -> None:
    """Every typed error has a status code of its own, never INTERNAL (the server's table; its
    messages are Triton's, so it loads beside tritonclient here)."""
    from serving import errors
    from serving.grpc.service import status_code

    kinds = [
        kind
        for kind in vars(errors).values()
        if isinstance(kind, type) and issubclass(kind, errors.ServingError)
    ]
    assert len(kinds) > 5
    for kind in kinds:
        if kind is not errors.ServingError:
            assert status_code(kind.__new__(kind)) != grpc.StatusCode.INTERNAL, kind
    assert status_code(errors.InvalidInput("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code(errors.ModelNotFound("m")) == grpc.StatusCode.NOT_FOUND
    assert status_code(errors.ModelNotReady("m", "loading", None)) == grpc.StatusCode.UNAVAILABLE
    assert status_code(errors.DeadlineExceeded("late")) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_code(ValueError("a bug")) == grpc.StatusCode.INTERNAL

    class Answered(errors.ServingError):  # an error that carries the status it was given
        status = 429

    assert status_code(Answered()) == grpc.StatusCode.RESOURCE_EXHAUSTED


def run(name: str, target: str, url: str) -> None:
    """Run ``check_<name>`` against the server with a fresh client."""
    client = triton.InferenceServerClient(target)
    try:
        globals()[f"check_{name}"](client, target, url)
    finally:
        client.close()
