"""The artifact store: one interface over ``file://`` and ``s3://``, atomic writes, and
manifests with a sha256 per file so that a tampered or truncated artifact is refused at load.
"""

from __future__ import annotations

import abc
import hashlib
import os
import shutil
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import msgspec

from packing.errors import MyriadError
from packing.io import ContractError, decode, load, to_json, write_atomic
from serving import settings

MANIFEST_NAME = "manifest.json"
T = TypeVar("T")
_TEMP_MARK = ".tmp-"


class StoreError(MyriadError, RuntimeError):
    """A store operation failed; the message names the store and the key."""


class ObjectNotFound(StoreError):
    pass


class IntegrityError(StoreError):
    """An artifact does not match its manifest: tampered, truncated or missing files."""


def data_dir() -> Path:
    return settings.current().data_dir


def _check_key(uri: str, key: str) -> str:
    parts = PurePosixPath(key).parts
    if (
        not key
        or key.startswith("/")
        or any(p in ("", ".", "..") for p in key.split("/"))
        or any(p.startswith(_TEMP_MARK) for p in parts)
    ):
        raise StoreError(f"{uri}: invalid key {key!r} (relative, no '.', '..' or empty parts)")
    return key


class ArtifactStore(abc.ABC):
    uri: str

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    @abc.abstractmethod
    def get_file(self, key: str, dest: Path) -> None: ...

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]: ...

    @abc.abstractmethod
    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    def url_for(self, key: str) -> str:
        return f"{self.uri}/{_check_key(self.uri, key)}"

    def local_path(self, key: str) -> Path | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class FileStore(ArtifactStore):
    """Objects are files under ``root``; every write goes to a temp file that is renamed into
    place, so a reader sees the old object or the new one, never part of one."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(self.uri, key)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def _write(self, key: str, fill: Any) -> None:
        _write_local_atomic(self._path(key), fill, durable=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda handle: handle.write(data))

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as source:
            self._write(key, lambda handle: shutil.copyfileobj(source, handle, 1 << 20))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"{self.uri}: no object {key!r}") from None

    def get_file(self, key: str, dest: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(f"{self.uri}: no object {key!r}")
        with open(source, "rb") as handle:
            _write_local_atomic(dest, lambda out: shutil.copyfileobj(handle, out, 1 << 20))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        prefix = prefix.rstrip("/")
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(
            path.relative_to(self.root).as_posix()
            for path in base.rglob("*")
            if path.is_file() and not path.name.startswith(_TEMP_MARK)
        )

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3Store(ArtifactStore):
    """Objects under ``s3://bucket/prefix``. S3 makes a PUT visible only once complete, so
    writes are atomic by the protocol; the endpoint comes from ``AWS_ENDPOINT_URL``."""

    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.client = s3_client()

    def _key(self, key: str) -> str:
        _check_key(self.uri, key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, key: str, operation: Any, *args: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return operation(*args, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(f"{self.uri}: no object {key!r}") from None
            if code == "NoSuchBucket":
                raise StoreError(f"{self.uri}: bucket {self.bucket!r} does not exist") from None
            raise StoreError(f"{self.uri}: {key!r}: {code or exc}") from None
        except BotoCoreError as exc:
            raise StoreError(f"{self.uri}: {key!r}: {exc}") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(key, self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, path: Path) -> None:
        self._call(key, self.client.upload_file, str(path), self.bucket, self._key(key))

    def get_bytes(self, key: str) -> bytes:
        answer = self._call(key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return answer["Body"].read()

    def get_file(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{_TEMP_MARK}{dest.name}.{uuid.uuid4().hex}")
        try:
            self._call(key, self.client.download_file, self.bucket, self._key(key), str(tmp))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        try:
            self._call(key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        prefix = prefix.rstrip("/")
        search = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(
            prefix, lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=search))
        )
        keys = (item["Key"][strip:] for page in pages for item in page.get("Contents", []))
        return sorted(k for k in keys if _under(k, prefix))

    def delete(self, key: str) -> None:
        self._call(key, self.client.delete_object, Bucket=self.bucket, Key=self._key(key))


def _under(key: str, prefix: str) -> bool:
    return not prefix or key == prefix or key.startswith(prefix + "/")


def open_store(uri: str | None = None) -> ArtifactStore:
    """``file:///abs/path``, ``s3://bucket[/prefix]`` or a bare directory path; ``None`` means
    ``$MYRIAD_STORE``, else ``<data dir>/store``."""
    uri = uri or settings.current().store_uri
    if uri.startswith("s3://"):
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise StoreError(f"store URI {uri!r} names no bucket")
        return S3Store(bucket, prefix)
    if uri.startswith("file://"):
        path = uri.removeprefix("file://")
        if not path.startswith("/"):
            raise StoreError(f"store URI {uri!r}: file:// URIs need an absolute path (file:///...)")
        return FileStore(Path(path))
    if "://" in uri:
        raise StoreError(f"store URI {uri!r}: unsupported scheme; use file:// or s3://")
    return FileStore(Path(uri))


def read_document(uri: str, kind: type[T]) -> T:
    """Decode the YAML or JSON document at ``uri`` into ``kind`` (ContractError if it is not
    there or does not validate; the message names the URI and the field)."""
    if uri.startswith("s3://"):
        parent, _, name = uri.rpartition("/")
        if not name or parent == "s3:/":
            raise ContractError(f"{uri}: an s3:// URI must name an object (s3://bucket/key)")
        try:
            data = open_store(parent).get_bytes(name)
        except StoreError as exc:
            if "no object" in str(exc):
                raise ContractError(f"{uri}: no such object") from None
            raise
        return decode(data, kind, uri)
    if uri.startswith("file://"):
        uri = uri.removeprefix("file://")
    elif "://" in uri:
        raise ContractError(f"{uri}: unsupported URI scheme; use a path, file:// or s3://")
    return load(Path(uri), kind)


def _write_local_atomic(dest: Path, fill: Any, durable: bool = False) -> None:
    """Write through a temp file named so listings skip it, and rename; ``durable`` also
    fsyncs before the rename (store objects; the local cache can be refetched)."""
    write_atomic(dest, fill, temp_prefix=_TEMP_MARK, durable=durable)


# ---------------------------------------------------------------------------------- artifacts


class FileEntry(msgspec.Struct, forbid_unknown_fields=True):
    sha256: str
    size: int


class Manifest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    schema_version: int = 1
    created_at: str
    files: dict[str, FileEntry]
    metadata: dict[str, Any] = {}


def s3_client() -> Any:
    """A boto3 S3 client at ``$AWS_ENDPOINT_URL`` (or AWS), retrying throttles and resets."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=settings.current().store.s3_endpoint_url,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}),
    )


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(src_dir: Path, metadata: dict[str, Any] | None = None) -> Manifest:
    files = {
        path.relative_to(src_dir).as_posix(): FileEntry(sha256_file(path), path.stat().st_size)
        for path in sorted(src_dir.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }
    return Manifest(
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        files=files,
        metadata=metadata or {},
    )


def put_artifact(
    store: ArtifactStore, prefix: str, src_dir: Path, metadata: dict[str, Any] | None = None
) -> Manifest:
    """Upload every file of ``src_dir``, then the manifest: its presence commits the artifact.

    The old manifest goes first, so no reader pairs it with the new files meanwhile.
    """
    manifest = build_manifest(src_dir, metadata)
    store.delete(f"{prefix}/{MANIFEST_NAME}")
    for name in manifest.files:
        store.put_file(f"{prefix}/{name}", src_dir / name)
    store.put_bytes(f"{prefix}/{MANIFEST_NAME}", msgspec.json.encode(manifest))
    return manifest


def read_manifest(store: ArtifactStore, prefix: str) -> Manifest | None:
    try:
        data = store.get_bytes(f"{prefix}/{MANIFEST_NAME}")
    except ObjectNotFound:
        return None
    try:
        return msgspec.json.decode(data, type=Manifest)
    except msgspec.DecodeError as exc:
        raise IntegrityError(f"{store.url_for(prefix)}: corrupt {MANIFEST_NAME}: {exc}") from None


def verify_dir(directory: Path, manifest: Manifest, label: str) -> None:
    for name, entry in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise IntegrityError(f"{label}: {name} is missing")
        size = path.stat().st_size
        if size < entry.size:
            raise IntegrityError(f"{label}: {name} is truncated: {size} of {entry.size} bytes")
        if size != entry.size:
            raise IntegrityError(f"{label}: {name} has {size} bytes, manifest says {entry.size}")
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise IntegrityError(
                f"{label}: {name} does not match its manifest (sha256 {actual[:12]}…, "
                f"expected {entry.sha256[:12]}…): tampered or corrupted"
            )


def materialize(
    store: ArtifactStore, prefix: str, cache_dir: Path | None = None
) -> tuple[Path, Manifest]:
    """A local directory holding the verified artifact at ``prefix``.

    A file store is verified in place. An S3 artifact is downloaded into a temporary sibling
    directory and renamed into the cache only once every file verifies, so the cache never
    holds a half-written artifact and concurrent loaders of one artifact both succeed.
    """
    label = store.url_for(prefix)
    manifest = read_manifest(store, prefix)
    if manifest is None:
        raise ObjectNotFound(
            f"{label}: no {MANIFEST_NAME} (not traced yet, or its write did not finish)"
        )
    local = store.local_path(prefix)
    if local is not None:
        verify_dir(local, manifest, label)
        return local, manifest
    cache_root = cache_dir or data_dir() / "cache"
    digest = hashlib.sha256(msgspec.json.encode(manifest)).hexdigest()[:16]
    target = cache_root / prefix / digest
    if target.is_dir():
        verify_dir(target, manifest, label)
        return target, manifest
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_TEMP_MARK, dir=target.parent))
    try:
        for name in manifest.files:
            store.get_file(f"{prefix}/{name}", staging / name)
        verify_dir(staging, manifest, label)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # another loader won the race; its copy verified too
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, manifest


