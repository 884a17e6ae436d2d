"""What one engine process costs per request when front ends feed it at a high rate.

``frontend_cost.py`` measures the engine process behind real front ends, driven over HTTP by
a load generator on the same two cores: there the rate, and with it how many requests travel
in one frame, is set by what this machine's HTTP side can drive (a few thousand requests/s,
two to four requests a frame). This benchmark takes HTTP out: it starts the same server
(``python -m serving --workers 2``: the engine process with its ZeroMQ endpoint; its two front
ends stay idle) and connects ``--connections`` ZeroMQ DEALER sockets to the engine process as
front ends would, each keeping ``--in-flight`` frames of ``--frame-size`` tokenised requests
(12-word texts through the models' own tokenizers, spread uniformly over the models) in flight,
closed loop. So the engine process's CPU per request is measured at the frame sizes a busy node's
front ends send, which is what decides whether one engine process can feed a GPU at 20,000
requests/s.

    python -m benchmarks.engine_feed --arch bert-micro --null-forward --frame-sizes 1 4 16

CPU is read from /proc for the engine process only (the driver runs in this process),
``engine_compute_cpu_ms_per_request`` being its threads but the event loop and libzmq's (the
cross-model engine's scheduler thread), as in ``frontend_cost.py``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import msgspec

from benchmarks.frontend_cost import interleaved_medians, thread_cpu, traced_server
from benchmarks.serving_vs_baseline import ROOT, cpu_seconds
from loadtest.generator import text_of
from serving.http import frames
from serving.http.frontend import model_info, tokenise
from serving.http.workers import DESCRIBE, FRAME, REPLY, engine_address

# Models whose tokenizers the driver fetches (see _feed).
DESCRIBED = 8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--frame-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--connections", type=int, default=4, help="front ends simulated")
    parser.add_argument("--in-flight", type=int, default=4, help="frames per connection")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arch", default="bert-micro", choices=["bert-tiny", "bert-micro"])
    parser.add_argument("--null-forward", action="store_true")
    parser.add_argument("--store", default=f"file://{ROOT}/.myriad/bench-frontend-store")
    parser.add_argument(
        "--server-roots", type=Path, nargs="+", default=[ROOT], help="checkouts to compare"
    )
    args = parser.parse_args(argv)

    ids, command = traced_server(args.arch, args.models, args.store, args.null_forward)
    command += ["--workers", "2"]
    medians = interleaved_medians(
        [(root, size) for root in args.server_roots for size in args.frame_sizes],
        args.rounds,
        lambda key: command,
        lambda key: ROOT / ".myriad" / "bench-engine-feed.log",
        lambda url, pid, key: feed(
            pid, ids, key[1], args.connections, args.in_flight, args.seconds
        ),
    )
    for (root, size), figures in medians.items():
        line = {
            "server_root": str(root),
            "arch": args.arch,
            "null_forward": args.null_forward,
            "frame_size": size,
            "connections": args.connections,
            "in_flight": args.in_flight,
            **figures,
            # One engine process has one core of Python: the rate at which it would be busy.
            "engine_saturates_at_requests_per_s": 1000 / figures["engine_cpu_ms_per_request"],
        }
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in line.items()}))
    return 0


def feed(
    pid: int,
    ids: list[str],
    size: int,
    connections: int,
    in_flight: int,
    seconds: float,
    tokens: int = 12,
) -> dict:
    """The engine process ``pid`` (a server with ``--workers`` > 1) fed for ``seconds``:
    requests/s it answered, their P50/P90 and failures, its CPU per request (and of it the
    scheduler threads'). Also the device suite's ``engine_feed`` figures on a GPU."""
    import zmq

    context = zmq.Context.instance()
    sockets = []
    for _ in range(connections):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(engine_address_of(pid))
        sockets.append(sock)
    try:
        return _feed(sockets, pid, ids, size, in_flight, seconds, tokens)
    finally:
        for sock in sockets:
            sock.close()


def engine_address_of(pid: int) -> str:
    # The engine process names its socket by its own pid (serving.http.workers.engine_address).
    return engine_address().rsplit("-", 1)[0] + f"-{pid}.sock"


def _feed(
    sockets: list,
    pid: int,
    ids: list[str],
    size: int,
    in_flight: int,
    seconds: float,
    tokens: int,
):
    import zmq

    rng = random.Random(7)
    first = sockets[0]
    # What a front end asks once per model, for a few of them (a tokenizer per model costs
    # seconds over hundreds of bert-base models): the models of one engine share its
    # vocabulary, so their ids are valid for every other model too.
    infos = []
    for number, model_id in enumerate(ids[:DESCRIBED]):
        first.send_multipart([DESCRIBE, number.to_bytes(8, "little"), model_id.encode()])
        _, _, reply = first.recv_multipart()
        described = msgspec.msgpack.decode(reply)
        if described is None:
            raise RuntimeError(f"the engine process cannot describe model {model_id}")
        infos.append(model_info(described))
    # Requests as a front end tokenises them: one text of ``tokens`` words each, uniformly
    # over the models.
    pool = []
    for index in range(1024):
        model_id = ids[rng.randrange(len(ids))]
        input_ids, mask = tokenise(infos[index % len(infos)], [text_of(tokens, rng)])
        pool.append((model_id, input_ids, mask))
    sent: dict[int, float] = {}
    latencies: list[float] = []
    next_id = 1

    def send(sock) -> None:
        nonlocal next_id
        items, now = [], time.perf_counter()
        for _ in range(size):
            model_id, input_ids, mask = pool[next_id % len(pool)]
            items.append(frames.encode_ids_item(next_id, model_id, None, input_ids, mask))
            sent[next_id] = now
            next_id += 1
        sock.send_multipart([FRAME, frames.request_frame(items)])

    poller = zmq.Poller()
    credit = {}
    for sock in sockets:
        poller.register(sock, zmq.POLLIN)
        credit[sock] = 0
    before_cpu, before_threads = cpu_seconds(pid), thread_cpu(pid)
    started = time.perf_counter()
    for sock in sockets:
        for _ in range(in_flight):
            send(sock)
    answered = failed = 0
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for sock, _ in poller.poll(100):
            while True:
                try:
                    kind, data = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if kind != REPLY:
                    continue
                now = time.perf_counter()
                for item in frames.decode_reply_frame(data):
                    latencies.append(now - sent.pop(item.request_id))
                    answered += 1
                    failed += item.status != 200
                    credit[sock] += 1
                while credit[sock] >= size:  # one frame answered: send the next
                    credit[sock] -= size
                    send(sock)
    elapsed = time.perf_counter() - started
    after_cpu, after_threads = cpu_seconds(pid), thread_cpu(pid)
    if not answered:
        raise RuntimeError("the engine process answered nothing")
    compute = sum(after_threads.get(t, 0.0) - before_threads.get(t, 0.0) for t in after_threads)
    engine_ms = 1000 * (after_cpu - before_cpu) / answered
    latencies.sort()
    return {
        "requests_per_s": answered / elapsed,
        "failed": failed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p90_ms": 1000 * latencies[int(len(latencies) * 0.9)],
        "engine_cpu_ms_per_request": engine_ms,
        "engine_compute_cpu_ms_per_request": 1000 * compute / answered,
        "engine_loop_cpu_ms_per_request": engine_ms - 1000 * compute / answered,
    }


if __name__ == "__main__":
    raise SystemExit(main())
