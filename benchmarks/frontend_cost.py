"""The front end's own cost: requests/s and CPU per request with a trivial model behind it, in
one process and behind N front-end processes (``--workers N``), and from it the cores a node
needs for a target rate.

    python -m benchmarks.frontend_cost --models 20 --clients 32 --seconds 5 --rounds 3

The models are ``bert-tiny`` (hidden 32, 2 layers) at 16 tokens, batched across models by the
cross-model engine: a forward of about 0.1 ms per text on this machine's CPU, so the figures are
mostly the HTTP parsing, the hand-off to the engine process, the data plane and the answer.
``--arch bert-micro`` (hidden 8, 1 layer) makes the forward next to nothing, for the engine
process's own overhead ("a trivial model behind it"): what a GPU server's engine process
spends in Python per request while the device does the arithmetic. CPU time is read
from /proc per process, so the front ends' share and the engine process's share are apart:
``front_end_cores_for_<target>`` is how many cores the front ends need at each ``--target``
requests/s, ``engine_cores_for_<target>`` the same for the engine process, which has one core's
worth of Python (above 1.0 it, not HTTP, caps the node).

The engine process's CPU is split by thread: ``engine_compute_cpu_ms_per_request`` is every
thread but the main one and libzmq's I/O threads, in effect the cross-model engine's scheduler
thread (forming batches and running the forward: on a GPU server the forward's CPU side);
``engine_loop_cpu_ms_per_request`` the rest (its event loop: ZeroMQ, frames, the data plane,
metrics; with one process also HTTP, tokenising and answers).
``--server-roots`` runs the servers of other checkouts in the same run (a before and after):

    python -m benchmarks.frontend_cost --workers 2 --server-roots . /tmp/before
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.serving_vs_baseline import ROOT, TICKS, measure, start
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
    parser.add_argument(
        "--target", type=float, nargs="+", default=[8000.0, 20000.0], help="requests/s to size for"
    )
    parser.add_argument(
        "--arch",
        default="bert-tiny",
        choices=["bert-tiny", "bert-micro"],
        help="the models' synthetic architecture (bert-micro: a forward that costs ~nothing)",
    )
    parser.add_argument("--store", default=f"file://{ROOT}/.myriad/bench-frontend-store")
    parser.add_argument(
        "--server-roots",
        nargs="+",
        type=Path,
        default=[ROOT],
        help="checkouts whose server to measure, each in turn within every round",
    )
    parser.add_argument(
        "--null-forward",
        action="store_true",
        help="servers started with --null-forward (the engine answers zeros without running "
        "its forward): the server's own cost per request",
    )
    args = parser.parse_args(argv)

    ids, command = traced_server(args.arch, args.models, args.store, args.null_forward)
    logs = ROOT / ".myriad"

    def measure_one(url: str, pid: int, key: tuple[Path, int]) -> dict:
        before = thread_cpu(pid)
        figures = measure(url, pid, ids, args.clients, args.seconds)
        after = thread_cpu(pid)
        compute = sum(after.get(t, 0.0) - before.get(t, 0.0) for t in after)
        requests = max(1, round(figures["requests_per_s"] * args.seconds))
        figures["engine_compute_cpu_ms_per_request"] = 1000 * compute / requests
        figures["engine_loop_cpu_ms_per_request"] = (
            figures["engine_cpu_ms_per_request"] - 1000 * compute / requests
        )
        return figures

    medians = interleaved_medians(
        [(root, workers) for root in args.server_roots for workers in args.workers],
        args.rounds,
        lambda key: [*command, "--workers", str(key[1])],
        lambda key: logs / f"bench-frontend-{key[1]}.log",
        measure_one,
    )
    for (root, workers), figures in medians.items():
        # One process: its CPU is the front end's and the engine's at once.
        front_end_ms = figures["front_end_cpu_ms_per_request"] if workers > 1 else None
        line = {
            "server_root": str(root),
            "arch": args.arch,
            "null_forward": args.null_forward,
            "front_end_processes": workers,
            "models": args.models,
            "clients": args.clients,
            **figures,
        }
        for target in args.target:
            rate = f"{target:.0f}"
            line[f"front_end_cores_for_{rate}"] = (
                None if front_end_ms is None else target * front_end_ms / 1000
            )
            line[f"engine_cores_for_{rate}"] = target * figures["engine_cpu_ms_per_request"] / 1000
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in line.items()}))
    return 0


def interleaved_medians(
    keys: list[tuple[Path, Any]],
    rounds: int,
    command_for: Callable[[tuple[Path, Any]], list[str]],
    log_for: Callable[[tuple[Path, Any]], Path],
    measure_one: Callable[[str, int, tuple[Path, Any]], dict],
) -> dict[tuple[Path, Any], dict]:
    """Each key's server (``(checkout, variant)``: ``command_for(key)`` run in the checkout)
    started, measured by ``measure_one(url, pid, key)`` and stopped once a round, the keys
    interleaved in every round so that the machine's drift falls on all of them; the median of
    each figure over the rounds, per key."""
    runs: dict[tuple[Path, Any], list[dict]] = {key: [] for key in keys}
    for _ in range(rounds):
        for key in runs:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            process = start([*command_for(key), "--port", str(port)], url, log_for(key), cwd=key[0])
            try:
                runs[key].append(measure_one(url, process.pid, key))
            finally:
                process.terminate()
                process.wait(timeout=60)
    return {
        key: {name: statistics.median(r[name] for r in results) for name in results[0]}
        for key, results in runs.items()
    }


def traced_server(
    arch: str, models: int, store_uri: str, null_forward: bool
) -> tuple[list[str], list[str]]:
    """``models`` synthetic models of ``arch`` traced into the store (unchanged ones skipped),
    and the command of a cross-model server over them (``--workers`` and ``--port`` to add)."""
    store = open_store(store_uri)
    ids = [f"{arch.removeprefix('bert-')}-{i:03d}" for i in range(models)]
    settings = TraceSettings(profile_batch_sizes=(1,), profile_repeats=1)
    for model_id in ids:
        spec = ModelSpec(id=model_id, source=f"synthetic:{arch}", max_length=16)
        trace_to_store(spec, "cpu", store, settings)
    command = [sys.executable, "-m", "serving", "--models", ",".join(ids), "--store", store_uri,
               "--backend", "cross-model", "--max-wait-ms", "0.5"]  # fmt: skip
    if null_forward:
        command.append("--null-forward")
    return ids, command


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid`` but its main thread (the event loop) and
    libzmq's I/O threads (``ZMQbg/...``): the cross-model engine's scheduler thread (and, on
    the old path, the threads that tokenised and ran TorchScript batches)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            head, tail = (task / "stat").read_text().rsplit(")", 1)
        except OSError:
            continue
        if int(task.name) == pid or head.split("(", 1)[1].startswith("ZMQbg"):
            continue
        fields = tail.split()
        found[int(task.name)] = (int(fields[11]) + int(fields[12])) / TICKS
    return found


if __name__ == "__main__":
    raise SystemExit(main())