# ------------------------------------------------------------------------------- key layout
# Every key the pipeline writes, in one place: models (traced artifacts), plans (immutable, with
# a pointer to the newest), deployments (records and the plan each ran) and reports.

LATEST_PLAN_KEY = "plans/latest"


def artifact_prefix(model_id: str, processor: str) -> str:
    return f"models/{model_id}/{processor}"


def plan_key(plan_id: str) -> str:
    return f"plans/{plan_id}/plan.json"


def deployment_key(name: str) -> str:
    """Where a deployment's record lives in its store."""
    return f"deployments/{name}.json"


def deployment_prefix(name: str) -> str:
    """The plans a deployment ran, ``<prefix><plan id>.plan.json``."""
    return f"deployments/{name}/"


def problem_key(digest: str) -> str:
    return f"problems/{digest}.json"


def publish_problem(problem: Any, store_uri: str | None) -> str:
    """Write a packing problem under its content hash (``problems/<sha256[:16]>.json``), so the
    pack task is handed a URI, not the problem; returns that URI."""
    data = to_json(problem)
    store = open_store(store_uri)
    key = problem_key(hashlib.sha256(data).hexdigest()[:16])
    if not store.exists(key):
        store.put_bytes(key, data)
    return store.url_for(key)


def deployment_plan_key(name: str, plan_id: str) -> str:
    """The copy of a plan a deployment ran, kept with its record."""
    return f"{deployment_prefix(name)}{plan_id}.plan.json"


