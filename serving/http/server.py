"""Run one model server: the models of one plan server (or an explicit list) on uvicorn."""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from packing.contracts import ENGINE_PRECISIONS, Plan
from packing.errors import MyriadError
from packing.io import load
from serving import settings
from serving.backends.ondemand import OnDemandSettings, parse_bytes

SERVER_PORT_DEFAULT = 8080
# How a server runs its models (serving/backends/): one TorchScript module per model, or the
# cross-model engine over a stacked weight bank.
BACKENDS = ("torchscript", "cross-model")


def plan_server(plan: Plan, server_id: str) -> tuple[list[str], str, dict]:
    """One server of a plan: its model ids, its processor, and what the plan expects of it
    (its compute and its share of the instance price, exported in its metrics)."""
    try:
        server = plan.server(server_id)
    except KeyError:
        ids = ", ".join(s.id for s in plan.servers[:5]) + (", ..." if len(plan.servers) > 5 else "")
        raise ServerNotInPlan(
            f"plan {plan.plan_id} has no server {server_id!r}; its servers: {ids}"
        ) from None
    instance = next(i for i in plan.instances if i.id == server.instance)
    siblings = sum(1 for s in plan.servers if s.instance == server.instance)
    planned = {
        "server": server_id,
        "compute_utilization": server.compute_utilization,
        "cost_per_hour": instance.price_per_hour / max(1, siblings),
    }
    if server.on_demand_model_ids:
        # The plan's on-demand tier: those models load on first request, and all of them
        # (resident and cache) fit the server's planned memory (run_server reads these).
        planned["on_demand_model_ids"] = list(server.on_demand_model_ids)
        planned["memory_budget_bytes"] = server.memory_bytes
    return list(server.model_ids), server.processor, planned


class ServerNotInPlan(MyriadError):
    """``--server`` names no server of the plan."""


def serve(
    model_ids: list[str],
    processor: str,
    store_uri: str | None,
    host: str = "127.0.0.1",
    port: int = SERVER_PORT_DEFAULT,
    threads: int = 1,
    cache_dir: Path | None = None,
    engine: dict | None = None,
    batch: dict | None = None,
    front_ends: int = 1,
    optimise: bool = False,
    report_loading: bool = False,
    planned: dict | None = None,
    grpc_port: int | None = None,
    on_demand: OnDemandSettings | None = None,
) -> None:
    """``on_demand``: which models load on their first request, under which memory budgets
    (:mod:`serving.backends.ondemand`); None: every model resident.
    ``engine``: None for one TorchScript module per model, or the settings of the
    cross-model engine (:class:`serving.backends.crossmodel.CrossModelSettings` fields) for
    models of one BERT shape.
    ``front_ends`` > 1: that many HTTP processes in front of this one (:mod:`serving.http.workers`).
    ``optimise``: TorchScript modules frozen and optimised on CPU
    (:func:`serving.backends.torchscript.optimised`, a trade of resident memory for CPU).
    ``grpc_port``: also answer KServe v2 over gRPC on ``host:grpc_port``
    (:mod:`serving.grpc`), in this process (the engine process with front ends).
    ``report_loading``: print the address and each model's state as it loads (a failure with
    its reason), and stop with :class:`NothingLoaded` when no model could be loaded; for a
    person at a terminal (``myriad serve``), where a server that answers 503 forever helps no
    one. Deployed servers keep running and report through ``GET /models``.
    """
    import torch
    import uvicorn

    from serving.backends.torchscript import TorchScriptRepository
    from serving.http.app import create_app, serving_app
    from serving.store import open_store

    batching = None
    if engine is None:
        # ``threads`` batches at once, each on one intra-op thread: a small model's forward
        # gains nothing from splitting its GEMMs, while intra-op threads beside the compute
        # threads spin for work and take cores from them (measured: 2 threads of each, 514
        # requests/s; 2 compute threads of one intra-op thread each, 715).
        torch.set_num_threads(1)
        repository = TorchScriptRepository(
            open_store(store_uri),
            model_ids,
            processor,
            cache_dir,
            optimise=optimise,
            on_demand=on_demand,
        )
        workers = threads
        batching = dict(batch or {})
    else:
        from serving.backends.crossmodel import CrossModelRepository, CrossModelSettings

        # One scheduler thread runs every batch: its GEMMs get the intra-op threads.
        torch.set_num_threads(threads)

        # slots 0: as many as the models of each shape (all resident).
        engine_settings = CrossModelSettings(**{"slots": 0, **engine})
        repository = CrossModelRepository(
            open_store(store_uri), model_ids, processor, cache_dir, engine_settings, on_demand
        )
        # Requests wait on the event loop for the engine's futures, not on worker threads.
        workers = threads
    log_level = settings.current().server.log_level
    grpc_start, grpc_stop = grpc_hooks(host, grpc_port)
    if front_ends <= 1:
        app = serving_app(
            create_app(
                repository,
                workers=workers,
                batching=batching,
                planned=planned,
                on_startup=grpc_start,
                on_shutdown=grpc_stop,
            )
        )
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level=log_level,
                timeout_graceful_shutdown=30,
                lifespan="on",
                proxy_headers=False,  # nothing reads the client's address
            )
        )
        reporter = None
        if report_loading:
            print(f"serving {len(model_ids)} models on http://{host}:{port}", flush=True)
            if grpc_port is not None:
                print(f"KServe v2 over gRPC on {host}:{grpc_port}", flush=True)
            reporter = LoadReporter(repository, stop=lambda: setattr(server, "should_exit", True))
            reporter.start()
        server.run()
        if reporter is not None and reporter.nothing_loaded:
            raise NothingLoaded(
                f"none of the {len(model_ids)} models could be loaded; "
                "see the reasons above (`myriad trace` puts models in the store)"
            )
        return
    serve_behind_front_ends(
        repository,
        workers,
        batching,
        host,
        port,
        front_ends,
        log_level,
        planned,
        grpc_hooks=(grpc_start, grpc_stop),
    )


