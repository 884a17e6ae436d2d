"""The ``myriad-trace`` flow over many synthetic ``bert-tiny`` models on the embedded default (a
temporary local Prefect server on SQLite): wall time, task runs created, and whether the log says
"database is locked".

    python -m benchmarks.trace_fanout --models 3000 --out /tmp/trace-fanout
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import time
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=3000)
    parser.add_argument("--max-task-runs", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("/tmp/trace-fanout"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ["PREFECT_HOME"] = str(args.out / "prefect")
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(args.out / "results")
    os.environ.pop("PREFECT_API_URL", None)
    fleet = args.out / "fleet.yaml"
    digits = len(str(args.models - 1))
    fleet.write_text(
        yaml.safe_dump(
            {
                "schema_version": 1,
                "name": f"tiny-{args.models}",
                "processors": ["cpu"],
                "model_sets": [
                    {"prefix": "bert-", "count": args.models, "digits": max(4, digits),
                     "source": "synthetic:bert-tiny", "task": "sequence-classification",
                     "max_length": 32}
                ],
            }
        )
    )  # fmt: skip
    store = f"file://{args.out}/store"

    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    logging.getLogger().addHandler(handler)
    logging.getLogger("prefect").addHandler(handler)

    from prefect.client.orchestration import get_client

    from flows.stages import trace

    started = time.perf_counter()
    state = trace(
        fleet=str(fleet),
        store=store,
        minimal_profile=True,
        max_task_runs=args.max_task_runs,
        return_state=True,
    )
    wall = time.perf_counter() - started
    summary = state.result(raise_on_failure=False)
    task_runs = []
    with get_client(sync_client=True) as client:
        while page := client.read_task_runs(limit=200, offset=len(task_runs)):
            task_runs += page
    server_log = ""
    for path in (args.out / "prefect").rglob("*.log"):
        server_log += path.read_text(errors="replace")
    log_text = captured.getvalue() + server_log
    result = {
        "models": args.models,
        "state": state.type.value,
        "wall_seconds": round(wall, 1),
        "task_runs": len(task_runs),
        "trace_task_runs": sum(1 for t in task_runs if t.name.startswith("trace-")),
        "database_is_locked": log_text.count("database is locked"),
        "summary": summary if isinstance(summary, dict) else str(summary),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
