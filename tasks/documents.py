"""Read the documents flows are given by URI (fleet, catalog, plan): a local path,
``file:///abs/path`` or ``s3://bucket/key``. Flows pass these URIs between stages, so the
Prefect database holds a short string, not a plan."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from packing.contracts import Plan
from packing.io import ContractError, decode, load

T = TypeVar("T")


def read_document(uri: str, kind: type[T]) -> T:
    """Decode the YAML or JSON document at ``uri`` into ``kind`` (ContractError if it is not
    there or does not validate; the message names the URI and the field)."""
    if uri.startswith("s3://"):
        from serving.store import StoreError, open_store

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


def base_dir(uri: str) -> Path | None:
    """Where a fleet's relative ``hf:`` sources resolve: the fleet file's folder (None on S3)."""
    if uri.startswith("s3://"):
        return None
    return Path(uri.removeprefix("file://")).resolve().parent


def open_plan(uri: str) -> Plan:
    return read_document(uri, Plan)


def local_path(uri: str) -> Path | None:
    """The local file behind ``uri``, or None for an object store."""
    if uri.startswith("s3://"):
        return None
    return Path(uri.removeprefix("file://"))
