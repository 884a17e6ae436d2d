"""The load generator's own ceiling: requests/s against a trivial endpoint, per process.

    python benchmarks/loadgen.py --duration 5 --concurrency 32

starts the trivial loopback server of the tests (tests/sleep_server.py, no sleep), then runs
closed loops with 1 and 2 generator processes and prints requests/s, the generator's CPU
seconds per request (its ceiling per core is the inverse) and the self-check's verdict. On a
2-core machine the server shares the cores, so the requests/s are a floor for the ceiling;
the per-CPU-second figure is the generator's own cost.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest import generator as loadgen  # noqa: E402
from tests.servers import free_port  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)

    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "tests/sleep_server.py"), str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(f"{url}/ping", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        targets = loadgen.Targets(routes={f"m{i}": [f"{url}/predictions/m{i}"] for i in range(100)})
        for processes in args.processes:
            recorder = loadgen.run(
                "closed",
                targets,
                loadgen.Shape(),
                loadgen.Bounds(duration_s=args.duration),
                args.concurrency,
                processes=processes,
            )
            summary = recorder.summary("closed", concurrency=args.concurrency)
            print(
                json.dumps(
                    {
                        "processes": processes,
                        "concurrency": args.concurrency,
                        "requests_per_s": round(summary["requests_per_s"]),
                        "p50_ms": round(summary["p50_ms"], 2),
                        "p99_ms": round(summary["p99_ms"], 2),
                        "generator_cpu_us_per_request": round(
                            1e6 * recorder.cpu_s / max(summary["completed"], 1), 1
                        ),
                        "requests_per_generator_cpu_s": round(
                            summary["completed"] / max(recorder.cpu_s, 1e-9)
                        ),
                        "errors": summary["errors"],
                        "saturated": summary["generator"]["saturated"],
                    }
                )
            )
    finally:
        server.terminate()
        server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
