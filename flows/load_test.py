"""The ``myriad-loadtest`` flow: load-test a running deployment and publish the report. The
pipeline and the redeploy flow call it after deploying; it also runs on its own against any
deployment, given the plan's URI and the deployment's name.

Not ``flows/loadtest.py``: a worker runs an entrypoint with its folder first on ``sys.path``,
where a ``loadtest`` module would shadow the ``loadtest`` package."""

from __future__ import annotations

from prefect import flow

from flows.params import LoadMode, check_positive
from flows.results import result_options
from loadtest.runner import LoadSettings
from packing.contracts import Plan
from tasks.deploy import deployment_record
from tasks.documents import read_document
from tasks.loadtest import load_test
from tasks.report import publish_report


@flow(name="myriad-loadtest", log_prints=True, **result_options())
def loadtest(
    plan: str,
    deployment: str = "myriad",
    store: str | None = None,
    duration_s: float = 10.0,
    concurrency: int = 8,
    modes: list[LoadMode] | None = None,
    zipf: float = 0.0,
    rate: float | None = None,
) -> dict:
    """``plan``: the plan's URI (file path, file:// or s3://); ``deployment``: the name it was
    deployed under. Returns the report's summary figures and its URI in the store."""
    check_positive(duration_s=duration_s, concurrency=concurrency, rate=rate)
    settings: dict = {"duration_s": duration_s, "concurrency": concurrency, "zipf": zipf}
    if modes:
        settings["modes"] = list(modes)
    if rate is not None:
        settings["rate"] = rate
        settings.setdefault("modes", ["rate"])
    LoadSettings(**settings)  # fails the run now on a bad combination, before any load
    read_document(plan, Plan)  # a missing or bad plan fails the run now, before any load
    record = deployment_record(deployment, store)
    figures = load_test(plan, record, settings)
    return publish_report(plan, figures, store)
