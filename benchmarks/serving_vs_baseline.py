"""Myriad's server against the naive design, side by side in one run: the same 100
``bert-mini`` classifiers from one store, closed-loop clients, this machine.

    python benchmarks/serving_vs_baseline.py --models 100 --clients 16 --seconds 5 --rounds 3

Each round starts the seed-style baseline (``benchmarks/baseline_server.py``: FastAPI, one
TorchScript module per model, one request per forward) and Myriad's server with each backend
(TorchScript with its batcher; the cross-model engine), drives each for ``--seconds``, and
reads the server process's CPU time from /proc, so the figures are requests/s, P50/P90/P99 and
server CPU milliseconds per request. Medians over the rounds are printed as one JSON line per
server, with their ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest import generator as loadgen  # noqa: E402
from packing.contracts import ModelSpec  # noqa: E402
from serving.build.tracing import TraceSettings, trace_to_store  # noqa: E402
from serving.runtimes.local import free_port  # noqa: E402
from serving.store import open_store  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (a server's front ends under ``--workers``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                found.append(int(entry.name))
    return found


def process_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the server process (``engine``) and of its children (``front_ends``)."""
    return {"engine": cpu_seconds(pid), "front_ends": sum(cpu_seconds(c) for c in children(pid))}


def start(
    command: list[str], url: str, log: Path, timeout_s: float = 300, cwd: Path | None = None
) -> subprocess.Popen:
    """``command`` started (in ``cwd``: ``python -m serving`` imports from it) and ready."""
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=cwd)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{command[:4]} did not become ready: {log.read_text()[-2000:]}")
        time.sleep(0.5)


def measure(url: str, pid: int, ids: list[str], clients: int, seconds: float) -> dict:
    targets = loadgen.Targets(routes={m: [f"{url}/predictions/{m}"] for m in ids})
    before = process_cpu(pid)
    recorder = loadgen.run(
        "closed", targets, loadgen.Shape(tokens=12), loadgen.Bounds(duration_s=seconds), clients
    )
    after = process_cpu(pid)
    summary = recorder.summary("closed", concurrency=clients)
    if not summary["completed"]:
        raise RuntimeError(f"{url}: no request completed: {summary['errors']}")
    requests = max(1, round(summary["requests_per_s"] * summary["duration_s"]))
    engine = after["engine"] - before["engine"]
    front_ends = after["front_ends"] - before["front_ends"]
    return {
        "requests_per_s": summary["requests_per_s"],
        "p50_ms": summary["p50_ms"],
        "p90_ms": summary["p90_ms"],
        "p99_ms": summary["p99_ms"],
        # All of the server's processes; with --workers, split into the engine process and
        # the front ends.
        "cpu_ms_per_request": 1000 * (engine + front_ends) / requests,
        "engine_cpu_ms_per_request": 1000 * engine / requests,
        "front_end_cpu_ms_per_request": 1000 * front_ends / requests,
        "generator_cpu": summary["generator"]["generator_cpu"],
        "error_rate": summary["error_rate"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="bert-mini")
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", default=f"file://{ROOT}/.myriad/bench-baseline-store")
    parser.add_argument(
        "--servers",
        nargs="+",
        default=[
            "baseline",
            "torchscript",
            "torchscript-opt",
            "torchscript-opt-2t",
            "engine",
            "engine-2fe",
        ],
        help="torchscript-opt: modules frozen and optimised (--optimise); -2t: two batches at "
        "once (--threads 2); engine-2fe: the engine behind two front-end processes (--workers 2)",
    )
    args = parser.parse_args(argv)

    store = open_store(args.store)
    ids = [f"mini-{i:03d}" for i in range(args.models)]
    settings = TraceSettings(profile_batch_sizes=(1,), profile_repeats=1)
    for model_id in ids:  # unchanged models are skipped
        spec = ModelSpec(id=model_id, source=f"synthetic:{args.arch}", max_length=64)
        trace_to_store(spec, "cpu", store, settings)

    logs = Path(args.store.removeprefix("file://")).parent
    myriad = [sys.executable, "-m", "serving", "--models", ",".join(ids), "--store", args.store]
    commands = {
        "baseline": [sys.executable, str(ROOT / "benchmarks/baseline_server.py"),
                     "--store", args.store, "--models", ",".join(ids)],
        "torchscript": myriad,
        "torchscript-opt": [*myriad, "--optimise"],
        "torchscript-opt-2t": [*myriad, "--optimise", "--threads", "2"],
        "engine": [*myriad, "--backend", "cross-model", "--max-wait-ms", "1"],
        "engine-2fe": [*myriad, "--backend", "cross-model", "--max-wait-ms", "1", "--workers", "2"],
    }  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name in args.servers}
    for _ in range(args.rounds):
        for name in args.servers:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            process = start([*commands[name], "--port", str(port)], url, logs / f"bench-{name}.log")
            try:
                runs[name].append(measure(url, process.pid, ids, args.clients, args.seconds))
            finally:
                process.terminate()
                process.wait(timeout=30)
    medians = {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for name, results in runs.items()
    }
    base = medians.get("baseline")
    for name, figures in medians.items():
        line = {"server": name, "models": args.models, "clients": args.clients, **figures}
        if base and name != "baseline":
            line["requests_per_s_vs_baseline"] = figures["requests_per_s"] / base["requests_per_s"]
            line["p90_vs_baseline"] = figures["p90_ms"] / base["p90_ms"]
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in line.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