def grpc_hooks(host: str, port: int | None) -> tuple[list, list]:
    """The app's startup and shutdown hooks that run the gRPC service on ``port`` (none for
    None): grpc is imported only by a server that answers it."""
    if port is None:
        return [], []
    from serving.grpc.service import grpc_hooks as hooks

    start, stop = hooks(host, port)
    return [start], [stop]


class NothingLoaded(MyriadError):
    """Every model of a server failed to load."""


class LoadReporter(threading.Thread):
    """Prints each model's state as it changes until the repository has tried them all, then
    calls ``stop`` if none is ready."""

    def __init__(self, repository: Any, stop: Callable[[], None], poll_s: float = 0.1) -> None:
        super().__init__(name="load-reporter", daemon=True)
        self.repository = repository
        self.stop = stop
        self.poll_s = poll_s
        self.nothing_loaded = False

    def run(self) -> None:
        seen: dict[str, str] = {}
        while True:
            finished = self.repository.loaded
            for entry in self.repository.describe():
                state = entry["state"]
                if seen.get(entry["id"]) == state or state == "pending":
                    continue
                seen[entry["id"]] = state
                detail = {
                    "ready": f" in {entry['load_seconds']:.1f} s",
                    "failed": f": {entry['reason']}",
                }.get(state, "")
                print(f"  {entry['id']}: {state}{detail}", flush=True)
            if finished:
                break
            time.sleep(self.poll_s)
        if not any(m.ready for m in self.repository.models.values()):
            self.nothing_loaded = True
            self.stop()


def serve_behind_front_ends(
    repository: object,
    workers: int,
    batching: dict | None,
    host: str,
    port: int,
    front_ends: int,
    log_level: str,
    planned: dict | None = None,
    grpc_hooks: tuple[list, list] = ([], []),
) -> None:
    """This process owns the models and serves on a private loopback port; ``front_ends``
    processes answer ``host:port`` and hand it the hot routes over ZeroMQ. ``grpc_hooks``:
    this process answers gRPC itself (its RPCs go straight to the data plane)."""
    import functools

    import uvicorn

    from serving.http.app import create_app, serving_app
    from serving.http.fastpath import answer_call
    from serving.http.workers import EngineEndpoint, FrontEnds, engine_address, listening_socket

    public = listening_socket(host, port)
    private = listening_socket("127.0.0.1", 0)
    address = engine_address()
    endpoint: EngineEndpoint | None = None
    processes = FrontEnds(
        front_ends, public, f"http://127.0.0.1:{private.getsockname()[1]}", address
    )

    async def start(app: object) -> None:
        nonlocal endpoint
        plane = app.state.dataplane
        endpoint = EngineEndpoint(functools.partial(answer_call, plane), address, plane)
        await endpoint.start()
        processes.start()

    async def stop(app: object) -> None:
        processes.stop()  # each front end drains its calls while the endpoint still answers
        if endpoint is not None:
            await endpoint.close()

    app = create_app(
        repository,
        workers=workers,
        batching=batching,
        on_startup=[start, *grpc_hooks[0]],
        on_shutdown=[*grpc_hooks[1], stop],
        planned=planned,
    )
    config = uvicorn.Config(
        serving_app(app), log_level=log_level, timeout_graceful_shutdown=30, lifespan="on"
    )
    try:
        uvicorn.Server(config).run(sockets=[private])
    finally:
        processes.stop(timeout_s=5)  # when startup failed: no front end is left behind


class ServerOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Everything one server runs with: ``python -m serving``'s flags and ``myriad serve``'s
    options are both this struct (:func:`parse_server_args`, :func:`run_server`)."""

    model_ids: list[str]
    processor: str = "cpu"
    store_uri: str | None = None
    host: str = "127.0.0.1"
    port: int = SERVER_PORT_DEFAULT
    # KServe v2 over gRPC on this port too (None: HTTP only).
    grpc_port: int | None = None
    threads: int = 1
    workers: int = 1
    backend: str = "torchscript"  # or cross-model
    optimise: bool = False
    slots: int | None = None
    precision: str = "fp32"
    int8: bool = False
    max_batch: int = 32
    max_wait_ms: float = 0.0
    queue: int = 256
    deadline_ms: float = 30_000.0
    report_loading: bool = False
    # From the plan (--plan/--server): server, compute_utilization, cost_per_hour, and with an
    # on-demand tier on_demand_model_ids and memory_budget_bytes.
    planned: dict | None = None
    # The on-demand tier (the plan's, when these are left empty): models loaded on first
    # request, and the budgets in bytes they are evicted under.
    on_demand: list[str] = []
    memory_budget: int | None = None
    host_memory_budget: int | None = None
    max_concurrent_loads: int = 2
    # Benchmarks only: the cross-model engine answers zeros instead of running its forward.
    null_forward: bool = False


def server_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    parser.add_argument("--plan", type=Path, help="plan.json; serve the models of --server")
    parser.add_argument("--server", help="server id in the plan")
    parser.add_argument("--models", help="comma-separated model ids (instead of --plan)")
    parser.add_argument("--processor", default="cpu", choices=["cpu", "gpu", "inf"])
    parser.add_argument(
        "--store", help="artifact store URI (default: $MYRIAD_STORE or ./.myriad/store)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=SERVER_PORT_DEFAULT)
    parser.add_argument(
        "--grpc-port",
        type=int,
        metavar="PORT",
        help="also answer KServe v2 over gRPC (inference.GRPCInferenceService) on this port, in "
        "the process that owns the models (8081 in containers); default: HTTP only",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="compute threads: TorchScript batches run at once (one intra-op thread each), or the "
        "cross-model engine's intra-op threads",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="HTTP front-end processes; above 1 this process keeps the models and the "
        "front ends hand it requests over ZeroMQ",
    )
    parser.add_argument(
        "--backend",
        default="torchscript",
        choices=BACKENDS,
        help="torchscript: one module per model; cross-model: the cross-model engine, which "
        "batches requests to different BERT models of one shape together",
    )
    parser.add_argument(
        "--optimise",
        action="store_true",
        help="torchscript on cpu: serve each module frozen and optimised for inference (about "
        "30%% less CPU per forward, a pre-packed copy of the linear weights resident per model)",
    )
    parser.add_argument(
        "--report-loading",
        action="store_true",
        help="print each model's state as it loads; exit 2 when none could be loaded",
    )
    parser.add_argument("--slots", type=int, help="cross-model: models resident at once")
    parser.add_argument(
        "--precision", choices=[p for p in ENGINE_PRECISIONS if p != "int8"], default="fp32"
    )
    parser.add_argument("--int8", action="store_true", help="cross-model: int8 linear weights")
    parser.add_argument("--max-batch", type=int, default=32, help="texts per model call")
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=0.0,
        help="how long a batch may wait to fill (0: batch only what queued while busy)",
    )
    parser.add_argument("--queue", type=int, default=256, help="texts waiting per model")
    parser.add_argument("--deadline-ms", type=float, default=30_000.0)
    parser.add_argument(
        "--on-demand",
        nargs="+",
        default=[],
        metavar="MODEL_ID",
        help="models loaded on their first request (artifacts verified into the cache at start) "
        "and evicted under the memory budget; default: the plan's on-demand models",
    )
    parser.add_argument(
        "--memory-budget",
        type=size_argument,
        metavar="SIZE",
        help="bytes of models the device may hold (host memory on a CPU server), e.g. 512MiB, "
        "2GB; default: the plan server's memory with on-demand models, else no limit",
    )
    parser.add_argument(
        "--host-memory-budget",
        type=size_argument,
        metavar="SIZE",
        help="bytes of the cross-model engine's host tier (its models' weights off the device)",
    )
    parser.add_argument(
        "--max-concurrent-loads",
        type=int,
        default=2,
        metavar="N",
        help="on-demand loads at once (default 2)",
    )
    parser.add_argument(
        "--null-forward",
        action="store_true",
        help="for benchmarks only: the cross-model engine batches as usual but answers zeros "
        "instead of running its forward, so the server's own cost per request can be measured",
    )
    return parser


def size_argument(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_server_args(argv: list[str] | None = None) -> ServerOptions:
    parser = server_parser()
    args = parser.parse_args(argv)
    planned = None
    if args.plan:
        if not args.server:
            parser.error("--plan needs --server")
        model_ids, processor, planned = plan_server(load(args.plan, Plan), args.server)
    elif args.models:
        model_ids, processor = [m for m in args.models.split(",") if m], args.processor
    else:
        parser.error("give --plan PLAN --server ID, or --models a,b,c")
    return ServerOptions(
        model_ids=model_ids,
        processor=processor,
        store_uri=args.store,
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        threads=args.threads,
        workers=args.workers,
        backend=args.backend,
        optimise=args.optimise,
        slots=args.slots,
        precision=args.precision,
        int8=args.int8,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        queue=args.queue,
        deadline_ms=args.deadline_ms,
        report_loading=args.report_loading,
        planned=planned,
        on_demand=list(args.on_demand),
        memory_budget=args.memory_budget,
        host_memory_budget=args.host_memory_budget,
        max_concurrent_loads=args.max_concurrent_loads,
        null_forward=args.null_forward,
    )


def run_server(options: ServerOptions) -> None:
    settings.use_serial_tokenizers()  # before the first encode; the front ends inherit it
    engine = None
    if options.backend == "cross-model":
        engine = {
            "precision": options.precision,
            "int8": options.int8,
            "max_batch": options.max_batch,
            "max_wait_s": options.max_wait_ms / 1000,
            "deadline_s": options.deadline_ms / 1000,
        }
        if options.slots:
            engine["slots"] = options.slots
        if options.null_forward:
            engine["null_forward"] = True
    batch = {
        "max_batch": options.max_batch,
        "max_wait_s": options.max_wait_ms / 1000,
        "per_model_queue": options.queue,
        "deadline_s": options.deadline_ms / 1000,
    }
    serve(
        options.model_ids,
        options.processor,
        options.store_uri,
        options.host,
        options.port,
        options.threads,
        engine=engine,
        batch=batch,
        front_ends=options.workers,
        optimise=options.optimise,
        report_loading=options.report_loading,
        planned=options.planned,
        grpc_port=options.grpc_port,
        on_demand=on_demand_settings(options),
    )


class OnDemandOptionError(MyriadError):
    """The on-demand options do not fit the server's models."""


