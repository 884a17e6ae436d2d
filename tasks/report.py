"""The report task: the load-test report of :mod:`loadtest.report` as Prefect table and
markdown artifacts, and its files in the store under ``reports/<run>/``."""

from __future__ import annotations

import time

from prefect import task

from loadtest.report import format_value, report_files, results_row, to_markdown
from serving.store import open_store, report_key
from tasks.documents import open_plan
from tasks.policy import PERSISTED


@task(name="publish-report", **PERSISTED)
def publish_report(plan_uri: str, load: dict, store_uri: str | None) -> dict:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    plan = open_plan(plan_uri)
    summary, files = report_files(plan, load)
    create_table_artifact(
        key="myriad-summary",
        table=[{"figure": k, "value": format_value(v)} for k, v in summary.items()],
        description=f"Load test of plan {plan.plan_id}",
    )
    create_table_artifact(
        key="myriad-results",
        table=[results_row(summary)],
        description="The reference's results-table columns",
    )
    create_markdown_artifact(key="myriad-report", markdown=to_markdown(summary, load))
    store = open_store(store_uri)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for name, data in files.items():
        store.put_bytes(report_key(run_id, name), data)
    summary["report_uri"] = store.url_for(report_key(run_id, "report.json"))
    return summary
