"""What every runtime shares: the deployment record, its file, server fingerprints and the
readiness wait. A runtime (local processes, containers, Kubernetes) implements ``Runtime``."""

from __future__ import annotations

import abc
import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec

from packing.contracts import ENGINE_PRECISIONS, Plan, PlannedServer
from packing.io import write_atomic
from serving import settings
from serving.deployments import (
    DeployError,
    Deployment,
    deployment_path,
    deployments_dir,
    forget_deployment,
    read_deployment,
    write_deployment,
)
from serving.store import (
    ArtifactStore,
    open_store,
)

SERVER_PORT = 8080


class DeployOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How to run a plan's servers; the same options for every runtime."""

    name: str = "local"
    store_uri: str | None = None
    # Cross-model engine precision (fp32, bf16, fp16, int8); None: one TorchScript module per model.
    engine: str | None = None
    threads: int = 1
    ready_timeout_s: float = 300.0
    # Container runtimes: image per processor (default: the tag `myriad build` gives it).
    images: dict[str, str] = {}
    # Registry of the default images (`myriad build --push REGISTRY`'s tags).
    registry: str | None = None
    # Kubernetes: namespace (default: myriad-<deployment name>).
    namespace: str | None = None
    # Extra `python -m serving` flags for every server (batching, queue, deadline) and extra
    # environment (MYRIAD_ADMIN_TOKEN, MYRIAD_LOG_LEVEL).
    server_args: list[str] = []
    env: dict[str, str] = {}
    # Kubernetes: how the servers read an s3:// store (infra/k8s/README.md, "Store access").
    # An IAM role for the servers' ServiceAccount (EKS IRSA: eks.amazonaws.com/role-arn).
    role_arn: str | None = None
    # A Secret whose keys become the servers' environment (envFrom): AWS_ACCESS_KEY_ID,
    # AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL for an S3-compatible store.
    store_secret: str | None = None
    # Values to render into that Secret (default name myriad-store-credentials); without them
    # the Secret named by store_secret must exist in the namespace.
    store_credentials: dict[str, str] = {}


def deploy_options(
    name: str,
    store_uri: str | None = None,
    engine: str | None = None,
    images: dict[str, str] | None = None,
    registry: str | None = None,
    **fields: object,
) -> DeployOptions:
    """DeployOptions with what the caller left out taken from the settings: the store, the
    registry, and a Kubernetes server role or store Secret (so a flow run whose job has
    ``MYRIAD_STORE`` deploys servers that read that store)."""
    current = settings.current()
    if not fields.get("role_arn") and not fields.get("store_secret"):
        fields["role_arn"] = current.kubernetes.server_role_arn
        fields["store_secret"] = current.kubernetes.store_secret
    return DeployOptions(
        name=name,
        store_uri=store_uri or current.store.uri,
        engine=engine,
        images=images or {},
        registry=registry or current.build.registry,
        **fields,
    )


class ServerStatus(msgspec.Struct, kw_only=True):
    server_id: str
    url: str
    # ready | loading | failed | down
    state: str
    detail: str = ""


class RedeployResult(msgspec.Struct, kw_only=True):
    deployment: Deployment
    kept: list[str]  # server ids of the new plan whose running server was kept
    started: list[str]  # server ids of the new plan started afresh
    stopped: list[str]  # server ids of the old plan stopped


def engine_arguments(engine: str | None) -> list[str]:
    """The server flags for the cross-model engine at ``engine`` precision (none for None)."""
    if engine is None:
        return []
    if engine not in ENGINE_PRECISIONS:
        raise DeployError(
            f"engine precision {engine!r}: choose {', '.join(ENGINE_PRECISIONS[:-1])} or int8"
        )
    if engine == "int8":
        return ["--backend", "cross-model", "--precision", "bf16", "--int8"]
    return ["--backend", "cross-model", "--precision", engine]


