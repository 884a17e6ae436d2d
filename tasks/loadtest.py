"""The load-test task: :func:`loadtest.runner.run_load_test` with a progress artifact."""

from __future__ import annotations

import msgspec
from prefect import task

from loadtest.runner import LoadSettings, run_load_test
from serving.deployments import Deployment
from tasks.documents import open_plan
from tasks.policy import PERSISTED

__all__ = ["LoadSettings", "load_test"]


@task(name="load-test", **PERSISTED)
def load_test(plan_uri: str, deployment: dict, settings: dict) -> dict:
    """Load-test the deployment of the plan at ``plan_uri``; returns the figures."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    plan = open_plan(plan_uri)
    load_settings = msgspec.convert(settings, LoadSettings)
    artifact = create_progress_artifact(
        progress=0.0, key="myriad-load-test-progress", description="load test progress"
    )

    def progress(label: str, fraction: float) -> None:
        update_progress_artifact(artifact_id=artifact, progress=round(100 * fraction, 1))

    return run_load_test(
        plan, msgspec.convert(deployment, Deployment), load_settings, progress=progress
    )
