"""Build: Dockerfiles lint clean, local builds record the environment, the server code imports
no pipeline packages, image tags follow the content, and (slow) the CPU image builds with
podman, runs on a read-only root as uid 10001 and answers predictions."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from packing.contracts import ModelSpec
from serving.build import images
from serving.build.tracing import TraceSettings, trace_to_store
from serving.settings import SettingsError, from_env
from serving.store import open_store
from tasks.build import BuildError, build_image, dockerfile_for, environment_digest
from tests import containers
from tests.containers import local_wheels, podman, server_container

ROOT = Path(__file__).resolve().parent.parent
HADOLINT = Path(sys.executable).parent / "hadolint"
PIPELINE_ONLY = ("prefect", "ortools", "typer", "rich", "matplotlib", "kubernetes", "aiohttp")
# typer and rich come in with huggingface-hub and litestar; these must stay out.
IN_NO_IMAGE = ("prefect", "ortools", "matplotlib", "kubernetes")


@pytest.mark.parametrize("processor", ["cpu", "gpu", "inf", "orchestrator"])
def test_dockerfiles_lint_clean(processor: str) -> None:
    result = subprocess.run(
        [
            str(HADOLINT),
            "--no-color",
            "--failure-threshold",
            "info",
            str(dockerfile_for(processor)),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_local_build_records_the_environment_digest() -> None:
    result = build_image.fn("cpu", "local")
    assert result["image"] is None
    assert result["digest"] == environment_digest()
    assert result["digest"].startswith("sha256:") and len(result["digest"]) == 71


def test_unknown_processor_has_no_dockerfile() -> None:
    with pytest.raises(BuildError, match="no Dockerfile for processor 'tpu'"):
        dockerfile_for("tpu")


def test_server_imports_no_pipeline_packages() -> None:
    """What `python -m serving` imports (server, app, both backends, store, argument parsing)
    leaves Prefect, OR-Tools, the CLI and plotting out: the `serve` extra is enough."""
    code = (
        "import sys\n"
        "import serving.http.server, serving.http.app, serving.store\n"
        "import serving.backends.torchscript, serving.backends.crossmodel\n"
        "from serving.http.server import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted(m for m in {PIPELINE_ONLY!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_serve_extra_excludes_pipeline_packages() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}

    serve = names(project["dependencies"]) | names(project["optional-dependencies"]["serve"])
    assert {"torch", "litestar", "uvicorn", "msgspec", "pyyaml", "prometheus-client"} <= serve
    assert not serve & {p.replace("_", "-") for p in PIPELINE_ONLY}
    assert "myriad[serve]" in project["optional-dependencies"]["all"]


# ------------------------------------------------------------------------------ content hash


def _checkout_copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("Dockerfiles", "packing", "serving", "tests"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", ".dockerignore", "Makefile"):
        shutil.copy2(ROOT / name, root / name)
    return root


def test_context_follows_the_ignore_file(tmp_path: Path) -> None:
    root = _checkout_copy(tmp_path)
    (root / "serving" / "__pycache__").mkdir(exist_ok=True)
    (root / "serving" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (root / ".venv").mkdir()
    (root / ".venv" / "big").write_bytes(b"\0")
    files = {p.as_posix() for p in images.context_files(root)}
    expected = {"pyproject.toml", "README.md", "serving/http/server.py", "packing/contracts.py"}
    assert expected <= files
    assert not {f for f in files if f.split("/")[0] not in ("packing", "serving")} - {
        "pyproject.toml",
        "README.md",
    }
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)


def test_tag_carries_version_and_content_hash(tmp_path: Path) -> None:
    root = _checkout_copy(tmp_path)
    digest = images.content_hash("cpu", root=root)
    tag = images.image_tag("cpu", root=root)
    assert tag == f"myriad/server-cpu:{images.project_version()}-{digest[:12]}"
    assert images.image_tag("cpu", "registry.example:5000/team", root=root).startswith(
        "registry.example:5000/team/server-cpu:"
    )
    # Files outside the context and caches leave the hash alone.
    (root / "tests" / "test_build.py").write_text("# changed\n")
    (root / "Makefile").write_text("# changed\n")
    assert images.content_hash("cpu", root=root) == digest
    # A served file, the Dockerfile, a build argument or the processor change it.
    server = root / "serving" / "http" / "server.py"
    server.write_text(server.read_text() + "\n# changed\n")
    changed = images.content_hash("cpu", root=root)
    assert changed != digest
    assert images.image_tag("cpu", root=root) != tag
    assert images.content_hash("cpu", {"BASE_IMAGE": "x"}, root=root) != changed
    assert images.content_hash("gpu", root=root) != changed
    dockerfile = root / "Dockerfiles" / "cpu.Dockerfile"
    dockerfile.write_text(dockerfile.read_text() + "\n# changed\n")
    assert images.content_hash("cpu", root=root) != changed


def test_local_torch_wheel_sets_the_build_arguments(tmp_path: Path) -> None:
    (tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    assert images.local_torch_args("cpu", tmp_path) == {
        "TORCH_VERSION": "2.13.0+cpu",
        "TORCH_INDEX_URL": images.DEFAULT_INDEX_URL,
    }
    assert images.local_torch_args("gpu", tmp_path) == {}
    assert images.local_torch_args("cpu", tmp_path / "missing") == {}


def test_options_from_the_environment() -> None:
    env = {
        "MYRIAD_BASE_IMAGE": "localhost/base:1",
        "MYRIAD_BUILD_NETWORK": "host",
        "MYRIAD_BUILD_ARGS": "A=1 B=x=y",
    }
    build = from_env(env, cwd=Path("/nonexistent")).build
    assert images.build_options(build) == {
        "base_image": "localhost/base:1",
        "network": "host",
        "build_args": {"A": "1", "B": "x=y"},
    }
    with pytest.raises(SettingsError, match="KEY=VALUE"):
        from_env({"MYRIAD_BUILD_ARGS": "oops"})


def test_ecr_hosts_are_recognised() -> None:
    assert images.ecr_region("123456789012.dkr.ecr.eu-west-1.amazonaws.com/myriad") == "eu-west-1"
    assert images.ecr_region("123456789012.dkr.ecr.us-east-1.amazonaws.com") == "us-east-1"
    assert images.ecr_region("ghcr.io/acme") is None
    assert images.ecr_region("localhost:5000") is None


def test_podman_runs_with_runc_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert images.engine_command("docker") == ["docker"]
    monkeypatch.setenv("MYRIAD_PODMAN_RUNTIME", "")
    assert images.engine_command("podman") == ["podman"]
    monkeypatch.setenv("MYRIAD_PODMAN_RUNTIME", "crun")
    assert images.engine_command("podman") == ["podman", "--runtime", "crun"]


def test_without_an_engine_the_build_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # neither docker nor podman on PATH
    monkeypatch.setattr(images, "_ANSWERED", set())
    assert images.container_engine() is None
    with pytest.raises(images.NoEngine, match="no docker or podman engine answers"):
        images.build_image("cpu")
    with caplog.at_level("WARNING", logger="myriad.build"):
        result = build_image.fn("cpu", "docker")
    assert result["image"] is None and result["digest"] is None
    assert "no docker or podman engine answers: image for cpu not built" in caplog.text


def test_container_fixtures_fail_naming_the_missing_packages(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(containers, "SBIN", tmp_path)
    with pytest.raises(pytest.fail.Exception) as failed:
        containers.ensure_podman()
    message = str(failed.value)
    assert "\n" not in message
    assert "container tests need podman runc mmdebstrap" in message
    assert "apt-get install -y podman runc mmdebstrap" in message


# --------------------------------------------------------------------- the image, for real


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store_dir = tmp_path_factory.mktemp("image-store") / "store"
    trace_to_store(
        ModelSpec(id="tiny", source="synthetic:bert-tiny", max_length=32),
        "cpu",
        open_store(f"file://{store_dir}"),
        TraceSettings(profile_batch_sizes=(1,), profile_repeats=1),
    )
    return store_dir


@pytest.mark.slow
def test_image_builds_and_records_its_digest(cpu_build: images.BuildResult) -> None:
    assert cpu_build.engine == "podman"
    assert cpu_build.image == images.image_tag(
        "cpu",
        base_image=images.BASE_IMAGE_FOR_TESTS,
        wheels_dir=local_wheels(),
    )
    info = json.loads(podman("image", "inspect", cpu_build.image).stdout)[0]
    assert cpu_build.digest == f"sha256:{info['Id'].removeprefix('sha256:')}"
    labels = (info.get("Config") or {}).get("Labels") or info.get("Labels") or {}
    assert labels[images.CONTENT_LABEL] == cpu_build.content_hash
    config = info.get("Config") or {}
    assert config.get("User") == "10001:10001"
    healthcheck = info.get("Healthcheck") or config.get("Healthcheck") or {}
    assert "/v2/health/ready" in " ".join(healthcheck.get("Test", [])), "HEALTHCHECK dropped"
    assert info["Size"] < 2_500_000_000


@pytest.mark.slow
def test_second_build_is_skipped(cpu_build: images.BuildResult) -> None:
    from tests.containers import build_server_image

    start = time.monotonic()
    again = build_server_image("cpu")
    assert again.skipped and again.image == cpu_build.image and again.digest == cpu_build.digest
    assert time.monotonic() - start < 30


@pytest.mark.slow
def test_image_holds_no_pipeline_packages(cpu_image: str) -> None:
    check = (
        "import importlib.util, sys; "
        f"found = [m for m in {IN_NO_IMAGE!r} if importlib.util.find_spec(m)]; "
        "print(found); sys.exit(bool(found))"
    )
    result = podman("run", "--rm", "--entrypoint", "python", cpu_image, "-c", check, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_read_only_container_serves_predictions(cpu_image: str, tiny_store: Path) -> None:
    with server_container(cpu_image, tiny_store, ["--models", "tiny"]) as (url, name):
        assert httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200
        answer = httpx.post(f"{url}/predictions/tiny", json={"text": "hello"}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()
        # The server's user, a read-only root, a writable cache and /tmp.
        assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
        assert podman("exec", name, "touch", "/x", check=False).returncode != 0
        assert podman("exec", name, "touch", "/var/lib/myriad/x", "/tmp/x").returncode == 0
        # The image's HEALTHCHECK answers once the models are loaded.
        assert podman("healthcheck", "run", name, check=False).returncode == 0


@pytest.mark.slow
def test_build_task_builds_the_image(
    cpu_build: images.BuildResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline's task, set up by the environment as the fixture is, finds the image."""
    for key, value in containers.build_env().items():
        monkeypatch.setenv(key, value)
    result = build_image.fn("cpu", "docker")
    assert result["image"] == images.image_tag(
        "cpu", base_image=images.BASE_IMAGE_FOR_TESTS, wheels_dir=local_wheels()
    )
    assert result["digest"] == images.image_id(result["image"], "podman")
    assert result["pushed"] is False and len(result["content_hash"]) == 64