def server_arguments(
    server_id: str, plan_file: str, port: int, options: DeployOptions, host: str = "127.0.0.1"
) -> list[str]:
    """``python -m serving`` arguments for one plan server: the same in every runtime."""
    argv = ["--plan", plan_file, "--server", server_id, "--host", host, "--port", str(port)]
    argv += ["--threads", str(options.threads)]
    return argv + engine_arguments(options.engine) + options.server_args


def image_for(processor: str, options: DeployOptions) -> str:
    """The server image of ``processor``: ``options.images``, else what the last ``myriad
    build`` of this checkout recorded (pinned by digest once pushed), else the tag a build with
    the current settings would give (under ``options.registry``)."""
    from serving.build.images import image_tag
    from serving.build.record import recorded_image

    return (
        options.images.get(processor)
        or recorded_image(processor, options.registry)
        or image_tag(processor, options.registry)
    )


def server_fingerprint(
    server: PlannedServer, store: ArtifactStore | None, engine: str | None
) -> str:
    """Content hash of what a server runs: its processor, engine, model ids and the manifest of
    each model's artifact. Two servers with one fingerprint are interchangeable, so a redeploy
    keeps them running."""
    from serving.store import artifact_prefix

    digest = hashlib.sha256(f"{server.processor}\n{engine}\n".encode())
    for model_id in sorted(server.model_ids):
        digest.update(model_id.encode() + b"\n")
        key = f"{artifact_prefix(model_id, server.processor)}/manifest.json"
        if store is not None and store.exists(key):
            digest.update(hashlib.sha256(store.get_bytes(key)).digest())
    return "sha256:" + digest.hexdigest()


def fingerprints(plan: Plan, options: DeployOptions) -> dict[str, str]:
    store = open_store(options.store_uri)
    return {s.id: server_fingerprint(s, store, options.engine) for s in plan.servers}


def wait_ready(
    urls: dict[str, str],
    timeout_s: float,
    exited: Callable[[str], str | None] = lambda _: None,
) -> None:
    """Wait until every server answers 200 on ``/v2/health/ready`` (all its models loaded).
    ``exited(server_id)`` returns a reason when the server is gone for good (its log tail)."""
    deadline = time.monotonic() + timeout_s
    pending = set(urls)
    with httpx.Client(timeout=2.0) as http:
        while pending:
            for server_id in sorted(pending):
                reason = exited(server_id)
                if reason is not None:
                    raise DeployError(f"server {server_id} exited: {reason}")
                try:
                    response = http.get(f"{urls[server_id]}/v2/health/ready")
                except httpx.TransportError:
                    continue
                if response.status_code == 200:
                    pending.discard(server_id)
                    continue
                try:
                    failed = response.json().get("failed")
                except ValueError:
                    failed = None
                if failed:
                    models = http.get(f"{urls[server_id]}/models").json()["models"]
                    reasons = "; ".join(
                        f"{m['id']}: {m['reason']}" for m in models if m["state"] == "failed"
                    )
                    raise DeployError(f"server {server_id} failed to load models: {reasons}")
            if pending and time.monotonic() > deadline:
                raise DeployError(f"servers not ready after {timeout_s:.0f} s: {sorted(pending)}")
            if pending:
                time.sleep(0.2)


def probe(url: str, server_id: str, timeout_s: float = 2.0) -> ServerStatus:
    try:
        response = httpx.get(f"{url}/v2/health/ready", timeout=timeout_s)
    except httpx.TransportError as exc:
        return ServerStatus(server_id=server_id, url=url, state="down", detail=type(exc).__name__)
    if response.status_code == 200:
        return ServerStatus(server_id=server_id, url=url, state="ready")
    failed = response.json().get("failed") if response.content else None
    return ServerStatus(
        server_id=server_id,
        url=url,
        state="failed" if failed else "loading",
        detail=", ".join(failed or []),
    )


# How an orchestrator starts each server of a plan as its own unit: (servers, plan file,
# options) -> per server, (URL, handle) or the exception its start raised.
StartEach = Callable[
    [list[PlannedServer], Path, DeployOptions], list[tuple[str, str] | BaseException]
]


