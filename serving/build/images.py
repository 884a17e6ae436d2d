"""Server images: one per processor from ``Dockerfiles/<processor>.Dockerfile``, built with
whichever container engine answers (docker, else podman), tagged by project version and a hash
of everything that goes into the image, pushed to a registry (ECR logins through boto3).

Domain code: no Prefect. ``tasks/build.py`` and the ``myriad build`` command call it; the
container runtime calls :func:`container_engine` and :func:`engine_command`. About 500 lines:
the build context, its content hash and the engine's commands are one unit (the hash must
cover exactly what the build sends).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path

import msgspec

from packing.errors import MyriadError
from serving import settings

PROCESSORS = ("cpu", "gpu", "inf")
# The image the Kubernetes work pool's flow runs use (Dockerfiles/orchestrator.Dockerfile):
# `myriad build --processor orchestrator`, tagged <registry or myriad>/orchestrator:<tag>.
ORCHESTRATOR = "orchestrator"
# The checkout the images are built from: Dockerfiles/, .dockerignore, pyproject.toml, ...
ROOT = Path(__file__).resolve().parents[2]
IGNORE_FILE = ".dockerignore"
CONTENT_LABEL = "org.myriad.content-hash"
BASE_IMAGE_FOR_TESTS = "localhost/myriad-base:bookworm"
# With a local CPU torch wheel in the `wheels` context, torch's dependencies come from PyPI.
DEFAULT_INDEX_URL = "https://pypi.org/simple"
_LOCAL_TORCH = re.compile(r"^torch-(?P<version>[0-9][^-]*\+cpu)-cp311-")
_ECR_HOST = re.compile(r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com$")
# Directories never worth walking for the build context.
_PRUNE = {".git", ".venv", ".myriad", "node_modules"}


class BuildError(MyriadError, RuntimeError):
    """An image could not be built, inspected or pushed; the message says which and why."""


class NoEngine(BuildError):
    """Neither docker nor podman answers on this machine."""


class BuildResult(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    processor: str
    engine: str
    image: str  # the tag, <registry or myriad>/server-<processor>:<version>-<hash[:12]>
    digest: str  # image id (sha256:...); after a push, the registry's manifest digest
    content_hash: str
    pushed: bool = False
    seconds: float = 0.0
    skipped: bool = False  # the tag already existed with this content hash
    # What the content hash covered besides the build context (build arguments, the wheel
    # listing): with them a later process can tell whether the context still gives this image.
    build_inputs: dict[str, str] = {}


# ------------------------------------------------------------------------------------- engine


_ANSWERED: set[str] = set()  # engines seen answering in this process (a "no" is asked again)


def _answers(engine: str) -> bool:
    if engine in _ANSWERED:
        return True
    if shutil.which(engine) is None:
        return False
    try:
        probe = subprocess.run(
            [*engine_command(engine), "info"], capture_output=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    if probe.returncode == 0:
        _ANSWERED.add(engine)
    return probe.returncode == 0


def container_engine() -> str | None:
    """``docker`` or ``podman``, whichever answers (``<engine> info``), docker first; None when
    neither does. ``MYRIAD_CONTAINER_ENGINE`` picks one."""
    wanted = settings.current().build.container_engine
    for engine in (wanted,) if wanted else ("docker", "podman"):
        if _answers(engine):
            return engine
    return None


def engine_command(engine: str) -> list[str]:
    """The argv prefix for ``engine``: podman runs with ``--runtime runc`` when runc is
    installed (crun's setrlimit is refused in some VMs); ``MYRIAD_PODMAN_RUNTIME`` overrides
    (empty: podman's default)."""
    if engine != "podman":
        return [engine]
    runtime = settings.current().build.podman_runtime
    if runtime is None:
        runtime = "runc" if shutil.which("runc") or Path("/usr/sbin/runc").exists() else ""
    return ["podman", "--runtime", runtime] if runtime else ["podman"]


def require_engine(engine: str | None = None) -> str:
    engine = engine or container_engine()
    if engine is None:
        raise NoEngine("no docker or podman engine answers (`docker info` and `podman info` fail)")
    return engine


def _run(argv: list[str], what: str, **kwargs) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    except OSError as exc:
        raise BuildError(f"{what}: {exc}") from exc
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        errors = [line for line in lines if "error" in line.lower()]
        raise BuildError(
            f"{what} failed (exit {result.returncode}): {(errors or lines or ['no output'])[-1]}"
        )
    return result


# ------------------------------------------------------------------------------ content hash


def dockerfile_for(processor: str, root: Path | None = None) -> Path:
    path = (root or ROOT) / "Dockerfiles" / f"{processor}.Dockerfile"
    if not path.is_file():
        raise BuildError(f"no Dockerfile for processor {processor!r}: {path} is missing")
    return path


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regex over a relative path."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
        i += 1
    return re.compile(out + "(?:/.*)?")  # a matched directory takes its contents with it


def ignore_rules(root: Path | None = None) -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per line of the ignore file, in order; the last match decides."""
    path = (root or ROOT) / IGNORE_FILE
    rules = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append((negated, _pattern_regex(pattern)))
    return rules


def _ignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    ignored = False
    for negated, regex in rules:
        if regex.fullmatch(rel):
            ignored = not negated
    return ignored


def context_files(root: Path | None = None) -> Iterator[Path]:
    """Every file of the build context, relative to ``root``, sorted: what the engine sends."""
    root = root or ROOT
    rules = ignore_rules(root)
    negations = [regex.pattern for negated, regex in rules if negated]
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath).relative_to(root)
        keep = []
        for name in sorted(dirnames):
            rel = (base / name).as_posix()
            if name in _PRUNE and base == Path("."):
                continue
            # An ignored directory is walked only if a negation could bring back part of it.
            if _ignored(rel, rules) and not any(
                p.startswith(re.escape(rel)) or p.startswith("(?:.*/)?") for p in negations
            ):
                continue
            keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            rel = base / name
            if not _ignored(rel.as_posix(), rules):
                yield rel


def content_hash(
    processor: str, build_args: Mapping[str, str] | None = None, root: Path | None = None
) -> str:
    """sha256 over the Dockerfile, the ignore file, every file of the build context (names and
    bytes) and the build arguments: equal hashes, equal images."""
    root = root or ROOT
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode())
        digest.update(data)

    add("dockerfile", dockerfile_for(processor, root).read_bytes())
    ignore = root / IGNORE_FILE
    add("ignore", ignore.read_bytes() if ignore.is_file() else b"")
    for rel in context_files(root):
        add(f"file:{rel.as_posix()}", (root / rel).read_bytes())
    for key, value in sorted((build_args or {}).items()):
        add(f"arg:{key}", value.encode())
    return digest.hexdigest()


def project_version() -> str:
    try:
        return metadata.version("myriad")
    except metadata.PackageNotFoundError:
        return "0.0.0"


# -------------------------------------------------------------------------------------- build


def local_torch_args(processor: str, wheels_dir: Path | str | None) -> dict[str, str]:
    """Build arguments that take torch from a CPU wheel in ``wheels_dir`` (cpu images only):
    ``TORCH_VERSION=<its version>``, ``TORCH_INDEX_URL=<PyPI>``; empty when there is none."""
    if processor not in ("cpu", ORCHESTRATOR) or not wheels_dir or not Path(wheels_dir).is_dir():
        return {}
    versions = sorted(
        m["version"]
        for p in Path(wheels_dir).glob("torch-*.whl")
        if (m := _LOCAL_TORCH.match(p.name))
    )
    if not versions:
        return {}
    return {"TORCH_VERSION": versions[-1], "TORCH_INDEX_URL": DEFAULT_INDEX_URL}


def build_options(build: settings.BuildSettings | None = None) -> dict:
    """Build options from the settings (``build``; default: this process's), for machines
    that build differently from the defaults (no registry, a local wheel directory, a
    TLS-intercepting proxy): base image, wheel directory, CA bundle, network, build arguments."""
    build = build or settings.current().build
    options: dict = {
        key: value
        for key in ("base_image", "wheels_dir", "ca_bundle", "network")
        if (value := getattr(build, key))
    }
    if build.build_args:
        options["build_args"] = dict(build.build_args)
    return options


class _Plan(msgspec.Struct, kw_only=True):
    """One build, resolved: arguments, contexts and the tag they give."""

    args: dict[str, str]
    wheels_dir: Path | None
    ca_bundle: Path | None
    network: str | None
    content_hash: str
    tag: str
    hashed: dict[str, str]


def _plan(
    processor: str,
    registry: str | None,
    base_image: str | None,
    wheels_dir: Path | str | None,
    ca_bundle: Path | str | None,
    build_args: Mapping[str, str] | None,
    network: str | None,
    root: Path,
) -> _Plan:
    env = build_options()
    base_image = base_image or env.get("base_image")
    wheels = wheels_dir or env.get("wheels_dir")
    bundle = ca_bundle or env.get("ca_bundle")
    build_args = env.get("build_args") if build_args is None else build_args
    args = {**local_torch_args(processor, wheels), **(build_args or {})}
    if base_image:
        args["BASE_IMAGE"] = base_image
    hashed = dict(args)
    if wheels is not None:
        wheels = Path(wheels).resolve()
        if not wheels.is_dir():
            raise BuildError(f"wheel directory {wheels} does not exist")
        listing = sorted(p for p in wheels.iterdir() if p.is_file())
        hashed["(wheels)"] = ",".join(f"{p.name}:{p.stat().st_size}" for p in listing)
    if bundle is not None:
        bundle = Path(bundle).resolve()
        if not bundle.is_file():
            raise BuildError(f"CA bundle {bundle} does not exist")
    digest = content_hash(processor, hashed, root)
    name = ORCHESTRATOR if processor == ORCHESTRATOR else f"server-{processor}"
    repository = f"{(registry or 'myriad').rstrip('/')}/{name}"
    return _Plan(
        args=args,
        wheels_dir=wheels,
        ca_bundle=bundle,
        network=network or env.get("network"),
        content_hash=digest,
        tag=f"{repository}:{project_version()}-{digest[:12]}",
        hashed=hashed,
    )


def image_tag(
    processor: str,
    registry: str | None = None,
    base_image: str | None = None,
    wheels_dir: Path | str | None = None,
    build_args: Mapping[str, str] | None = None,
    root: Path | None = None,
) -> str:
    """``<registry or myriad>/server-<processor>:<project version>-<content hash[:12]>``: the
    tag :func:`build_image` gives with the same arguments."""
    plan = _plan(processor, registry, base_image, wheels_dir, None, build_args, None, root or ROOT)
    return plan.tag


def _inspect(engine: str, ref: str) -> dict | None:
    result = subprocess.run(
        [*engine_command(engine), "image", "inspect", ref],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return None
    data = json.loads(result.stdout or "[]")
    return data[0] if data else None


def _labels(info: dict) -> dict[str, str]:
    return (info.get("Config") or {}).get("Labels") or info.get("Labels") or {}


def _image_id(info: dict) -> str:
    image_id = info["Id"]
    return image_id if image_id.startswith("sha256:") else f"sha256:{image_id}"


def image_id(ref: str, engine: str | None = None) -> str | None:
    """``sha256:<id>`` of a local image, or None when there is none by that name."""
    info = _inspect(require_engine(engine), ref)
    return _image_id(info) if info else None


def build_image(
    processor: str,
    registry: str | None = None,
    base_image: str | None = None,
    wheels_dir: Path | str | None = None,
    ca_bundle: Path | str | None = None,
    engine: str | None = None,
    build_args: Mapping[str, str] | None = None,
    network: str | None = None,
    root: Path | None = None,
) -> BuildResult:
    """Build the server image of ``processor``, tagged by :func:`image_tag`; skipped when that
    tag exists locally with the same content hash. ``wheels_dir`` becomes the ``wheels`` build
    context (with it, torch may come from a local wheel), ``ca_bundle`` the ``ca`` secret (pip
    behind a TLS-intercepting proxy). Arguments left None come from :func:`build_options`.
    No push: see :func:`push_image`."""
    engine = require_engine(engine)
    root = root or ROOT
    dockerfile = dockerfile_for(processor, root)
    plan = _plan(processor, registry, base_image, wheels_dir, ca_bundle, build_args, network, root)
    digest, tag = plan.content_hash, plan.tag
    start = time.monotonic()
    info = _inspect(engine, tag)

    def result(info: dict, skipped: bool) -> BuildResult:
        return BuildResult(
            processor=processor,
            engine=engine,
            image=tag,
            digest=_image_id(info),
            content_hash=digest,
            seconds=round(time.monotonic() - start, 3),
            skipped=skipped,
            build_inputs=plan.hashed,
        )

    if info is not None and _labels(info).get(CONTENT_LABEL) == digest:
        return result(info, skipped=True)
    argv = [*engine_command(engine), "build", "-f", str(dockerfile), "-t", tag]
    argv += ["--label", f"{CONTENT_LABEL}={digest}"]
    if engine == "podman":
        argv += ["--format", "docker"]  # OCI images drop HEALTHCHECK
    if plan.network:
        argv += ["--network", plan.network]
    for key, value in sorted(plan.args.items()):
        argv += ["--build-arg", f"{key}={value}"]
    if plan.wheels_dir is not None:
        argv += ["--build-context", f"wheels={plan.wheels_dir}"]
    if plan.ca_bundle is not None:
        argv += ["--secret", f"id=ca,src={plan.ca_bundle}"]
    env = settings.child_environment({"DOCKER_BUILDKIT": "1"}) if engine == "docker" else None
    _run([*argv, str(root)], f"{engine} build of {tag}", env=env)
    info = _inspect(engine, tag)
    if info is None:
        raise BuildError(f"{engine} build of {tag} finished, but the image is not there")
    return result(info, skipped=False)


# --------------------------------------------------------------------------------------- push


def ecr_region(registry: str) -> str | None:
    """The AWS region of an ECR registry host, or None for any other registry."""
    match = _ECR_HOST.match(registry.split("/", 1)[0])
    return match["region"] if match else None


def registry_login(registry: str, engine: str) -> bool:
    """Log ``engine`` in to an ECR registry with a token from boto3; other registries are left
    to the engine's own credentials (False)."""
    region = ecr_region(registry)
    if region is None:
        return False
    import boto3

    try:
        token = boto3.client("ecr", region_name=region).get_authorization_token()
        data = token["authorizationData"][0]
        user, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
    except Exception as exc:  # botocore's errors: no credentials, denied, unreachable
        raise BuildError(f"ECR login to {registry}: {exc}") from exc
    host = registry.split("/", 1)[0]
    _run(
        [*engine_command(engine), "login", "--username", user, "--password-stdin", host],
        f"{engine} login to {host}",
        input=password,
    )
    return True


def push_image(result: BuildResult, registry: str, engine: str | None = None) -> BuildResult:
    """Tag ``result.image`` under ``registry`` (same name and tag), push it, and return the
    result with the pushed tag and the registry's manifest digest."""
    engine = require_engine(engine or result.engine)
    registry = registry.rstrip("/")
    name = result.image.rsplit("/", 1)[-1]  # server-<processor>:<tag>
    target = f"{registry}/{name}"
    if target != result.image:
        _run([*engine_command(engine), "tag", result.image, target], f"{engine} tag {target}")
    registry_login(registry, engine)
    start = time.monotonic()
    argv = [*engine_command(engine), "push", target]
    digest_file = None
    if engine == "podman":
        digest_file = Path(tempfile.gettempdir()) / f"myriad-push-{os.getpid()}.digest"
        argv[-1:-1] = ["--digestfile", str(digest_file)]
    pushed = _run(argv, f"{engine} push {target}")
    digest = None
    if digest_file is not None and digest_file.is_file():
        digest = digest_file.read_text().strip()
        digest_file.unlink()
    if not digest:
        found = re.search(r"digest: (sha256:[0-9a-f]{64})", pushed.stdout + pushed.stderr)
        info = _inspect(engine, target) or {}
        repo_digests = [d for d in info.get("RepoDigests") or [] if d.startswith(registry)]
        digest = found[1] if found else (repo_digests[0].split("@", 1)[1] if repo_digests else "")
    if not digest:
        raise BuildError(f"{engine} push {target}: the registry's digest is not known")
    return msgspec.structs.replace(
        result,
        image=target,
        digest=digest,
        pushed=True,
        seconds=round(result.seconds + time.monotonic() - start, 3),
    )


# ------------------------------------------------------------------------------- base image


def ensure_base_image(
    tag: str = BASE_IMAGE_FOR_TESTS, engine: str | None = None, root: Path | None = None
) -> str:
    """Make the Debian bookworm base image ``tag`` (Python 3.11) with mmdebstrap when it is not
    there: for machines that cannot pull ``python:3.11-slim`` from a registry."""
    engine = require_engine(engine)
    if _inspect(engine, tag) is not None:
        return tag
    script = (root or ROOT) / "infra" / "images" / "make-base-image.sh"
    _run([str(script), tag, *engine_command(engine)], f"making base image {tag}")
    return tag
