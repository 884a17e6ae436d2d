"""Deploy the servers of a plan. ``local``: one process per plan server on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgspec
from prefect import task
from prefect.cache_policies import NO_CACHE

from packing.contracts import Plan
from packing.io import load, save, write_atomic
from serving.client import Deployment
from tasks.paths import deployments_dir

RUNTIMES = ("local", "docker", "kubernetes")


class DeployError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deployment_path(name: str) -> Path:
    return deployments_dir() / f"{name}.json"


def read_deployment(name: str) -> Deployment:
    path = deployment_path(name)
    if not path.is_file():
        raise DeployError(f"no deployment named {name!r} ({path} does not exist)")
    return load(path, Deployment)


def deploy_local(
    plan: Plan,
    plan_path: Path,
    store_uri: str | None,
    name: str = "local",
    ready_timeout_s: float = 300.0,
    threads: int = 1,
    engine: str | None = None,
) -> Deployment:
    """Start every server of ``plan``; return once each reports all its models loaded.
    ``engine``: run each server's models on the cross-model engine at this precision."""
    if deployment_path(name).exists():
        teardown_local(name)
    log_dir = deployments_dir() / name
    log_dir.mkdir(parents=True, exist_ok=True)
    processes: dict[str, subprocess.Popen] = {}
    urls: dict[str, str] = {}
    try:
        for server in plan.servers:
            port = free_port()
            command = [
                sys.executable,
                "-m",
                "serving",
                "--plan",
                str(plan_path),
                "--server",
                server.id,
                "--port",
                str(port),
                "--threads",
                str(threads),
            ]
            if store_uri:
                command += ["--store", store_uri]
            if engine:
                command += engine_arguments(engine)
            log = (log_dir / f"{server.id}.log").open("wb")
            # A session of its own, so a Ctrl-C in the pipeline's terminal does not skip teardown.
            processes[server.id] = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            urls[server.id] = f"http://127.0.0.1:{port}"
        deployment = Deployment(
            name=name,
            plan_id=plan.plan_id,
            runtime="local",
            servers=urls,
            pids={sid: p.pid for sid, p in processes.items()},
        )
        write_atomic(deployment_path(name), msgspec.json.encode(deployment))
        _wait_ready(processes, urls, log_dir, ready_timeout_s)
    except BaseException:
        for process in processes.values():
            _stop(process.pid)
        deployment_path(name).unlink(missing_ok=True)
        raise
    return deployment


def _wait_ready(
    processes: dict[str, subprocess.Popen], urls: dict[str, str], log_dir: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    pending = set(processes)
    with httpx.Client(timeout=2.0) as http:
        while pending:
            for server_id in sorted(pending):
                process = processes[server_id]
                if process.poll() is not None:
                    raise DeployError(
                        f"server {server_id} exited with code {process.returncode}:\n"
                        + _tail(log_dir / f"{server_id}.log")
                    )
                try:
                    response = http.get(f"{urls[server_id]}/v2/health/ready")
                except httpx.TransportError:
                    continue
                if response.status_code == 200:
                    pending.discard(server_id)
                elif response.json().get("failed"):
                    models = http.get(f"{urls[server_id]}/models").json()["models"]
                    reasons = "; ".join(
                        f"{m['id']}: {m['reason']}" for m in models if m["state"] == "failed"
                    )
                    raise DeployError(f"server {server_id} failed to load models: {reasons}")
            if pending and time.monotonic() > deadline:
                raise DeployError(f"servers not ready after {timeout_s:.0f} s: {sorted(pending)}")
            if pending:
                time.sleep(0.2)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _is_our_server(pid: int) -> bool:
    # A pid from an old deployment file may since belong to another program.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"serving" in cmdline


def _stop(pid: int, grace_s: float = 10.0) -> None:
    if not _is_our_server(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            finished = 0 if _alive(pid) else pid
        if finished == pid or not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def teardown_local(name: str = "local") -> list[str]:
    """Stop the servers of deployment ``name``; returns the server ids it stopped."""
    deployment = read_deployment(name)
    for pid in deployment.pids.values():
        _stop(pid)
    deployment_path(name).unlink(missing_ok=True)
    return sorted(deployment.pids)


def engine_arguments(engine: str) -> list[str]:
    if engine not in ("fp32", "bf16", "fp16", "int8"):
        raise DeployError(f"engine precision {engine!r}: choose fp32, bf16, fp16 or int8")
    if engine == "int8":
        return ["--engine", "cross-model", "--precision", "bf16", "--int8"]
    return ["--engine", "cross-model", "--precision", engine]


def deploy(
    plan_path: Path,
    store_uri: str | None,
    runtime: str = "local",
    name: str = "local",
    engine: str | None = None,
) -> Deployment:
    if runtime not in RUNTIMES:
        raise DeployError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime != "local":
        raise DeployError(
            f"runtime {runtime!r} is not available in this version: only 'local' deploys today "
            "(docker and kubernetes runtimes are planned work)"
        )
    return deploy_local(load(plan_path, Plan), plan_path, store_uri, name, engine=engine)


@task(name="deploy-servers", cache_policy=NO_CACHE)
def deploy_servers(
    plan_json: str, store_uri: str | None, runtime: str, name: str, engine: str | None = None
) -> dict:
    plan = msgspec.json.decode(plan_json, type=Plan)
    plan_path = deployments_dir() / f"{name}.plan.json"
    save(plan, plan_path)
    return msgspec.to_builtins(deploy(plan_path, store_uri, runtime, name, engine))


@task(name="teardown-servers", cache_policy=NO_CACHE)
def teardown_servers(name: str) -> list[str]:
    return teardown_local(name)