def on_demand_settings(options: ServerOptions) -> OnDemandSettings | None:
    """The server's on-demand tier: ``--on-demand`` and the budgets, else the plan's tier
    (its on-demand models, under a budget of the server's planned memory); None: all resident."""
    planned = options.planned or {}
    given = [m for item in options.on_demand for m in item.split(",") if m]
    model_ids = given or list(planned.get("on_demand_model_ids", []))
    if not model_ids:
        return None
    unknown = sorted(set(model_ids) - set(options.model_ids))
    if unknown:
        raise OnDemandOptionError(
            f"--on-demand names {', '.join(unknown[:5])}, not among this server's models"
        )
    if options.max_concurrent_loads < 1:
        raise OnDemandOptionError("--max-concurrent-loads must be at least 1")
    budget = options.memory_budget
    if budget is None:
        budget = planned.get("memory_budget_bytes") or None
    return OnDemandSettings(
        model_ids=frozenset(model_ids),
        memory_budget_bytes=budget,
        host_memory_budget_bytes=options.host_memory_budget,
        max_concurrent_loads=options.max_concurrent_loads,
        load_wait_s=options.deadline_ms / 1000,
    )


def main(argv: list[str] | None = None) -> None:
    run_server(parse_server_args(argv))


if __name__ == "__main__":
    main()
