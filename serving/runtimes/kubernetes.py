"""The Kubernetes runtime: a plan rendered by :mod:`serving.runtimes.manifests` applied with
server-side apply, rolled out new-before-old, torn down by label."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from packing.contracts import Catalog, Plan
from serving import settings
from serving.deployments import DeployError, Deployment, forget_deployment, write_deployment
from serving.runtimes.base import (
    DeployOptions,
    RedeployResult,
    Runtime,
    ServerStatus,
    fingerprints,
    image_for,
)
from serving.runtimes.manifests import (
    CREATED_BY,
    FIELD_MANAGER,
    FINGERPRINT_ANNOTATION,
    INSTANCE,
    KINDS,
    MANAGED_BY,
    SERVER_LABEL,
    apply_order,
    check_cluster_store,
    copy_object,
    default_namespace,
    manifest_files,
    namespace_for,
    render,
    service_url,
    write_files,
)

# ---------------------------------------------------------------------------------- runtime

Progress = Callable[[str, str], None]


class KubernetesRuntime(Runtime):
    """Apply rendered plans to a cluster with server-side apply (field manager ``myriad``).

    Configuration, first that applies: ``api_client`` (a ``kubernetes.client.ApiClient``);
    ``config`` (a kubeconfig as a dict, or a function returning one: what a prefect-kubernetes
    ``KubernetesClusterConfig`` block holds in ``.config``, with ``context``); ``kubeconfig`` (a
    path); ``$KUBECONFIG``; ``~/.kube/config``; the in-cluster service account.

    ``render_args`` go to ``render`` (ingress_class, hpa, pin_nodes, ...); the store and how
    the servers read it (role_arn, store_secret, store_credentials) are ``DeployOptions``;
    ``manifest_root``: also write the rendered files to ``<manifest_root>/<plan-id>``;
    ``progress(server_id, message)`` hears of each rollout step."""

    name = "kubernetes"

    def __init__(
        self,
        *,
        catalog: Catalog | None = None,
        kubeconfig: str | os.PathLike[str] | None = None,
        context: str | None = None,
        config: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
        api_client: Any = None,
        manifest_root: Path | None = None,
        progress: Progress | None = None,
        poll_s: float = 2.0,
        **render_args: Any,
    ) -> None:
        self.catalog = catalog
        self.kubeconfig = kubeconfig
        self.context = context
        self.config = config
        self._api_client = api_client
        self._dynamic: Any = None
        self.manifest_root = manifest_root
        self.progress = progress or (lambda _server, _message: None)
        self.poll_s = poll_s
        self.render_args = render_args

    # ---------------------------------------------------------------- connection

    def api_client(self) -> Any:
        if self._api_client is not None:
            return self._api_client
        from kubernetes import client
        from kubernetes import config as kube_config

        if self.config is not None:
            loaded = self.config() if callable(self.config) else self.config
            self._api_client = kube_config.new_client_from_config_dict(
                dict(loaded), context=self.context
            )
            return self._api_client
        tried = []
        if self.kubeconfig is not None:
            path = Path(self.kubeconfig).expanduser()
            if not path.is_file():
                raise DeployError(f"kubeconfig {path} does not exist")
            self._api_client = kube_config.new_client_from_config(str(path), context=self.context)
            return self._api_client
        kube = settings.current().kubernetes
        env = kube.kubeconfig
        if env:
            paths = [Path(p).expanduser() for p in env.split(os.pathsep) if p]
            if any(p.is_file() for p in paths):
                self._api_client = kube_config.new_client_from_config(context=self.context)
                return self._api_client
            tried.append(f"$KUBECONFIG ({env}: no such file)")
        else:
            tried.append("$KUBECONFIG (unset)")
        home = Path("~/.kube/config").expanduser()
        if home.is_file() and not env:
            self._api_client = kube_config.new_client_from_config(str(home), context=self.context)
            return self._api_client
        tried.append(f"{home} ({'skipped: $KUBECONFIG is set' if env else 'missing'})")
        if kube.in_cluster:
            configuration = client.Configuration()
            try:
                kube_config.load_incluster_config(client_configuration=configuration)
            except kube_config.ConfigException as exc:
                raise DeployError(f"in-cluster Kubernetes configuration: {exc}") from None
            self._api_client = client.ApiClient(configuration)
            return self._api_client
        tried.append("in-cluster service account (KUBERNETES_SERVICE_HOST unset)")
        raise DeployError(
            "no Kubernetes configuration found; tried "
            + "; ".join(tried)
            + ". Pass kubeconfig=..., set KUBECONFIG, or run inside the cluster"
        )

    def dynamic(self) -> Any:
        if self._dynamic is None:
            from kubernetes.dynamic import DynamicClient

            try:
                self._dynamic = DynamicClient(self.api_client())
            except Exception as exc:  # discovery: unreachable or refused
                raise DeployError(f"cannot reach the Kubernetes API: {_api_error(exc)}") from None
        return self._dynamic

    def _resource(self, api_version: str, kind: str) -> Any:
        return self.dynamic().resources.get(api_version=api_version, kind=kind)

    # ---------------------------------------------------------------- primitives

    def apply(self, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        resource = self._resource(obj["apiVersion"], obj["kind"])
        try:
            self.dynamic().server_side_apply(
                resource,
                body=dict(obj),
                name=meta["name"],
                namespace=meta.get("namespace"),
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
            )
        except Exception as exc:
            raise DeployError(
                f"applying {obj['kind']} {meta.get('namespace', '')}/{meta['name']}: "
                f"{_api_error(exc)}"
            ) from None

    def _get(self, api_version: str, kind: str, name: str, namespace: str | None) -> dict | None:
        from kubernetes.dynamic.exceptions import NotFoundError

        try:
            found = self._resource(api_version, kind).get(name=name, namespace=namespace)
        except NotFoundError:
            return None
        except Exception as exc:
            raise DeployError(f"reading {kind} {namespace}/{name}: {_api_error(exc)}") from None
        return found.to_dict()

    def _list(self, api_version: str, kind: str, namespace: str, selector: str) -> list[dict]:
        from kubernetes.dynamic.exceptions import NotFoundError

        try:
            found = self._resource(api_version, kind).get(
                namespace=namespace, label_selector=selector
            )
        except NotFoundError:
            return []
        except Exception as exc:
            raise DeployError(f"listing {kind} in {namespace}: {_api_error(exc)}") from None
        return found.to_dict().get("items") or []

    def _delete(self, api_version: str, kind: str, name: str, namespace: str | None) -> None:
        from kubernetes.dynamic.exceptions import NotFoundError

        try:
            self._resource(api_version, kind).delete(
                name=name, namespace=namespace, body={"propagationPolicy": "Background"}
            )
        except NotFoundError:
            pass
        except Exception as exc:
            raise DeployError(f"deleting {kind} {namespace}/{name}: {_api_error(exc)}") from None

    # ---------------------------------------------------------------- rollout

    def _render(self, plan: Plan, options: DeployOptions) -> list[dict[str, Any]]:
        images = {s.processor: image_for(s.processor, options) for s in plan.servers}
        # Refused before the store is read: a deploy with no store, or a local one.
        check_cluster_store(options)
        # A deploy reads the store (it writes the record there too): the fingerprints cover each
        # model's artifact manifest, so a retrained model rolls its servers.
        prints = fingerprints(plan, options)
        objects = render(
            plan, self.catalog, options, images, fingerprints=prints, **self.render_args
        )
        if self.manifest_root is not None:
            write_files(manifest_files(objects), Path(self.manifest_root) / plan.plan_id)
        return objects

    def _converge(self, objects: list[dict[str, Any]], options: DeployOptions) -> list[str]:
        """Apply ``objects``, wait for their Deployments, then route and prune; returns the
        names of the Deployments pruned."""
        namespace = namespace_for(options)
        first, servers, routes = apply_order(objects)
        for obj in first:
            if obj["kind"] == "Namespace":
                existing = self._get("v1", "Namespace", namespace, None)
                if (
                    existing is not None
                    and (existing["metadata"].get("labels") or {}).get(CREATED_BY) != options.name
                ):
                    continue  # someone else's namespace: use it, leave its labels alone
                obj = copy_object(obj)
                obj["metadata"]["labels"][CREATED_BY] = options.name
            self.apply(obj)
        for obj in servers:
            self.apply(obj)
            if obj["kind"] == "Deployment":
                self.progress(obj["metadata"]["name"], "applied")
        names = [o["metadata"]["name"] for o in servers if o["kind"] == "Deployment"]
        self.wait_rollouts(names, namespace, options.ready_timeout_s, options.name)
        for obj in routes:
            self.apply(obj)
        return self._prune(objects, namespace, options.name)

    def _prune(self, objects: list[dict[str, Any]], namespace: str, name: str) -> list[str]:
        keep = {(o["kind"], o["metadata"]["name"]) for o in objects}
        selector = f"{INSTANCE}={name},{MANAGED_BY}=myriad"
        pruned = []
        # Routes first (they already point elsewhere), then what served them.
        for api_version, kind in [
            ("networking.k8s.io/v1", "Ingress"),
            ("autoscaling/v2", "HorizontalPodAutoscaler"),
            ("policy/v1", "PodDisruptionBudget"),
            ("v1", "Service"),
            ("apps/v1", "Deployment"),
            ("networking.k8s.io/v1", "NetworkPolicy"),
            ("v1", "Secret"),
        ]:
            for item in self._list(api_version, kind, namespace, selector):
                item_name = item["metadata"]["name"]
                if (kind, item_name) not in keep:
                    self._delete(api_version, kind, item_name, namespace)
                    if kind == "Deployment":
                        pruned.append(item_name)
                        self.progress(item_name, "deleted")
        return sorted(pruned)

    def wait_rollouts(
        self, names: list[str], namespace: str, timeout_s: float, deployment_name: str
    ) -> None:
        """Until every Deployment in ``names`` has rolled out (observedGeneration caught up,
        every replica updated and available, no old replica left), or DeployError naming the
        ones that did not and what their pods wait for."""
        deadline = time.monotonic() + timeout_s
        pending = set(names)
        while pending:
            for name in sorted(pending):
                found = self._get("apps/v1", "Deployment", name, namespace)
                if found is None:
                    raise DeployError(f"Deployment {namespace}/{name} disappeared during rollout")
                if rolled_out(found):
                    pending.discard(name)
                    self.progress(name, "ready")
                elif _deadline_exceeded(found):
                    raise DeployError(
                        f"server {name} did not roll out (ProgressDeadlineExceeded): "
                        + self._pod_reasons(name, namespace, deployment_name)
                    )
            if not pending:
                break
            if time.monotonic() > deadline:
                reasons = "; ".join(
                    f"{name}: {self._pod_reasons(name, namespace, deployment_name)}"
                    for name in sorted(pending)
                )
                raise DeployError(
                    f"servers not rolled out after {timeout_s:.0f} s in {namespace}: {reasons}"
                )
            time.sleep(self.poll_s)

    def _pod_reasons(self, server_id: str, namespace: str, deployment_name: str) -> str:
        selector = f"{INSTANCE}={deployment_name},{SERVER_LABEL}={server_id}"
        try:
            pods = self._list("v1", "Pod", namespace, selector)
        except DeployError as exc:
            return f"(pods unreadable: {exc})"
        return "; ".join(pod_reason(p) for p in pods) or "no pods"

    # ---------------------------------------------------------------- Runtime

    def deploy(self, plan: Plan, plan_path: Path, options: DeployOptions) -> Deployment:
        objects = self._render(plan, options)
        self._converge(objects, options)
        return write_deployment(self._record(plan, plan_path, options, objects), plan)

    def _record(
        self, plan: Plan, plan_path: Path, options: DeployOptions, objects: list[dict]
    ) -> Deployment:
        namespace = namespace_for(options)
        prints = {
            o["metadata"]["name"]: o["metadata"]["annotations"][FINGERPRINT_ANNOTATION]
            for o in objects
            if o["kind"] == "Deployment"
        }
        return Deployment(
            name=options.name,
            plan_id=plan.plan_id,
            runtime=self.name,
            servers={s.id: service_url(s.id, namespace) for s in plan.servers},
            handles={s.id: s.id for s in plan.servers},
            fingerprints=prints,
            plan_path=str(plan_path),
            namespace=namespace,
            store_uri=options.store_uri,
        )

    def status(self, deployment: Deployment) -> list[ServerStatus]:
        namespace = deployment.namespace or default_namespace(deployment.name)
        result = []
        for server_id, url in sorted(deployment.servers.items()):
            name = deployment.handles.get(server_id, server_id)
            found = self._get("apps/v1", "Deployment", name, namespace)
            if found is None:
                result.append(
                    ServerStatus(server_id=server_id, url=url, state="down", detail="no Deployment")
                )
                continue
            if rolled_out(found):
                result.append(ServerStatus(server_id=server_id, url=url, state="ready"))
                continue
            detail = self._pod_reasons(server_id, namespace, deployment.name)
            failed = _deadline_exceeded(found) or any(r in detail for r in FAILED_REASONS)
            result.append(
                ServerStatus(
                    server_id=server_id,
                    url=url,
                    state="failed" if failed else "loading",
                    detail=detail,
                )
            )
        return result

    def redeploy(
        self, deployment: Deployment, plan: Plan, plan_path: Path, options: DeployOptions
    ) -> RedeployResult:
        """New and changed servers roll out (new pod ready before the old stops), kept ones are
        applied unchanged (server-side apply of the same object: no new pod), the Ingress moves
        to the new backends, then servers the plan no longer has are deleted."""
        options = _with(options, name=deployment.name, namespace=deployment.namespace)
        objects = self._render(plan, options)
        new = self._record(plan, plan_path, options, objects)
        kept = sorted(s for s, f in new.fingerprints.items() if deployment.fingerprints.get(s) == f)
        started = sorted(set(new.fingerprints) - set(kept))
        self._converge(objects, options)
        stopped = sorted(
            s
            for s in deployment.servers
            if s not in new.fingerprints or (s in started and s in deployment.fingerprints)
        )
        new = write_deployment(new, plan)
        return RedeployResult(deployment=new, kept=kept, started=started, stopped=stopped)

    def teardown(self, deployment: Deployment) -> list[str]:
        namespace = deployment.namespace or default_namespace(deployment.name)
        selector = f"{INSTANCE}={deployment.name},{MANAGED_BY}=myriad"
        stopped = []
        for api_version, kind in reversed(KINDS[1:]):
            for item in self._list(api_version, kind, namespace, selector):
                self._delete(api_version, kind, item["metadata"]["name"], namespace)
                if kind == "Deployment":
                    stopped.append(item["metadata"]["name"])
        found = self._get("v1", "Namespace", namespace, None)
        if (
            found is not None
            and (found["metadata"].get("labels") or {}).get(CREATED_BY) == deployment.name
        ):
            self._delete("v1", "Namespace", namespace, None)
        forget_deployment(deployment)
        ids = {deployment.handles.get(s, s): s for s in deployment.servers}
        return sorted(ids.get(name, name) for name in stopped)


FAILED_REASONS = (
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "CreateContainerConfigError",
    "InvalidImageName",
    "OOMKilled",
)


def rolled_out(deployment: Mapping[str, Any]) -> bool:
    """kubectl rollout status's test: the controller saw the latest spec, and every replica is
    updated and available with no old one left."""
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    replicas = spec.get("replicas", 1)
    return (
        (status.get("observedGeneration") or 0) >= (deployment["metadata"].get("generation") or 0)
        and (status.get("updatedReplicas") or 0) == replicas
        and (status.get("availableReplicas") or 0) == replicas
        and (status.get("replicas") or 0) == replicas
    )


def _deadline_exceeded(deployment: Mapping[str, Any]) -> bool:
    for condition in (deployment.get("status") or {}).get("conditions") or []:
        if (
            condition.get("type") == "Progressing"
            and condition.get("reason") == "ProgressDeadlineExceeded"
        ):
            return True
    return False


def pod_reason(pod: Mapping[str, Any]) -> str:
    """One line on why a pod is not ready: unschedulable, a container waiting or crashed, or
    still loading its models."""
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return f"{name} {condition.get('reason')}: {condition.get('message', '')}".strip()
    for container in status.get("containerStatuses") or status.get("container_statuses") or []:
        state = container.get("state") or {}
        waiting = state.get("waiting")
        if waiting:
            last = (container.get("lastState") or container.get("last_state") or {}).get(
                "terminated"
            )
            tail = (
                f" (last exit {last.get('exitCode', last.get('exit_code'))}: {last.get('reason')})"
                if last
                else ""
            )
            return f"{name} {waiting.get('reason')}: {waiting.get('message', '')}{tail}".strip()
        if not container.get("ready"):
            return f"{name} running, not ready (loading models)"
    return f"{name} {status.get('phase', 'Unknown')}"


def _api_error(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    summary = getattr(exc, "summary", None)
    if callable(summary):
        try:
            return f"{status} {summary()}"
        except Exception:  # pragma: no cover - a malformed error body
            pass
    body = getattr(exc, "body", None)
    if status is not None:
        return f"{status} {body or exc}"
    return f"{type(exc).__name__}: {exc}"


def _with(options: DeployOptions, **changes: Any) -> DeployOptions:
    import msgspec

    return msgspec.structs.replace(options, **changes)
