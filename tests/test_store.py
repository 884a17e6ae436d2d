"""The artifact store on both back ends: a file store and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path

import pytest

from serving.store import (
    IntegrityError,
    ObjectNotFound,
    StoreError,
    materialize,
    open_store,
    put_artifact,
    read_manifest,
)

BIG = 4 << 20


@pytest.fixture(params=["file", "s3"])
def store_uri(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(f"{request.param}_store_uri")


def _artifact(directory: Path, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.ts").write_bytes(bytes([seed]) * 200_000)
    (directory / "config.json").write_text('{"hidden_size": 32}')
    (directory / "sub").mkdir(exist_ok=True)
    (directory / "sub" / "extra.bin").write_bytes(os.urandom(1000))
    return directory


def test_bytes_round_trip_and_listing(store_uri: str) -> None:
    store = open_store(store_uri)
    store.put_bytes("a/b/one", b"1")
    store.put_bytes("a/two", b"22")
    store.put_bytes("ab/three", b"333")
    assert store.get_bytes("a/b/one") == b"1"
    assert store.list("a") == ["a/b/one", "a/two"]
    assert store.list("a/") == ["a/b/one", "a/two"]
    assert store.list() == ["a/b/one", "a/two", "ab/three"]
    assert store.exists("a/two") and not store.exists("a/nine")
    store.delete_prefix("a")
    assert store.list() == ["ab/three"]
    assert store.url_for("ab/three") == f"{store.uri}/ab/three"


def test_missing_object_is_named(store_uri: str) -> None:
    store = open_store(store_uri)
    with pytest.raises(ObjectNotFound, match="no object 'nothing/here'"):
        store.get_bytes("nothing/here")


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", ""])
def test_bad_keys_are_refused(file_store_uri: str, key: str) -> None:
    with pytest.raises(StoreError, match="invalid key"):
        open_store(file_store_uri).put_bytes(key, b"x")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("ftp://host/x", "unsupported scheme"),
        ("file://relative", "absolute path"),
        ("s3://", "no bucket"),
    ],
)
def test_bad_store_uris(uri: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        open_store(uri)


def test_missing_bucket_is_named(s3_store_uri: str) -> None:
    store = open_store("s3://no-such-bucket-here/x")
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist"):
        store.get_bytes("k")


def test_readers_never_see_a_partial_object(store_uri: str, tmp_path: Path) -> None:
    """A reader polling while a writer swaps a multi-MB object sees one whole version or the
    other, never a mix or a prefix."""
    store = open_store(store_uri)
    versions = [b"A" * BIG, b"B" * BIG]
    sources = []
    for i, data in enumerate(versions):
        path = tmp_path / f"v{i}"
        path.write_bytes(data)
        sources.append(path)
    store.put_file("big/object", sources[0])
    stop = threading.Event()
    seen: list[bytes] = []

    def reader() -> None:
        while not stop.is_set():
            seen.append(store.get_bytes("big/object")[:1] + bytes([len(seen) % 2]))
            data = store.get_bytes("big/object")
            assert data in versions, f"partial read of {len(data)} bytes"

    thread = threading.Thread(target=reader)
    errors: list[BaseException] = []
    thread.run = lambda: _capture(reader, errors)  # type: ignore[method-assign]
    thread.start()
    for i in range(6):
        store.put_file("big/object", sources[i % 2])
    stop.set()
    thread.join()
    assert not errors, errors[0]
    assert seen, "the reader never ran"
    assert store.list("big") == ["big/object"]  # no temp file left or listed


def _capture(target, errors: list[BaseException]) -> None:
    try:
        target()
    except BaseException as exc:  # surfaced by the test thread
        errors.append(exc)


def test_concurrent_writers_leave_one_whole_version(store_uri: str) -> None:
    store = open_store(store_uri)
    payloads = [bytes([i]) * (BIG // 4) for i in range(4)]
    threads = [threading.Thread(target=store.put_bytes, args=("race/key", p)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.get_bytes("race/key") in payloads
    assert store.list("race") == ["race/key"]


def _write_from_process(uri: str, value: int) -> None:
    open_store(uri).put_bytes("race/proc", bytes([value]) * (BIG // 4))


def test_concurrent_writer_processes_on_the_file_store(file_store_uri: str) -> None:
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_write_from_process, args=(file_store_uri, i)) for i in range(3)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    data = open_store(file_store_uri).get_bytes("race/proc")
    assert data in [bytes([i]) * (BIG // 4) for i in range(3)]


def test_artifact_round_trip(store_uri: str, tmp_path: Path) -> None:
    store = open_store(store_uri)
    source = _artifact(tmp_path / "src")
    manifest = put_artifact(store, "models/m/cpu", source, {"trace_key": "k1"})
    assert set(manifest.files) == {"model.ts", "config.json", "sub/extra.bin"}
    assert read_manifest(store, "models/m/cpu") == manifest
    directory, loaded = materialize(store, "models/m/cpu", tmp_path / "cache")
    assert loaded.metadata == {"trace_key": "k1"}
    for name in manifest.files:
        assert (directory / name).read_bytes() == (source / name).read_bytes()
    # A second materialize reuses (and re-verifies) the same directory.
    assert materialize(store, "models/m/cpu", tmp_path / "cache")[0] == directory


def _corrupt(store, key: str, change) -> None:
    store.put_bytes(key, change(store.get_bytes(key)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:], "model.ts does not match its manifest"),
        (lambda d: d[: len(d) // 2], "model.ts is truncated: 100000 of 200000 bytes"),
        (lambda d: d + b"extra", "model.ts has 200005 bytes"),
    ],
)
def test_tampered_or_truncated_artifacts_are_refused(
    store_uri: str, tmp_path: Path, change, message: str
) -> None:
    store = open_store(store_uri)
    put_artifact(store, "models/m/cpu", _artifact(tmp_path / "src"))
    _corrupt(store, "models/m/cpu/model.ts", change)
    with pytest.raises(IntegrityError, match=message):
        materialize(store, "models/m/cpu", tmp_path / "cache")
    # Nothing half-verified is left in the cache for a later load to pick up.
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]


def test_missing_file_corrupt_manifest_and_no_manifest(store_uri: str, tmp_path: Path) -> None:
    store = open_store(store_uri)
    put_artifact(store, "models/m/cpu", _artifact(tmp_path / "src"))
    store.delete("models/m/cpu/sub/extra.bin")
    with pytest.raises(StoreError, match="extra.bin"):
        materialize(store, "models/m/cpu", tmp_path / "cache")
    store.put_bytes("models/m/cpu/manifest.json", b"{not json")
    with pytest.raises(IntegrityError, match="corrupt manifest.json"):
        read_manifest(store, "models/m/cpu")
    with pytest.raises(ObjectNotFound, match="no manifest.json"):
        materialize(store, "models/none/cpu", tmp_path / "cache")


def test_cached_s3_artifact_is_reverified(s3_store_uri: str, tmp_path: Path) -> None:
    store = open_store(s3_store_uri)
    put_artifact(store, "models/m/cpu", _artifact(tmp_path / "src"))
    directory, _ = materialize(store, "models/m/cpu", tmp_path / "cache")
    (directory / "config.json").write_text('{"hidden_size": 64}')
    with pytest.raises(IntegrityError, match="config.json"):
        materialize(store, "models/m/cpu", tmp_path / "cache")


def test_rewrite_never_pairs_an_old_manifest_with_new_files(store_uri: str, tmp_path: Path) -> None:
    store = open_store(store_uri)
    put_artifact(store, "models/m/cpu", _artifact(tmp_path / "one", seed=1))
    put_artifact(store, "models/m/cpu", _artifact(tmp_path / "two", seed=2))
    directory, _ = materialize(store, "models/m/cpu", tmp_path / "cache")
    assert (directory / "model.ts").read_bytes()[:1] == bytes([2])
