"""The ``myriad-loadtest`` flow: load-test a running deployment and publish the report. The
pipeline calls it after deploying; it also runs on its own against any deployment."""

from __future__ import annotations

from prefect import flow

from tasks.loadtest import load_test
from tasks.report import publish_report


@flow(name="myriad-loadtest", log_prints=True)
def loadtest(
    plan_json: str, deployment: dict, settings: dict | None = None, store: str | None = None
) -> dict:
    figures = load_test(plan_json, deployment, settings or {})
    summary = publish_report(plan_json, figures, store)
    return summary