class Runtime(abc.ABC):
    """Deploy a plan's servers, report their state, move them to another plan, stop them."""

    name: str

    @abc.abstractmethod
    def deploy(self, plan: Plan, plan_path: Path, options: DeployOptions) -> Deployment:
        """Start every server of ``plan``; return once each has all its models loaded."""

    @abc.abstractmethod
    def status(self, deployment: Deployment) -> list[ServerStatus]: ...

    @abc.abstractmethod
    def redeploy(
        self, deployment: Deployment, plan: Plan, plan_path: Path, options: DeployOptions
    ) -> RedeployResult:
        """Move ``deployment`` to ``plan``: servers whose fingerprint is unchanged keep running;
        each new server is ready before any old one stops, so no request fails on the way."""

    @abc.abstractmethod
    def teardown(self, deployment: Deployment) -> list[str]:
        """Stop everything this deployment started (and nothing else); returns server ids."""


class HostRuntime(Runtime):
    """A runtime whose servers answer on this machine's loopback ports (local processes,
    containers): one generic deploy, redeploy, status and teardown over three primitives."""

    # How long a redeploy waits, after writing the new record, before it stops old servers:
    # a gateway re-reads the record every half second, so it stops sending them requests.
    drain_s: float = 2.0

    @abc.abstractmethod
    def start_server(
        self, server: PlannedServer, plan_file: Path, options: DeployOptions
    ) -> tuple[str, str]:
        """Start one server; returns (base URL, handle). Returns before it is ready."""

    @abc.abstractmethod
    def stop_server(self, handle: str) -> None:
        """Stop it gracefully (in-flight requests finish), then for good."""

    @abc.abstractmethod
    def exit_reason(self, handle: str) -> str | None:
        """Why the server stopped while starting (exit code and log tail), or None."""

    def plan_file(self, plan: Plan, name: str) -> Path:
        """A copy of the plan per plan id: a server kept across a redeploy (and restarted by its
        supervisor) keeps reading the plan it was started from."""
        path = deployments_dir() / name / f"{plan.plan_id}.plan.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, msgspec.json.encode(plan))
        return path

    def _start_all(
        self, servers: list[PlannedServer], plan_file: Path, options: DeployOptions
    ) -> tuple[dict[str, str], dict[str, str]]:
        urls: dict[str, str] = {}
        handles: dict[str, str] = {}
        try:
            for server in servers:
                urls[server.id], handles[server.id] = self.start_server(server, plan_file, options)
            wait_ready(urls, options.ready_timeout_s, lambda sid: self.exit_reason(handles[sid]))
        except BaseException:
            for handle in handles.values():
                self.stop_server(handle)
            raise
        return urls, handles

    def deploy(
        self,
        plan: Plan,
        plan_path: Path,
        options: DeployOptions,
        start_each: StartEach | None = None,
    ) -> Deployment:
        """``start_each(servers, plan_file, options)``: how an orchestrator runs each server's
        :meth:`start_ready` as a unit of its own (the flows' ``deploy-server-<id>`` task runs,
        concurrently), returning per server its (URL, handle) or the exception it raised. If
        any failed, the ones that started are stopped and nothing is recorded. Without it, all
        start at once here and are waited for together."""
        plan_file = self.begin(plan, options)
        if start_each is None:
            urls, handles = self._start_all(plan.servers, plan_file, options)
            return self.finish(plan, plan_file, urls, handles, options)
        outcomes = start_each(plan.servers, plan_file, options)
        started = {
            s.id: outcome
            for s, outcome in zip(plan.servers, outcomes, strict=True)
            if not isinstance(outcome, BaseException)
        }
        failures = [
            f"{s.id}: {outcome}"
            for s, outcome in zip(plan.servers, outcomes, strict=True)
            if isinstance(outcome, BaseException)
        ]
        if failures:
            for _, handle in started.values():
                self.stop_server(handle)
            raise DeployError(f"deployment {options.name}: " + "; ".join(failures))
        urls = {server_id: url for server_id, (url, _) in started.items()}
        handles = {server_id: handle for server_id, (_, handle) in started.items()}
        return self.finish(plan, plan_file, urls, handles, options)

    # The steps of a deploy: begin, start_ready per server, then finish, or stop_server on the
    # ones that started when another failed.

    def begin(self, plan: Plan, options: DeployOptions) -> Path:
        """Stop a previous deployment of this name; returns the plan file servers read."""
        if deployment_path(options.name).exists():
            self.teardown(read_deployment(options.name))
        return self.plan_file(plan, options.name)

    def start_ready(
        self, server: PlannedServer, plan_file: Path, options: DeployOptions
    ) -> tuple[str, str]:
        """Start one server and wait until all its models are loaded; returns (URL, handle).
        A server that does not get ready is stopped before the error is raised."""
        url, handle = self.start_server(server, plan_file, options)
        try:
            wait_ready(
                {server.id: url}, options.ready_timeout_s, lambda _: self.exit_reason(handle)
            )
        except BaseException:
            self.stop_server(handle)
            raise
        return url, handle

    def finish(
        self,
        plan: Plan,
        plan_file: Path,
        urls: dict[str, str],
        handles: dict[str, str],
        options: DeployOptions,
    ) -> Deployment:
        """Record the started servers of ``plan`` as deployment ``options.name``."""
        deployment = Deployment(
            name=options.name,
            plan_id=plan.plan_id,
            runtime=self.name,
            servers={s.id: urls[s.id] for s in plan.servers},
            handles={s.id: handles[s.id] for s in plan.servers},
            fingerprints=fingerprints(plan, options),
            plan_path=str(plan_file),
            store_uri=options.store_uri,
        )
        return write_deployment(deployment, plan)

    def redeploy(
        self, deployment: Deployment, plan: Plan, plan_path: Path, options: DeployOptions
    ) -> RedeployResult:
        new_prints = fingerprints(plan, options)
        # Old servers by what they run: a new server with the same fingerprint takes one over.
        spare: dict[str, list[str]] = {}
        for server_id, fingerprint in sorted(deployment.fingerprints.items()):
            spare.setdefault(fingerprint, []).append(server_id)
        taken: dict[str, str] = {}
        to_start = []
        for server in plan.servers:
            old_ids = spare.get(new_prints[server.id])
            if old_ids:
                taken[server.id] = old_ids.pop(0)
            else:
                to_start.append(server)
        plan_file = self.plan_file(plan, options.name)
        urls, handles = self._start_all(to_start, plan_file, options)
        for new_id, old_id in taken.items():
            urls[new_id] = deployment.servers[old_id]
            handles[new_id] = deployment.handles[old_id]
        moved = Deployment(
            name=options.name,
            plan_id=plan.plan_id,
            runtime=self.name,
            servers={s.id: urls[s.id] for s in plan.servers},
            handles={s.id: handles[s.id] for s in plan.servers},
            fingerprints=new_prints,
            plan_path=str(plan_file),
            store_uri=options.store_uri,
        )
        moved = write_deployment(moved, plan)
        stopped = sorted(set(deployment.servers) - set(taken.values()))
        if stopped:
            time.sleep(self.drain_s)
        for server_id in stopped:
            self.stop_server(deployment.handles[server_id])
        return RedeployResult(
            deployment=moved,
            kept=sorted(taken),
            started=[s.id for s in to_start],
            stopped=stopped,
        )

    def status(self, deployment: Deployment) -> list[ServerStatus]:
        return [probe(url, server_id) for server_id, url in sorted(deployment.servers.items())]

    def teardown(self, deployment: Deployment) -> list[str]:
        for handle in set(deployment.handles.values()):
            self.stop_server(handle)
        forget_deployment(deployment)
        return sorted(deployment.servers)
