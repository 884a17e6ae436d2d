"""Tracing: real torch.jit traces of tiny synthetic BERTs, the parity check, the content-hash
cache and the profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from packing.contracts import ModelSpec
from serving.build import sources
from serving.build.modeling import configure_tokenizer, encode, load_eager, synthetic_tokenizer
from serving.build.tracing import (
    TraceError,
    TraceSettings,
    parity_check,
    trace_to_store,
)
from serving.store import artifact_prefix, open_store, read_manifest

FAST = TraceSettings(profile_batch_sizes=(1, 2), profile_repeats=2)


def tiny(model_id: str = "tiny-a", **overrides: object) -> ModelSpec:
    fields = {"id": model_id, "source": "synthetic:bert-tiny", "max_length": 32, "num_labels": 3}
    fields.update(overrides)
    return ModelSpec(**fields)  # type: ignore[arg-type]


def tiny_bert_config():
    """A one-layer BERT for Hugging Face source directories (two labels, transformers'
    default)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=512,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )


def test_trace_writes_a_verified_artifact_with_profile(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/store")
    result = trace_to_store(tiny(), "cpu", store, FAST)
    assert not result.cached
    manifest = read_manifest(store, artifact_prefix("tiny-a", "cpu"))
    assert manifest is not None
    assert {
        "model.ts",
        "weights.safetensors",
        "config.json",
        "tokenizer.json",
        "profile.json",
    } <= set(manifest.files)
    assert manifest.metadata["trace_key"] == result.trace_key
    assert manifest.metadata["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
    profile = json.loads(store.get_bytes("models/tiny-a/cpu/profile.json"))
    assert set(profile["seconds_per_batch"]) == {"1", "2"}
    assert profile["memory_bytes"] >= profile["weights_bytes"] > 0
    # On a CPU the model's memory is the host's: the packer counts it against the RAM.
    assert profile["host_memory_bytes"] == profile["memory_bytes"]
    assert profile["seconds_per_request_batch1"] > 0
    assert profile["parity_max_abs_error"] <= FAST.parity_atol_fp32


LOAD_KEYS = ("load_seconds", "store_load_seconds", "engine_load_seconds")


def test_the_profile_records_load_times(tmp_path: Path) -> None:
    """The cold start a server pays, measured with its own loaders: from a file store (read in
    place, so the same load) and, below, from S3 (fetched into an empty cache first)."""
    store = open_store(f"file://{tmp_path}/store")
    result = trace_to_store(tiny(), "cpu", store, FAST)
    profile = json.loads(store.get_bytes("models/tiny-a/cpu/profile.json"))
    assert profile == result.profile
    assert all(profile[key] > 0 for key in LOAD_KEYS)
    assert profile["store_load_seconds"] == profile["load_seconds"]
    # The profile the packer reads is the committed one: the manifest verifies it.
    from serving.store import materialize

    materialize(store, "models/tiny-a/cpu")


def test_the_load_from_s3_is_measured_through_an_empty_cache(
    s3_store_uri: str, tmp_path: Path
) -> None:
    from serving.store import materialize

    store = open_store(s3_store_uri)
    result = trace_to_store(tiny(), "cpu", store, FAST)
    profile = json.loads(store.get_bytes("models/tiny-a/cpu/profile.json"))
    assert profile == result.profile
    assert all(profile[key] > 0 for key in (*LOAD_KEYS, "engine_store_load_seconds"))
    manifest = read_manifest(store, "models/tiny-a/cpu")
    assert manifest is not None and manifest.metadata["trace_key"] == result.trace_key
    # The profile rewritten after the fact verifies against the manifest.
    materialize(store, "models/tiny-a/cpu", tmp_path / "cache")
    assert trace_to_store(tiny(), "cpu", store, FAST).cached


def test_second_trace_is_served_from_the_store_and_changes_retrace(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/store")
    first = trace_to_store(tiny(), "cpu", store, FAST)
    before = store.get_bytes("models/tiny-a/cpu/model.ts")
    again = trace_to_store(tiny(), "cpu", store, FAST)
    assert again.cached and again.trace_key == first.trace_key
    assert store.get_bytes("models/tiny-a/cpu/model.ts") == before
    changed = trace_to_store(tiny(max_length=48), "cpu", store, FAST)
    assert not changed.cached and changed.trace_key != first.trace_key
    forced = trace_to_store(tiny(max_length=48), "cpu", store, FAST, force=True)
    assert not forced.cached


def test_hf_directory_change_changes_the_key(tmp_path: Path) -> None:
    from transformers import BertModel

    directory = tmp_path / "hf"
    config = tiny_bert_config()
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    synthetic_tokenizer(512).save(str(directory / "tokenizer.json"))
    spec = tiny("hf-model", source=f"hf:{directory}", task="embedding")
    store = open_store(f"file://{tmp_path}/store")
    first = trace_to_store(spec, "cpu", store, FAST)
    assert trace_to_store(spec, "cpu", store, FAST).cached
    torch.manual_seed(1)
    BertModel(config).save_pretrained(directory)  # retrained weights, same path
    assert not trace_to_store(spec, "cpu", store, FAST).cached
    assert first.trace_key != read_manifest(store, "models/hf-model/cpu").metadata["trace_key"]


def test_synthetic_weights_are_seeded_by_model_id() -> None:
    def weights(model_id: str) -> torch.Tensor:
        spec = tiny(model_id)
        eager = load_eager(spec, sources.resolve(spec))
        return next(eager.module.parameters()).detach().clone()

    assert torch.equal(weights("tiny-a"), weights("tiny-a"))
    assert not torch.equal(weights("tiny-a"), weights("tiny-b"))


def test_parity_check_fails_past_tolerance() -> None:
    spec = tiny("tiny-a")
    eager = load_eager(spec, sources.resolve(spec))
    other_spec = tiny("tiny-b")
    other = load_eager(other_spec, sources.resolve(other_spec))
    ids, mask = encode(configure_tokenizer(other.tokenizer, spec.max_length), ["hello", "world"])
    wrong = torch.jit.trace(other.module, (ids, mask), check_trace=False)
    with pytest.raises(TraceError, match="tiny-a: traced output differs from eager"):
        parity_check(spec, eager, wrong, "fp32", torch.device("cpu"), FAST)
    right = torch.jit.trace(eager.module, (ids, mask), check_trace=False)
    assert parity_check(spec, eager, right, "fp32", torch.device("cpu"), FAST) < 1e-5


def test_unavailable_processors_fail_clearly(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/store")
    with pytest.raises(TraceError, match="torch-neuron"):
        trace_to_store(tiny(), "inf", store, FAST)
    if not torch.cuda.is_available():
        with pytest.raises(TraceError, match="no CUDA device"):
            trace_to_store(tiny(), "gpu", store, FAST)
    assert read_manifest(store, "models/tiny-a/inf") is None


def test_unknown_sources_fail_clearly(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/store")
    with pytest.raises(sources.SourceError, match="unknown synthetic architecture 'gpt-9'"):
        trace_to_store(tiny(source="synthetic:gpt-9"), "cpu", store, FAST)
    with pytest.raises(sources.SourceError, match="not a Hugging Face model directory"):
        trace_to_store(tiny(source=f"hf:{tmp_path}"), "cpu", store, FAST)
    with pytest.raises(sources.SourceError, match="package 'no_such_pkg' is not installed"):
        trace_to_store(tiny(source="hf:python:no_such_pkg/model"), "cpu", store, FAST)


def test_hf_source_on_s3_traces(s3_store_uri: str, tmp_path: Path) -> None:
    """A Hugging Face directory uploaded to a real S3 server traces like a local one."""
    import os

    import boto3
    from transformers import BertForSequenceClassification

    directory = tmp_path / "hf"
    config = tiny_bert_config()
    BertForSequenceClassification(config).save_pretrained(directory)
    synthetic_tokenizer(512).save(str(directory / "tokenizer.json"))
    bucket = s3_store_uri.removeprefix("s3://").split("/")[0]
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for path in directory.iterdir():
        client.upload_file(str(path), bucket, f"sources/hf-s3/{path.name}")
    spec = tiny("hf-s3", source=f"hf:s3://{bucket}/sources/hf-s3", num_labels=2)
    store = open_store(s3_store_uri)
    result = trace_to_store(spec, "cpu", store, FAST)
    assert not result.cached
    assert trace_to_store(spec, "cpu", store, FAST).cached


def test_a_traced_model_answers_the_same_on_trimmed_padding(tmp_path: Path) -> None:
    from serving.backends.torchscript import TorchScriptModel

    store = open_store(f"file://{tmp_path}/store")
    trace_to_store(tiny(max_length=64), "cpu", store, FAST)
    model = TorchScriptModel("tiny-a", "cpu", "models/tiny-a/cpu")
    model.load(store, None)
    texts = ["short", "a somewhat longer text than the first one"]
    full_ids, full_mask = encode(model.tokenizer, texts)
    ids, mask = encode(model.tokenizer, texts, trim_to=8)
    assert full_ids.shape[1] == 64 and ids.shape[1] < 64 and ids.shape[1] % 8 == 0
    assert int(mask.sum()) == int(full_mask.sum())  # only padding was cut
    with torch.inference_mode():
        torch.testing.assert_close(model.module(ids, mask), model.module(full_ids, full_mask))


def test_the_optimised_module_answers_as_the_traced_artifact(tmp_path: Path) -> None:
    """``--optimise`` serves the artifact frozen and optimised for inference; that must change
    no answer beyond float rounding, on one text and on a padded batch."""
    from serving.backends.torchscript import TorchScriptModel, TorchScriptRepository

    store = open_store(f"file://{tmp_path}/store")
    trace_to_store(tiny(max_length=64), "cpu", store, FAST)
    plain = TorchScriptRepository(store, ["tiny-a"])
    plain.load_all()
    assert list(plain.get("tiny-a").module.parameters())  # by default served as traced
    optimised = TorchScriptRepository(store, ["tiny-a"], optimise=True)
    optimised.load_all()
    model = optimised.get("tiny-a")
    assert isinstance(model, TorchScriptModel)
    traced = torch.jit.load(str(tmp_path / "store/models/tiny-a/cpu/model.ts"))
    assert model.module is not None
    # Frozen: the weights are constants of the graph, yet counted as the model's memory.
    assert not list(model.module.parameters()) and model.memory_bytes > 0
    for texts in (["one text"], ["short", "a somewhat longer text than the first one"]):
        ids, mask = encode(model.tokenizer, texts, trim_to=8)
        with torch.inference_mode():
            torch.testing.assert_close(model.module(ids, mask), traced(ids, mask))
        torch.testing.assert_close(model.forward(texts), traced(ids, mask))
