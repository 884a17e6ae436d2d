"""One model server under load with 1, 10 and 100 resident models, and its own overhead.

    python benchmarks/serving.py --arch bert-tiny --concurrency 8 --seconds 5

traces up to 100 synthetic models once (into ``--store``, reused by later runs), then for each
model count starts ``python -m serving`` with that many models and drives it with the load
generator (closed loop, uniform over the models), printing requests/s and P50/P90/P99. The
overhead figure compares a single request over HTTP (concurrency 1, one model) with the same
model called directly in this process (``TorchScriptModel.predict``): medians of both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest import generator as loadgen  # noqa: E402
from packing.contracts import ModelSpec  # noqa: E402
from serving.backends.torchscript import TorchScriptModel  # noqa: E402
from serving.build.tracing import TraceSettings, trace_to_store  # noqa: E402
from serving.store import artifact_prefix, open_store  # noqa: E402
from tests.servers import model_server  # noqa: E402

TEXT = "the service was quick and the staff were friendly"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="bert-tiny")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--store", default=f"file://{ROOT}/.myriad/bench-serving-store")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    store = open_store(args.store)
    specs = [
        ModelSpec(id=f"srv-{i:03d}", source=f"synthetic:{args.arch}", max_length=64)
        for i in range(max(args.counts))
    ]
    settings = TraceSettings(profile_batch_sizes=(1,), profile_repeats=1)
    for spec in specs:
        trace_to_store(spec, "cpu", store, settings)  # unchanged models are skipped

    import torch

    torch.set_num_threads(args.threads)
    direct = TorchScriptModel(specs[0].id, "cpu", artifact_prefix(specs[0].id, "cpu"))
    direct.load(store, None)
    samples = []
    for _ in range(300):
        started = time.perf_counter()
        direct.predict([TEXT])
        samples.append(time.perf_counter() - started)
    direct_ms = statistics.median(samples) * 1000

    log_dir = Path(args.store.removeprefix("file://")).parent
    for count in args.counts:
        ids = [s.id for s in specs[:count]]
        with model_server(
            args.store,
            ids,
            log_dir / f"bench-serving-{count}.log",
            extra_args=("--threads", str(args.threads)),
        ) as url:
            targets = loadgen.Targets(routes={m: [f"{url}/predictions/{m}"] for m in ids})
            figures = {}
            for label, concurrency in (("single", 1), ("loaded", args.concurrency)):
                if label == "single" and count != 1:
                    continue
                recorder = loadgen.run(
                    "closed",
                    targets,
                    loadgen.Shape(tokens=9),
                    loadgen.Bounds(duration_s=args.seconds),
                    concurrency,
                )
                summary = recorder.summary("closed", concurrency=concurrency)
                figures[label] = {
                    "concurrency": concurrency,
                    "requests_per_s": round(summary["requests_per_s"], 1),
                    "p50_ms": round(summary["p50_ms"], 2),
                    "p90_ms": round(summary["p90_ms"], 2),
                    "p99_ms": round(summary["p99_ms"], 2),
                    "errors": summary["errors"],
                    "generator_saturated": summary["generator"]["saturated"],
                }
            result = {"models": count, "arch": args.arch, **figures}
            if "single" in figures:
                result["direct_call_p50_ms"] = round(direct_ms, 3)
                result["server_overhead_p50_ms"] = round(figures["single"]["p50_ms"] - direct_ms, 3)
            print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
