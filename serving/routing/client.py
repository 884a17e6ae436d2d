"""Route a model id to the server that holds it, by the plan, with failover between replicas."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from packing.contracts import Plan
from packing.errors import MyriadError
from serving.deployments import Deployment
from serving.wire import COLD_START_HEADER


class RoutingError(MyriadError, RuntimeError):
    pass


class Router:
    def __init__(self, plan: Plan, deployment: Deployment) -> None:
        if plan.plan_id != deployment.plan_id:
            raise RoutingError(
                f"deployment {deployment.name} runs plan {deployment.plan_id}, not {plan.plan_id}"
            )
        self.plan = plan
        self.deployment = deployment
        self._routes: dict[str, list[str]] = {}
        for server in plan.servers:
            url = deployment.servers.get(server.id)
            if url is None:
                raise RoutingError(f"deployment {deployment.name} has no address for {server.id}")
            for model_id in server.model_ids:
                self._routes.setdefault(model_id, []).append(url)

    def urls_for(self, model_id: str) -> list[str]:
        try:
            return self._routes[model_id]
        except KeyError:
            raise RoutingError(f"model {model_id!r} is not in plan {self.plan.plan_id}") from None

    def replicas(self, model_id: str) -> list[str]:
        """The servers of ``model_id`` in the order to try them, each once: random, so that
        clients spread over replicas and a dead one costs each caller one attempt."""
        urls = list(self.urls_for(model_id))
        random.shuffle(urls)
        return urls

    def prediction_url(self, model_id: str, server_url: str) -> str:
        return f"{server_url}/predictions/{model_id}"

    @property
    def model_ids(self) -> list[str]:
        return sorted(self._routes)


RETRYABLE_STATUS = {502, 503, 504}


def met_cold_start(headers: Mapping[str, str]) -> bool:
    """Whether an answer met a cold start, from its headers (any case-insensitive mapping:
    httpx's, aiohttp's)."""
    return headers.get(COLD_START_HEADER) == "1"


def failover_reason(
    url: str, status: int | None = None, error: Exception | None = None
) -> str | None:
    """Why an attempt at replica ``url`` moves on to the next one (a transport error, or a
    502/503/504: down, overloaded or draining), or None when its answer is the answer."""
    if error is not None:
        return f"{url}: {type(error).__name__}"
    if status in RETRYABLE_STATUS:
        return f"{url}: {status}"
    return None


class Client:
    """A synchronous client: ``predict(model_id, text)``, trying each replica at most once."""

    def __init__(self, router: Router, timeout_s: float = 30.0) -> None:
        self.router = router
        self.http = httpx.Client(timeout=timeout_s)

    def predict(self, model_id: str, text: str | Sequence[str], raw: bool = False) -> Any:
        body = {"text": text if isinstance(text, str) else list(text)}
        failures = []
        for url in self.router.replicas(model_id):
            try:
                response = self.http.post(
                    self.router.prediction_url(model_id, url),
                    json=body,
                    params={"raw": "1"} if raw else None,
                )
            except httpx.TransportError as exc:
                failures.append(failover_reason(url, error=exc))
                continue
            if reason := failover_reason(url, response.status_code):
                failures.append(reason)
                continue
            response.raise_for_status()
            return response.json()
        raise RoutingError(f"no replica of {model_id} answered: " + "; ".join(failures))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
