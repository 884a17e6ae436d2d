"""The settings object: the one reader of the environment, a project file under it, and no
module of the domain packages reading either when it is imported."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from serving.settings import SettingsError, from_env

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("packing", "serving", "loadtest", "tasks", "flows")
ENV_READ = re.compile(r"\bos\.environ\b|\bos\.getenv\b|\bgetenv\(|\benviron\.get\(")


def test_no_environment_read_outside_the_settings_module() -> None:
    offenders = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "serving" / "settings.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if ENV_READ.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_domain_modules_read_no_settings_when_imported() -> None:
    """Import every module of the domain packages with the settings module made to fail: none
    may ask for settings (or the environment) at import time."""
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for package in ("packing", "serving", "loadtest", "tasks")
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__main__.py"
    )
    script = (
        "import serving.settings as s\n"
        "def refuse(*a, **k):\n"
        "    raise AssertionError('settings read at import time')\n"
        "s.current = s.from_env = refuse\n"
        "import importlib\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name.removesuffix('.__init__'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_project_file_under_the_environment(tmp_path: Path) -> None:
    (tmp_path / "myriad.toml").write_text(
        '[store]\nuri = "s3://from-file/prefix"\n[build]\nbase_image = "localhost/base:1"\n'
        "[trace]\nworkers = 4\n"
    )
    settings = from_env({}, cwd=tmp_path)
    assert settings.store_uri == "s3://from-file/prefix"
    assert settings.build.base_image == "localhost/base:1"
    assert settings.trace.workers == 4
    assert settings.data_dir == (tmp_path / ".myriad").resolve()
    assert settings.source == str(tmp_path / "myriad.toml")
    overridden = from_env(
        {"MYRIAD_STORE": "file:///elsewhere", "MYRIAD_HOME": str(tmp_path / "h")}, cwd=tmp_path
    )
    assert overridden.store_uri == "file:///elsewhere"
    assert overridden.data_dir == tmp_path / "h"
    assert overridden.build.base_image == "localhost/base:1"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[store\n", {}, "myriad.toml"),
        ('[stor]\nuri = "x"\n', {}, "stor"),
        ("", {"MYRIAD_TRACE_WORKERS": "two"}, "MYRIAD_TRACE_WORKERS='two': expected a whole"),
    ],
)
def test_bad_settings_name_what_is_wrong(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    (tmp_path / "myriad.toml").write_text(text)
    with pytest.raises(SettingsError, match=re.escape(message)):
        from_env(env, cwd=tmp_path)


def test_a_bad_setting_is_one_line_at_the_cli(tmp_path: Path) -> None:
    import os

    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "status"],
        cwd=ROOT,
        env={**os.environ, "MYRIAD_HOME": str(tmp_path), "MYRIAD_TRACE_WORKERS": "two"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "MYRIAD_TRACE_WORKERS='two'" in result.stderr
    assert "Traceback" not in result.stderr


def test_deploy_options_take_what_was_left_out_from_the_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from serving.runtimes.base import deploy_options

    monkeypatch.setenv("MYRIAD_STORE", "s3://from-env/prefix")
    monkeypatch.setenv("MYRIAD_SERVER_ROLE_ARN", "arn:aws:iam::123456789012:role/servers")
    monkeypatch.setenv("MYRIAD_REGISTRY", "registry.example/myriad")
    options = deploy_options("myriad", role_arn=None, store_secret=None)
    assert options.store_uri == "s3://from-env/prefix"
    assert options.role_arn == "arn:aws:iam::123456789012:role/servers"
    assert options.registry == "registry.example/myriad"
    # What the caller gives wins, and a Secret given keeps the settings' role out.
    given = deploy_options("myriad", "s3://given/p", store_secret="creds")
    assert given.store_uri == "s3://given/p"
    assert given.store_secret == "creds" and given.role_arn is None
