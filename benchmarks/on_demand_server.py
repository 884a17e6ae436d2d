"""On-demand models, the worst case (issue 25): one server holding N models with a memory budget
for K of them, driven by uniform traffic over all N, so nearly every request names a model that
is not loaded and the server loads and evicts all the time.

    python benchmarks/on_demand_server.py --models 100 --budget-models 10 --seconds 60 \\
        --concurrency 8 --out /tmp/on-demand

Traces N synthetic classifiers (reused from --out on a rerun), starts ``python -m serving`` with
every model on demand and ``--memory-budget`` = K × one model's weight bytes, drives it from
--concurrency closed-loop clients for --seconds, and samples /metrics every 0.2 s. Prints (and
writes DIR/figures.json): requests answered and failed, the cold-start share (answers with
``x-myriad-cold-start: 1``), loads and evictions per second, the most model bytes loaded against
the budget plus one model, the process's RSS at ready and at most, warm and cold P50/P90.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from packing.contracts import ModelSpec  # noqa: E402
from serving.build.tracing import TraceSettings, trace_to_store  # noqa: E402
from serving.runtimes.local import free_port  # noqa: E402
from serving.store import open_store  # noqa: E402

COLD = "x-myriad-cold-start"


def metric(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


def weight_bytes(store_dir: Path, model_id: str) -> int:
    import torch

    from serving.build.modeling import tensor_bytes

    module = torch.jit.load(str(store_dir / "models" / model_id / "cpu" / "model.ts"))
    return tensor_bytes(module.state_dict().values())


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--budget-models", type=int, default=10)
    parser.add_argument("--architecture", default="bert-mini")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-concurrent-loads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/on-demand"))
    args = parser.parse_args()

    store_dir = args.out / "store"
    store = open_store(f"file://{store_dir}")
    ids = [f"od-{i:04d}" for i in range(args.models)]
    started = time.perf_counter()
    settings = TraceSettings(profile_batch_sizes=(1,), profile_repeats=1)
    for model_id in ids:
        if not (store_dir / "models" / model_id / "cpu" / "manifest.json").exists():
            spec = ModelSpec(
                id=model_id, source=f"synthetic:{args.architecture}", num_labels=3, max_length=64
            )
            trace_to_store(spec, "cpu", store, settings)
    trace_s = time.perf_counter() - started
    one_model = weight_bytes(store_dir, ids[0])
    budget = args.budget_models * one_model

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(args.out / "server.log", "w")  # noqa: SIM115 - closed after the server stops
    server = subprocess.Popen(
        [sys.executable, "-m", "serving", "--models", ",".join(ids), "--store",
         f"file://{store_dir}", "--port", str(port), "--threads", str(args.threads),
         "--on-demand", *ids, "--memory-budget", str(budget),
         "--max-concurrent-loads", str(args.max_concurrent_loads)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MYRIAD_LOG_LEVEL": "warning"},
    )  # fmt: skip
    try:
        ready_at = time.perf_counter()
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited: {(args.out / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        ready_s = time.perf_counter() - ready_at
        rss_ready = metric(httpx.get(f"{url}/metrics").text, "myriad_process_resident_bytes")

        samples: list[tuple[float, float]] = []
        results: list[tuple[int, bool, float]] = []
        stop = threading.Event()
        lock = threading.Lock()

        def sample() -> None:
            with httpx.Client(timeout=10) as client:
                while not stop.is_set():
                    text = client.get(f"{url}/metrics").text
                    samples.append(
                        (
                            metric(text, "myriad_models_loaded_bytes"),
                            metric(text, "myriad_process_resident_bytes"),
                        )
                    )
                    time.sleep(0.2)

        def client_loop(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    model_id = rng.choice(ids)
                    begun = time.perf_counter()
                    try:
                        answer = client.post(f"{url}/predictions/{model_id}", json={"text": "hi"})
                        row = (answer.status_code, answer.headers.get(COLD) == "1")
                    except httpx.HTTPError:
                        row = (0, False)
                    with lock:
                        results.append((*row, time.perf_counter() - begun))

        before = httpx.get(f"{url}/metrics").text
        threads = [threading.Thread(target=sample)] + [
            threading.Thread(target=client_loop, args=(seed,)) for seed in range(args.concurrency)
        ]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        time.sleep(args.seconds)
        stop.set()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - began
        after = httpx.get(f"{url}/metrics").text
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

    loads = metric(after, "myriad_model_loads_total") - metric(before, "myriad_model_loads_total")
    evictions = metric(after, "myriad_model_evictions_total") - metric(
        before, "myriad_model_evictions_total"
    )
    load_s = metric(after, "myriad_model_load_seconds_sum") - metric(
        before, "myriad_model_load_seconds_sum"
    )
    answered = [r for r in results if r[0] == 200]
    warm = [r[2] for r in answered if not r[1]]
    cold = [r[2] for r in answered if r[1]]
    figures = {
        "models": args.models,
        "architecture": args.architecture,
        "budget_models": args.budget_models,
        "model_bytes": one_model,
        "budget_bytes": budget,
        "trace_seconds": round(trace_s, 1),
        "ready_seconds": round(ready_s, 2),
        "seconds": round(elapsed, 1),
        "concurrency": args.concurrency,
        "requests": len(results),
        "failed": len(results) - len(answered),
        "statuses": sorted({r[0] for r in results}),
        "requests_per_s": round(len(results) / elapsed, 1),
        "cold_fraction": round(len(cold) / max(1, len(answered)), 3),
        "loads": int(loads),
        "loads_per_s": round(loads / elapsed, 1),
        "evictions": int(evictions),
        "mean_load_ms": round(1000 * load_s / max(1, loads), 1),
        "max_loaded_bytes": int(max((s[0] for s in samples), default=0)),
        "budget_plus_one_model": budget + one_model,
        "rss_ready_mib": round(rss_ready / 2**20, 1),
        "rss_max_mib": round(max((s[1] for s in samples), default=0) / 2**20, 1),
        "rss_growth_over_budget_plus_one": round(
            (max((s[1] for s in samples), default=0) - rss_ready) / (budget + one_model), 2
        ),
        "warm_p50_ms": round(1000 * percentile(warm, 0.5), 1),
        "warm_p90_ms": round(1000 * percentile(warm, 0.9), 1),
        "cold_p50_ms": round(1000 * percentile(cold, 0.5), 1),
        "cold_p90_ms": round(1000 * percentile(cold, 0.9), 1),
        "warm_latency_spread_ms": round(1000 * statistics.pstdev(warm), 1) if warm else None,
    }
    (args.out / "figures.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