def observation_key(name: str, stamp: str) -> str:
    """An observation of a deployment's traffic (serving.observe), kept beside its record."""
    return f"{deployment_prefix(name)}observations/{stamp}.json"


def latest_observation_key(name: str) -> str:
    return f"{deployment_prefix(name)}observations/latest.json"


def report_key(run_id: str, name: str) -> str:
    return f"reports/{run_id}/{name}"


def plan_problem_key(plan_id: str) -> str:
    """The problem a plan was solved for: what its traffic was planned to be."""
    return f"plans/{plan_id}/problem.json"


def publish_plan(plan: Any, store_uri: str | None, problem: Any = None) -> str:
    """Write ``plans/<id>/plan.json`` (immutable), with ``problem`` beside it when given, and
    point ``plans/latest`` at it; returns the plan's URI. ``plan``: a
    ``packing.contracts.Plan``, ``problem`` the ``Problem`` it was solved for."""
    store = open_store(store_uri)
    key = plan_key(plan.plan_id)
    if problem is not None and not store.exists(plan_problem_key(plan.plan_id)):
        store.put_bytes(plan_problem_key(plan.plan_id), to_json(problem))
    if not store.exists(key):
        store.put_bytes(key, to_json(plan))
    store.put_bytes(LATEST_PLAN_KEY, plan.plan_id.encode())
    return store.url_for(key)


def latest_plan_uri(store_uri: str | None) -> str | None:
    """The URI of the store's latest plan, or None when the store holds no plan yet."""
    store = open_store(store_uri)
    if not store.exists(LATEST_PLAN_KEY):
        return None
    plan_id = store.get_bytes(LATEST_PLAN_KEY).decode().strip()
    return store.url_for(plan_key(plan_id))
