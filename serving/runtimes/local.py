"""The local runtime (the embedded default): each plan server is a process on a 127.0.0.1
port, under a supervisor that restarts it if it dies. Each answers KServe v2 over gRPC too, on
a second port (:meth:`LocalRuntime.grpc_target`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from packing.contracts import PlannedServer
from serving import settings
from serving.deployments import deployments_dir
from serving.runtimes.base import DeployOptions, HostRuntime, server_arguments


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def _is_our_supervisor(pid: int) -> bool:
    # A pid from an old deployment file may since belong to another program.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"serving.runtimes.supervise" in cmdline


def stop_process(pid: int, grace_s: float = 40.0) -> None:
    """SIGTERM the supervisor (it stops its server gracefully), SIGKILL after ``grace_s``."""
    if not _is_our_supervisor(pid):
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
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError, PermissionError):
        pass


def _grpc_port(server_args: list[str]) -> int | None:
    """The gRPC port the deployment's own server flags set, if they do."""
    for index, arg in enumerate(server_args):
        if arg == "--grpc-port" and index + 1 < len(server_args):
            return int(server_args[index + 1])
        if arg.startswith("--grpc-port="):
            return int(arg.split("=", 1)[1])
    return None


class LocalRuntime(HostRuntime):
    name = "local"

    def __init__(self, log_dir: Path | None = None) -> None:
        """``log_dir``: where each server's log goes (default: the deployment's own folder)."""
        self.log_dir = log_dir
        self._logs: dict[str, Path] = {}
        self._grpc_ports: dict[str, int] = {}

    def log_file(self, handle: str) -> Path:
        return self._logs[handle].with_suffix(".log")

    def grpc_target(self, handle: str) -> str:
        """Where the server started as ``handle`` answers gRPC (``host:port``, what gRPC
        clients take), as long as this runtime object lives: the deployment record holds the
        HTTP URLs only."""
        return f"127.0.0.1:{self._grpc_ports[handle]}"

    def start_server(
        self, server: PlannedServer, plan_file: Path, options: DeployOptions
    ) -> tuple[str, str]:
        port = free_port()
        log_dir = self.log_dir or deployments_dir() / options.name
        log_dir.mkdir(parents=True, exist_ok=True)
        # One log and status file per start: a redeploy may run the same server id again.
        stem = f"{server.id}-{port}"
        status = log_dir / f"{stem}.status.json"
        status.unlink(missing_ok=True)
        grpc_port = _grpc_port(options.server_args)
        command = [
            sys.executable,
            "-m",
            "serving",
            *server_arguments(server.id, str(plan_file), port, options),
        ]
        if grpc_port is None:
            grpc_port = free_port()
            command += ["--grpc-port", str(grpc_port)]
        if options.store_uri:
            command += ["--store", options.store_uri]
        log = (log_dir / f"{stem}.log").open("ab")
        supervisor = [sys.executable, "-m", "serving.runtimes.supervise", "--status", str(status)]
        # A session of its own, so a Ctrl-C in the pipeline's terminal does not skip teardown.
        process = subprocess.Popen(
            [*supervisor, "--", *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=settings.child_environment(options.env),
            start_new_session=True,
        )
        log.close()
        handle = str(process.pid)
        self._logs[handle] = log_dir / stem
        self._grpc_ports[handle] = grpc_port
        return f"http://127.0.0.1:{port}", handle

    def exit_reason(self, handle: str) -> str | None:
        stem = self._logs.get(handle)
        if stem is None:
            return None
        log = stem.with_suffix(".log")
        if not _alive(int(handle)):
            return f"its supervisor is gone:\n{_tail(log)}"
        status = stem.with_suffix(".status.json")
        if status.is_file():
            exits = json.loads(status.read_text())["exits"]
            return f"code {exits[-1]['code']} while loading:\n{_tail(log)}"
        return None

    def stop_server(self, handle: str) -> None:
        stop_process(int(handle))
