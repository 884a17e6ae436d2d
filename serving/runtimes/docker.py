"""The Docker runtime: one container per plan server from its processor's image, with docker
or podman (whichever answers). Ports (HTTP, and gRPC: :meth:`DockerRuntime.grpc_target`) are
published on loopback; the engine's restart policy brings back a server that dies."""

from __future__ import annotations

import subprocess
from pathlib import Path

from packing.contracts import PlannedServer
from serving.deployments import DeployError
from serving.grpc import GRPC_PORT
from serving.runtimes.base import (
    SERVER_PORT,
    DeployOptions,
    HostRuntime,
    image_for,
    server_arguments,
)
from serving.runtimes.local import free_port
from serving.store import FileStore, open_store

LABEL = "io.myriad.deployment"
PLAN_IN_CONTAINER = "/etc/myriad/plan.json"
STORE_IN_CONTAINER = "/store"
# What the server needs to reach an S3 store: the standard AWS variables, passed through.
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


def container_name(deployment: str, server_id: str, port: int) -> str:
    # The port keeps names unique when a redeploy starts a server id that is still running.
    return f"myriad-{deployment}-{server_id}-{port}"


class DockerRuntime(HostRuntime):
    name = "docker"

    def __init__(self, engine: list[str] | None = None) -> None:
        from serving.build.images import container_engine, engine_command

        if engine is None:
            found = container_engine()
            if found is None:
                raise DeployError(
                    "runtime 'docker' needs a container engine, but neither docker nor podman "
                    "answers (install one, or deploy with --runtime local)"
                )
            engine = engine_command(found)
        self.engine = engine
        self._grpc_ports: dict[str, int] = {}

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([*self.engine, *args], capture_output=True, text=True)
        if check and result.returncode != 0:
            raise DeployError(
                f"{' '.join(self.engine)} {args[0]} failed: {result.stderr.strip()[-2000:]}"
            )
        return result

    def start_server(
        self, server: PlannedServer, plan_file: Path, options: DeployOptions
    ) -> tuple[str, str]:
        image = image_for(server.processor, options)
        if self._run("image", "inspect", image, check=False).returncode != 0:
            raise DeployError(
                f"server {server.id}: image {image} is not built here; run "
                f"`myriad build --processor {server.processor}` first"
            )
        port = free_port()
        grpc_port = free_port()
        name = container_name(options.name, server.id, port)
        argv = [
            "run", "--detach", "--name", name,
            "--label", f"{LABEL}={options.name}",
            "--label", f"io.myriad.server={server.id}",
            "--restart", "on-failure",
            "--read-only", *self._scratch("/tmp"), *self._scratch("/var/lib/myriad"),
            "--publish", f"127.0.0.1:{port}:{SERVER_PORT}",
            "--publish", f"127.0.0.1:{grpc_port}:{GRPC_PORT}",
            "--volume", f"{plan_file}:{PLAN_IN_CONTAINER}:ro",
        ]  # fmt: skip
        store = open_store(options.store_uri)
        if isinstance(store, FileStore):
            # The servers only read the store: mounted read-only.
            argv += ["--volume", f"{store.root}:{STORE_IN_CONTAINER}:ro"]
            store_uri = f"file://{STORE_IN_CONTAINER}"
        else:
            store_uri = store.uri
            argv += [f"--env={var}" for var in AWS_VARIABLES]
        argv += ["--env", f"MYRIAD_STORE={store_uri}"]
        argv += [f"--env={key}={value}" for key, value in sorted(options.env.items())]
        argv += self._device_arguments(server)
        argv += [image]
        argv += server_arguments(server.id, PLAN_IN_CONTAINER, SERVER_PORT, options, "0.0.0.0")
        argv += ["--grpc-port", str(GRPC_PORT)]  # last: the port published above
        self._run(*argv)
        self._grpc_ports[name] = grpc_port
        return f"http://127.0.0.1:{port}", name

    def grpc_target(self, handle: str) -> str:
        """Where the container ``handle`` answers gRPC (``host:port``), as long as this runtime
        object lives: the deployment record holds the HTTP URLs only."""
        return f"127.0.0.1:{self._grpc_ports[handle]}"

    def _scratch(self, path: str) -> list[str]:
        """A tmpfs the server's user (uid 10001) can write: podman's ``U`` chowns it to the
        container user, docker's mode 1777 opens it (a plain tmpfs is root's, 0755)."""
        if "podman" in self.engine[0]:
            return ["--tmpfs", f"{path}:U"]
        return ["--mount", f"type=tmpfs,destination={path},tmpfs-mode=1777"]

    def _device_arguments(self, server: PlannedServer) -> list[str]:
        if server.processor == "gpu":
            if "podman" in self.engine[0]:
                return ["--device", f"nvidia.com/gpu={server.device}"]  # CDI
            return ["--gpus", f"device={server.device}"]
        if server.processor == "inf":
            return ["--device", f"/dev/neuron{server.device}"]
        return []

    def exit_reason(self, handle: str) -> str | None:
        state = self._run(
            "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}",
            handle, check=False,
        )  # fmt: skip
        if state.returncode != 0:
            return f"container {handle} is gone"
        status, code, restarts = (state.stdout.split() + ["", "", "0"])[:3]
        if status in ("exited", "dead") or (restarts.isdigit() and int(restarts) > 0):
            logs = self._run("logs", "--tail", "20", handle, check=False)
            return f"container {handle} {status} (code {code}):\n{logs.stdout}{logs.stderr}"
        return None

    def stop_server(self, handle: str) -> None:
        # stop: SIGTERM, in-flight requests finish; then the container is removed.
        self._run("stop", "--time", "30", handle, check=False)
        self._run("rm", "--force", handle, check=False)

    def containers(self, deployment: str) -> list[str]:
        """Every container this runtime made for ``deployment`` (by label), running or not."""
        listing = self._run(
            "ps", "--all", "--filter", f"label={LABEL}={deployment}", "--format", "{{.Names}}"
        )
        return sorted(line for line in listing.stdout.split() if line)
