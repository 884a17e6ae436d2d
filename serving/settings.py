"""Myriad's settings: one typed object, read at the edge (the CLI, a flow's entry, a server's
main) from the environment and an optional project settings file, and passed down.

This is the only module that reads the process environment (a test holds the rest of the code
to that). Plain data: it imports neither Prefect nor a web framework, so every layer above
``packing`` can take it.

Sources, later ones winning: the defaults here, the project file (``myriad.toml`` in the working
directory, or the file ``MYRIAD_SETTINGS`` names; one table per section, keys as the fields
below), then the environment variables each field names in its comment. :func:`current` builds
the object once per distinct environment, so a test that changes a variable sees the change and
a long-running process pays for the parse once.
"""

from __future__ import annotations

import os
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from packing.errors import MyriadError

SETTINGS_FILE = "myriad.toml"


class SettingsError(MyriadError, ValueError):
    """The settings file or a variable is malformed; the message names which."""


class StoreSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    uri: str | None = None  # MYRIAD_STORE; None: <home>/store
    s3_endpoint_url: str | None = None  # AWS_ENDPOINT_URL: an S3-compatible server


class ResultsSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    block: str | None = None  # MYRIAD_RESULTS: a prefect-aws S3Bucket block slug


class PrefectSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    api_url: str | None = None  # PREFECT_API_URL; None: a temporary local server
    home: str | None = None  # PREFECT_HOME; None: <home>/prefect for the temporary server
    # The temporary server's 20 s default is too short on a busy 2-core machine.
    startup_timeout_s: float = 120.0


class TraceFanOutSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    workers: int = 2  # MYRIAD_TRACE_WORKERS: task runs at once
    concurrency: int | None = None  # MYRIAD_TRACE_CONCURRENCY: compiles at once per process
    dask_address: str | None = None  # MYRIAD_DASK_ADDRESS: run trace chunks on that cluster


class BuildSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    base_image: str | None = None  # MYRIAD_BASE_IMAGE
    wheels_dir: str | None = None  # MYRIAD_WHEELS_DIR
    ca_bundle: str | None = None  # MYRIAD_CA_BUNDLE
    network: str | None = None  # MYRIAD_BUILD_NETWORK
    build_args: dict[str, str] = {}  # MYRIAD_BUILD_ARGS: KEY=VALUE words
    registry: str | None = None  # MYRIAD_REGISTRY: where images are pushed and pulled
    container_engine: str | None = None  # MYRIAD_CONTAINER_ENGINE: docker | podman
    podman_runtime: str | None = None  # MYRIAD_PODMAN_RUNTIME ("": podman's default)


class ServerSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    log_level: str = "warning"  # MYRIAD_LOG_LEVEL
    admin_token: str | None = None  # MYRIAD_ADMIN_TOKEN: enables load/unload routes


class ObserveSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    prometheus_url: str | None = None  # MYRIAD_PROMETHEUS_URL; None: scrape servers directly


class KubernetesSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    kubeconfig: str | None = None  # KUBECONFIG
    # How servers in a cluster read the store when a deploy names neither (a flow run on the
    # Kubernetes work pool, say): an IRSA role for their ServiceAccount, or a Secret's keys.
    server_role_arn: str | None = None  # MYRIAD_SERVER_ROLE_ARN
    store_secret: str | None = None  # MYRIAD_STORE_SECRET
    in_cluster: bool = False  # KUBERNETES_SERVICE_HOST is set: use the pod's account


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    home: str  # MYRIAD_HOME; default ./.myriad: local records, the store, Prefect's home
    debug: bool = False  # MYRIAD_DEBUG: tracebacks instead of one-line errors
    store: StoreSettings = msgspec.field(default_factory=StoreSettings)
    results: ResultsSettings = msgspec.field(default_factory=ResultsSettings)
    prefect: PrefectSettings = msgspec.field(default_factory=PrefectSettings)
    trace: TraceFanOutSettings = msgspec.field(default_factory=TraceFanOutSettings)
    build: BuildSettings = msgspec.field(default_factory=BuildSettings)
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    kubernetes: KubernetesSettings = msgspec.field(default_factory=KubernetesSettings)
    observe: ObserveSettings = msgspec.field(default_factory=ObserveSettings)
    source: str | None = None  # the project file these came from, if any

    @property
    def data_dir(self) -> Path:
        return Path(self.home)

    @property
    def store_uri(self) -> str:
        return self.store.uri or str(self.data_dir / "store")

    @property
    def temp_dir(self) -> Path:
        return Path(tempfile.gettempdir())


