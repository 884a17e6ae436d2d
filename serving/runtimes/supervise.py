"""Keep one server process running: restart it when it dies, as Kubernetes would.

    python -m serving.runtimes.supervise --status S.json -- python -m serving --port 9001 ...

The supervisor runs the command, and when it exits without being asked to, starts it again
after a back-off (0.5 s doubling to 10 s; reset after a minute up). SIGTERM or SIGINT stops the
child gracefully (SIGTERM, then SIGKILL after ``--grace``) and then the supervisor. Each exit is
counted in the status file, so a deploy can tell a server that crashed while loading from one
that is still loading.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from packing.io import write_atomic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.runtimes.supervise")
    parser.add_argument("--status", type=Path, required=True, help="JSON file of exits so far")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds before SIGKILL")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")

    stopping = threading.Event()
    child: subprocess.Popen | None = None

    def stop(signum: int, _frame: object) -> None:
        stopping.set()
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    exits: list[dict] = []
    backoff = 0.5
    while not stopping.is_set():
        started = time.monotonic()
        child = subprocess.Popen(command)
        while child.poll() is None:
            try:
                child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
        if stopping.is_set():
            break
        exits.append({"code": child.returncode, "at": time.time()})
        write_atomic(args.status, json.dumps({"exits": exits}).encode())
        if time.monotonic() - started > 60:
            backoff = 0.5
        stopping.wait(backoff)
        backoff = min(backoff * 2, 10.0)
    if child is not None and child.poll() is None:
        try:
            child.wait(timeout=args.grace)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
