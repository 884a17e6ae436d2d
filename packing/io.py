"""Load and save contracts with one clear error per bad file, and never a half-written file."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

import msgspec
import yaml

from packing import contracts
from packing.errors import MyriadError

T = TypeVar("T", bound=msgspec.Struct)

# libyaml's parser and emitter where PyYAML has them: the pure-Python ones take minutes and
# gigabytes over a 100,000-model problem.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class ContractError(MyriadError, ValueError):
    """A contract file is unreadable or invalid; the message names the file and the field."""


def decode(data: bytes | str, kind: type[T], label: str) -> T:
    """Decode YAML or JSON text (JSON is YAML) into ``kind``; ``label`` names the source."""
    try:
        raw = _parse(data)
    except yaml.YAMLError as exc:
        raise ContractError(f"{label}: not valid YAML/JSON: {_one_line(exc)}") from None
    if not isinstance(raw, dict):
        raise ContractError(
            f"{label}: expected a mapping at the top level, got {type(raw).__name__}"
        )
    try:
        return msgspec.convert(raw, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise ContractError(f"{label}: {_describe(exc, kind)}") from None


def _parse(data: bytes | str) -> object:
    """JSON documents (plans, records) by msgspec's JSON parser, everything else as YAML."""
    if data.lstrip()[:1] in (b"{", "{"):
        try:
            return msgspec.json.decode(data)
        except msgspec.DecodeError:
            pass  # YAML's flow style, or broken: the YAML parser decides and names the place
    return yaml.load(data, Loader=_YAML_LOADER)


def load(path: str | os.PathLike[str], kind: type[T]) -> T:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ContractError(f"{path}: no such file") from None
    except OSError as exc:
        raise ContractError(f"{path}: cannot read: {exc.strerror}") from None
    return decode(data, kind, str(path))


def to_json(value: msgspec.Struct) -> bytes:
    if _has_tier_fields(value):
        data = msgspec.json.encode(to_builtins(value))
    else:
        data = msgspec.json.encode(value)
    return msgspec.json.format(data, indent=2) + b"\n"


def to_builtins(value: msgspec.Struct) -> dict:
    data = msgspec.to_builtins(value)
    if _has_tier_fields(value):
        _drop_tier_defaults(value, data)
    return data


# The on-demand tier's fields are left out of a document while they hold their defaults
# (contracts encode every other default): a problem or plan without the tier then reads byte
# for byte as it did before the tier existed, and so keeps its plan id (a digest of the
# problem's and servers' JSON). Decoding accepts them present or absent.
_TIER_DEFAULTS: dict[type, dict[str, object]] = {
    contracts.Profile: {"load_seconds": None, "store_load_seconds": None},
    contracts.Limits: {"on_demand": None},
    contracts.PlannedServer: {
        "on_demand_model_ids": [],
        "cache_memory_bytes": 0,
        "cold_fraction": 0.0,
    },
    contracts.Plan: {"cold_fraction": 0.0, "cold_start_seconds": 0.0},
}
# Where those structs sit inside the documents that hold them.
_TIER_CHILDREN: dict[type, tuple[str, ...]] = {
    contracts.Problem: ("limits", "models"),
    contracts.ProblemModel: ("profiles",),
    contracts.Plan: ("servers",),
}


def _has_tier_fields(value: object) -> bool:
    if isinstance(value, list):
        return bool(value) and _has_tier_fields(value[0])
    return type(value) in _TIER_DEFAULTS or type(value) in _TIER_CHILDREN


def _drop_tier_defaults(value: object, data: object) -> None:
    if isinstance(value, list):
        for item, item_data in zip(value, data, strict=True):  # type: ignore[call-overload]
            _drop_tier_defaults(item, item_data)
        return
    assert isinstance(data, dict)
    for name, default in _TIER_DEFAULTS.get(type(value), {}).items():
        if name in data and data[name] == default:
            del data[name]
    for name in _TIER_CHILDREN.get(type(value), ()):
        _drop_tier_defaults(getattr(value, name), data[name])


def save(value: msgspec.Struct, path: str | os.PathLike[str]) -> Path:
    """Write JSON (``.json``) or YAML (anything else) atomically: temp file, fsync, rename."""
    path = Path(path)
    if path.suffix == ".json":
        data = to_json(value)
    else:
        data = yaml.dump(
            to_builtins(value), Dumper=_YAML_DUMPER, sort_keys=False, allow_unicode=False
        ).encode()
    write_atomic(path, data)
    return path


def _new_file_mode() -> int:
    # What open() gives a new file. mkstemp's 0600 would hide store objects from a server that
    # runs as another user (a container's uid 10001 reading a store mounted from the host).
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_NEW_FILE_MODE = _new_file_mode()


def write_atomic(
    path: Path,
    data: bytes | Callable[[BinaryIO], object],
    *,
    temp_prefix: str | None = None,
    durable: bool = True,
) -> None:
    """Write ``data`` (bytes, or a function that writes to the handle) through a temp file in
    the same folder and rename it into place; ``durable`` fsyncs before the rename. The temp
    file is ``.<name>.*.tmp`` unless ``temp_prefix`` names it (the store's listings skip
    its prefix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if temp_prefix is None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix, dir=path.parent)
    try:
        os.fchmod(fd, _NEW_FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                data(handle)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _describe(exc: msgspec.ValidationError, kind: type) -> str:
    # msgspec says "Expected `int` >= 1 - at `$.models[0].replicas`"; lead with the field.
    match = re.fullmatch(r"(.*) - at `\$\.?(.*)`", str(exc), flags=re.DOTALL)
    if match is None:
        return f"invalid {kind.__name__.lower()}: {exc}"
    return f"field {match.group(2) or '(top level)'}: {match.group(1)}"


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