# (section, field, variable, kind): every variable Myriad reads, in one table.
_VARIABLES: tuple[tuple[str | None, str, str, str], ...] = (
    (None, "home", "MYRIAD_HOME", "path"),
    (None, "debug", "MYRIAD_DEBUG", "bool"),
    ("store", "uri", "MYRIAD_STORE", "str"),
    ("store", "s3_endpoint_url", "AWS_ENDPOINT_URL", "str"),
    ("results", "block", "MYRIAD_RESULTS", "str"),
    ("prefect", "api_url", "PREFECT_API_URL", "str"),
    ("prefect", "home", "PREFECT_HOME", "str"),
    ("trace", "workers", "MYRIAD_TRACE_WORKERS", "int"),
    ("trace", "concurrency", "MYRIAD_TRACE_CONCURRENCY", "int"),
    ("trace", "dask_address", "MYRIAD_DASK_ADDRESS", "str"),
    ("build", "base_image", "MYRIAD_BASE_IMAGE", "str"),
    ("build", "wheels_dir", "MYRIAD_WHEELS_DIR", "str"),
    ("build", "ca_bundle", "MYRIAD_CA_BUNDLE", "str"),
    ("build", "network", "MYRIAD_BUILD_NETWORK", "str"),
    ("build", "build_args", "MYRIAD_BUILD_ARGS", "words"),
    ("build", "registry", "MYRIAD_REGISTRY", "str"),
    ("build", "container_engine", "MYRIAD_CONTAINER_ENGINE", "str"),
    ("build", "podman_runtime", "MYRIAD_PODMAN_RUNTIME", "raw"),
    ("server", "log_level", "MYRIAD_LOG_LEVEL", "str"),
    ("server", "admin_token", "MYRIAD_ADMIN_TOKEN", "str"),
    ("kubernetes", "kubeconfig", "KUBECONFIG", "str"),
    ("kubernetes", "server_role_arn", "MYRIAD_SERVER_ROLE_ARN", "str"),
    ("kubernetes", "store_secret", "MYRIAD_STORE_SECRET", "str"),
    ("observe", "prometheus_url", "MYRIAD_PROMETHEUS_URL", "str"),
    ("kubernetes", "in_cluster", "KUBERNETES_SERVICE_HOST", "present"),
)
VARIABLES = tuple(v for _, _, v, _ in _VARIABLES)


def _value(name: str, text: str, kind: str) -> Any:
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise SettingsError(f"{name}={text!r}: expected a whole number") from None
    if kind == "bool":
        return text.strip().lower() not in ("", "0", "false", "no", "off")
    if kind == "present":
        return True
    if kind == "path":
        return str(Path(text).expanduser().resolve())
    if kind == "words":
        words = text.split()
        if not all("=" in w for w in words):
            raise SettingsError(f"{name}={text!r}: expected KEY=VALUE words")
        return dict(w.split("=", 1) for w in words)
    return text


def _project_file(environ: Mapping[str, str], cwd: Path) -> Path | None:
    named = environ.get("MYRIAD_SETTINGS")
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise SettingsError(f"MYRIAD_SETTINGS={named}: no such file")
        return path
    path = cwd / SETTINGS_FILE
    return path if path.is_file() else None


def from_env(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Settings:
    """Settings from ``environ`` (default: the process environment) over the project file."""
    environ = os.environ if environ is None else environ
    cwd = cwd or Path.cwd()
    raw: dict[str, Any] = {}
    source = _project_file(environ, cwd)
    if source is not None:
        try:
            raw = tomllib.loads(source.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"{source}: {exc}") from None
    for section, field, name, kind in _VARIABLES:
        text = environ.get(name)
        if text is None or (text == "" and kind not in ("raw",)):
            continue
        target = raw if section is None else raw.setdefault(section, {})
        target[field] = _value(name, text, kind)
    raw.setdefault("home", str((cwd / ".myriad").resolve()))
    raw["home"] = str(Path(raw["home"]).expanduser().resolve())
    raw["source"] = str(source) if source else None
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        where = str(source) if source else "settings"
        raise SettingsError(f"{where}: {exc}") from None


_cache: dict[tuple, Settings] = {}


def current() -> Settings:
    """The settings of this process, parsed once per distinct environment and directory."""
    key = (
        os.getcwd(),
        os.environ.get("MYRIAD_SETTINGS"),
        *(os.environ.get(name) for name in VARIABLES),
    )
    settings = _cache.get(key)
    if settings is None:
        settings = _cache[key] = from_env()
    return settings


def ensure_data_dir(settings: Settings) -> Path:
    """Create the data directory (Prefect creates its home without parents)."""
    path = settings.data_dir
    path.mkdir(parents=True, exist_ok=True)
    return path


def use_embedded_prefect(settings: Settings) -> None:
    """Point Prefect, which reads its own variables, at Myriad's defaults: without an API URL,
    flows run on a temporary local server whose SQLite database lives in the data directory
    (created first), not in the user's home; analytics off (offline machines log an error on
    every start otherwise)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault(
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
        str(int(settings.prefect.startup_timeout_s)),
    )
    if settings.prefect.api_url:
        return
    home = Path(settings.prefect.home or settings.data_dir / "prefect")
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home))


def use_serial_tokenizers() -> None:
    """Make HF tokenizers work on the calling thread: with its default parallelism, padding
    even one encoding goes through its thread pool, whose threads spin for far longer than
    the padding takes (a 12-word text: 34 µs of CPU serially, about 120 µs with the pool,
    measured 2026-12-07). A server tokenises a request or a few at a time while its other
    threads need the cores, so every server process turns it off before its first encode (its
    front ends inherit it); a value the user exported is kept."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tokenizers_parallel() -> bool:
    """Whether HF tokenizers may use its thread pool (its own reading of the variable)."""
    value = os.environ.get("TOKENIZERS_PARALLELISM")
    return value is None or value.lower() not in ("", "off", "false", "f", "no", "n", "0")


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a server process inherits: this one's, plus ``extra``."""
    return {**os.environ, **(extra or {})}
