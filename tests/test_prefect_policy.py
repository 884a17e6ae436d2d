"""Which failures are retried (network only), how flows read their documents and results
settings, and how trace task runs are named: without a Prefect server."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from packing.contracts import ModelSpec
from packing.io import ContractError
from serving.build.tracing import TraceError
from serving.store import ObjectNotFound, StoreError
from tasks.policy import is_transient


def test_only_network_failures_are_transient() -> None:
    assert is_transient(httpx.ConnectError("refused"))
    assert is_transient(ConnectionResetError())
    assert is_transient(StoreError("s3://b: 'k': Could not connect to the endpoint URL"))
    try:
        try:
            raise TimeoutError("read timed out")
        except TimeoutError as exc:
            raise RuntimeError("upload failed") from exc
    except RuntimeError as wrapped:
        assert is_transient(wrapped)
    assert not is_transient(TraceError("model a: traced output differs from eager by 0.5"))
    assert not is_transient(ObjectNotFound("s3://b: no object 'x'"))
    assert not is_transient(StoreError("s3://b: bucket 'b' does not exist"))
    assert not is_transient(ValueError("no plan is possible: model x fits no instance"))


def test_documents_by_uri_and_their_errors(tmp_path: Path) -> None:
    from packing.contracts import Fleet
    from tasks.documents import read_document

    (tmp_path / "f.yaml").write_text("schema_version: 1\nname: f\nprocessors: [cpu]\n")
    assert read_document(f"file://{tmp_path}/f.yaml", Fleet).name == "f"
    assert read_document(str(tmp_path / "f.yaml"), Fleet).name == "f"
    with pytest.raises(ContractError, match="no such file"):
        read_document(str(tmp_path / "missing.yaml"), Fleet)
    with pytest.raises(ContractError, match="unsupported URI scheme"):
        read_document("http://example/f.yaml", Fleet)
    (tmp_path / "bad.yaml").write_text("schema_version: 1\nname: f\nprocessors: [tpu]\n")
    with pytest.raises(ContractError, match="processors"):
        read_document(str(tmp_path / "bad.yaml"), Fleet)


def test_results_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.results import result_options

    monkeypatch.delenv("MYRIAD_RESULTS", raising=False)
    assert result_options() == {"persist_result": True, "result_serializer": "json"}
    monkeypatch.setenv("MYRIAD_RESULTS", "s3-bucket/myriad-results")
    assert result_options()["result_storage"] == "s3-bucket/myriad-results"
    monkeypatch.setenv("MYRIAD_RESULTS", "my-bucket")
    with pytest.raises(ValueError, match="name a saved block by slug"):
        result_options()


def test_trace_task_runs_are_named_for_their_models() -> None:
    from tasks.trace import chunk, job_label

    jobs = [
        (ModelSpec(id=f"bert-{n:04d}", source="synthetic:bert-tiny"), "cpu") for n in range(3000)
    ]
    chunks = chunk(jobs)
    assert len(chunks) == 64 and sum(map(len, chunks)) == 3000
    assert job_label(chunks[0]) == "bert-0000..bert-0046-cpu"
    assert job_label(jobs[42:43]) == "bert-0042-cpu"


def test_no_flow_module_shadows_a_package() -> None:
    """A Prefect worker loads ``flows/<x>.py`` as a script, with ``flows/`` first on sys.path:
    a flow module named like one of the project's packages would hide that package there."""
    root = Path(__file__).resolve().parent.parent
    packages = {p.parent.name for p in root.glob("*/__init__.py")}
    modules = {p.stem for p in (root / "flows").glob("*.py")}
    assert packages >= {"packing", "serving", "loadtest", "tasks", "flows"}
    assert not modules & packages, modules & packages
