"""Container helpers for tests: a configured podman, the local base image, the CPU server image
built once per session (``cpu_image``, ``cpu_build``), and a server container on a loopback
port, and a rendered Kubernetes Secret as a podman secret (``podman_secret``).

No registry answers here, so the image builds from a Debian base made with mmdebstrap, takes
torch from the machine's wheel directory and reaches PyPI with the machine's CA bundle. Without
podman the fixtures fail, naming the packages to install (``make system`` installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.build import images
from serving.runtimes.local import free_port

PACKAGES = ("podman", "runc", "mmdebstrap")
CONTAINERS_CONF = Path("/etc/containers/containers.conf")
ENGINE = "podman"
SBIN = Path("/usr/sbin")  # runc lives here, off a non-root PATH


def ensure_podman() -> list[str]:
    """The podman argv prefix, after checking the packages and the containers.conf setting
    (``default_ulimits = []``: crun and runc cannot set rlimits in some VMs)."""
    missing = [p for p in PACKAGES if shutil.which(p) is None and not (SBIN / p).exists()]
    if missing:
        pytest.fail(
            f"container tests need {' '.join(missing)}: apt-get install -y {' '.join(PACKAGES)}"
            " (or `make system`)",
            pytrace=False,
        )
    conf = CONTAINERS_CONF if os.geteuid() == 0 else Path.home() / ".config/containers"
    if conf.is_dir():
        conf = conf / "containers.conf"
    text = conf.read_text() if conf.is_file() else ""
    if "default_ulimits" not in text:
        conf.parent.mkdir(parents=True, exist_ok=True)
        if "[containers]" in text:
            text = text.replace("[containers]", "[containers]\ndefault_ulimits = []", 1)
        else:
            text += "\n[containers]\ndefault_ulimits = []\n"
        conf.write_text(text)
    return images.engine_command(ENGINE)


def local_wheels() -> Path | None:
    for candidate in (*os.environ.get("PIP_FIND_LINKS", "").split(), "/opt/wheels"):
        path = Path(candidate)
        if path.is_dir() and any(path.glob("torch-*+cpu-*.whl")):
            return path
    return None


def ca_bundle() -> Path | None:
    for candidate in (
        os.environ.get("PIP_CERT"),
        os.environ.get("SSL_CERT_FILE"),
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def build_env() -> dict[str, str]:
    """Environment that makes ``serving.build.images.build_image`` (and so the pipeline's
    build task and ``myriad build``) build as the fixtures do on this machine."""
    env = {
        "MYRIAD_CONTAINER_ENGINE": ENGINE,
        "MYRIAD_BASE_IMAGE": images.BASE_IMAGE_FOR_TESTS,
        "MYRIAD_BUILD_NETWORK": "host",
    }
    if (wheels := local_wheels()) is not None:
        env["MYRIAD_WHEELS_DIR"] = str(wheels)
    if (bundle := ca_bundle()) is not None:
        env["MYRIAD_CA_BUNDLE"] = str(bundle)
    return env


def build_server_image(processor: str = "cpu") -> images.BuildResult:
    """The server image of ``processor`` for this machine: local base, local torch wheel, the
    machine's CA bundle, host networking for pip."""
    ensure_podman()
    base = images.ensure_base_image(engine=ENGINE)
    try:
        return images.build_image(
            processor,
            base_image=base,
            wheels_dir=local_wheels(),
            ca_bundle=ca_bundle(),
            engine=ENGINE,
            network="host",
        )
    except images.BuildError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def cpu_build() -> images.BuildResult:
    return build_server_image("cpu")


@pytest.fixture(scope="session")
def cpu_image(cpu_build: images.BuildResult) -> str:
    """The tag of the CPU server image, built once per session."""
    return cpu_build.image


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*images.engine_command(ENGINE), *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
    )


def readable(path: Path) -> Path:
    """Let the server's uid (10001) read a store made by this process (temp files are 0600)."""
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(Path(root, name), 0o755)
        for name in files:
            os.chmod(Path(root, name), 0o644)
    os.chmod(path, 0o755)
    return path


@contextmanager
def server_container(
    image: str,
    store_dir: Path,
    server_args: list[str],
    ready_timeout_s: float = 180,
    extra: list[str] | None = None,
) -> Iterator[tuple[str, str]]:
    """A server container on a read-only root (tmpfs /tmp, and /var/lib/myriad owned by the
    server's user: a bare ``--tmpfs`` is root's), the file store
    ``store_dir`` mounted read-only at /store; yields (base URL, container name) once
    ``/v2/health/ready`` answers 200, and removes the container after."""
    name = f"myriad-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    podman(
        "run",
        "-d",
        "--name",
        name,
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/var/lib/myriad:U",
        "-v",
        f"{readable(store_dir)}:/store:ro",
        "-e",
        "MYRIAD_STORE=file:///store",
        "-p",
        f"127.0.0.1:{port}:8080",
        *(extra or []),
        image,
        *server_args,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            state = podman("inspect", "--format", "{{.State.Status}}", name, check=False)
            if state.stdout.strip() not in ("running", "created", "configured"):
                logs = podman("logs", name, check=False)
                raise AssertionError(f"{name} stopped: {(logs.stdout + logs.stderr)[-2000:]}")
            if time.monotonic() > deadline:
                logs = podman("logs", name, check=False)
                raise AssertionError(f"{name} not ready: {(logs.stdout + logs.stderr)[-2000:]}")
            time.sleep(0.5)
        yield url, name
    finally:
        podman("rm", "-f", "-t", "2", name, check=False)


@contextmanager
def podman_secret(secret: Mapping[str, Any]) -> Iterator[str]:
    """A rendered Kubernetes Secret as the podman secret of the same name, which ``podman kube
    play`` resolves a container's ``envFrom: secretRef`` against; removed after. podman 4.3
    reads such a secret as a JSON object of base64 values (the Secret's ``data``); the Secret
    it makes itself from a played ``kind: Secret`` document it cannot read back."""
    name = secret["metadata"]["name"]
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        json.dump(dict(secret["data"]), file)
        file.flush()
        podman("secret", "create", name, file.name)
    try:
        yield name
    finally:
        podman("secret", "rm", name, check=False)


if __name__ == "__main__":
    # `eval "$(python -m tests.containers --exports)"`: this machine's build settings for a
    # shell (the README's container block runs with them), after making the base image.
    import shlex
    import sys

    if sys.argv[1:] != ["--exports"]:
        sys.exit("usage: python -m tests.containers --exports")
    ensure_podman()
    images.ensure_base_image(engine=ENGINE)
    for key, value in build_env().items():
        print(f"export {key}={shlex.quote(value)}")
