"""The front end's own cost: requests/s and CPU per request with a trivial model behind it, in
one process and behind N front-end processes (``--workers N``), and from it the cores a node
needs for a target rate.

    python -m benchmarks.frontend_cost --models 20 --clients 32 --seconds 5 --rounds 3

The models are ``bert-tiny`` (hidden 32, 2 layers) at 16 tokens, batched across models by the
cross-model engine: a forward of well under 0.1 ms per text, so the figures are the HTTP
parsing, the hand-off to the engine process, the data plane and the answer. CPU time is read
from /proc per process, so the front ends' share and the engine process's share are apart:
``front_end_cores_for_target`` is how many cores the front ends need at ``--target``
requests/s, ``engine_cores_for_target`` the same for the engine process, which has one core's
worth of Python (above 1.0 it, not HTTP, caps the node).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from benchmarks.serving_vs_baseline import ROOT, measure, start
from packing.contracts import ModelSpec
from serving.build.tracing import TraceSettings, trace_to_store
from serving.runtimes.local import free_port
from serving.store import open_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--target", type=float, default=8000.0, help="requests/s to size for")
    parser.add_argument("--store", default=f"file://{ROOT}/.myriad/bench-frontend-store")
    args = parser.parse_args(argv)

    store = open_store(args.store)
    ids = [f"tiny-{i:03d}" for i in range(args.models)]
    settings = TraceSettings(profile_batch_sizes=(1,), profile_repeats=1)
    for model_id in ids:  # unchanged models are skipped
        spec = ModelSpec(id=model_id, source="synthetic:bert-tiny", max_length=16)
        trace_to_store(spec, "cpu", store, settings)
    logs = ROOT / ".myriad"
    command = [sys.executable, "-m", "serving", "--models", ",".join(ids), "--store", args.store,
               "--backend", "cross-model", "--max-wait-ms", "0.5"]  # fmt: skip
    runs: dict[int, list[dict]] = {workers: [] for workers in args.workers}
    for _ in range(args.rounds):
        for workers in args.workers:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            argv_ = [*command, "--workers", str(workers), "--port", str(port)]
            process = start(argv_, url, logs / f"bench-frontend-{workers}.log")
            try:
                runs[workers].append(measure(url, process.pid, ids, args.clients, args.seconds))
            finally:
                process.terminate()
                process.wait(timeout=60)
    for workers, results in runs.items():
        figures = {key: statistics.median(r[key] for r in results) for key in results[0]}
        # One process: its CPU is the front end's and the engine's at once.
        front_end_ms = figures["front_end_cpu_ms_per_request"] if workers > 1 else None
        line = {
            "front_end_processes": workers,
            "models": args.models,
            "clients": args.clients,
            **figures,
            "target_requests_per_s": args.target,
            "front_end_cores_for_target": None
            if front_end_ms is None
            else args.target * front_end_ms / 1000,
            "engine_cores_for_target": args.target * figures["engine_cpu_ms_per_request"] / 1000,
        }
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in line.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
