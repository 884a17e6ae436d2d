"""The ``myriad`` command line: one command per pipeline step plus the operational ones
(serve, gateway, status, teardown, publish), each a thin layer of options and output over the
functions the tasks wrap. Longer than most modules because every command's options and help
live here, in one typer app; the work is elsewhere."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn, get_args

import typer
from rich.console import Console
from rich.table import Table

from flows import logs
from flows.params import Runtime
from packing.contracts import ENGINE_PRECISIONS, PRECISIONS
from packing.errors import MyriadError
from serving import settings

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
_state = {"debug": False}


class UsageError(MyriadError):
    """A command was given options that do not go together."""


def _choice(values: tuple[str, ...]):
    """An option callback that refuses anything but ``values``, naming them."""

    def check(value: str | None) -> str | None:
        if value is not None and value not in values:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(values)}")
        return value

    return check


RUNTIMES = get_args(Runtime)
RuntimeOption = Annotated[str, typer.Option(callback=_choice(RUNTIMES), help=" | ".join(RUNTIMES))]
PrecisionOption = Annotated[
    str | None,
    typer.Option(
        callback=_choice(PRECISIONS), help="fp32 | fp16 | bf16 (default: fp32 cpu, fp16 gpu)"
    ),
]
EngineOption = Annotated[
    str | None,
    typer.Option(
        callback=_choice(ENGINE_PRECISIONS),
        help="serve on the cross-model engine: " + " | ".join(ENGINE_PRECISIONS),
    ),
]

StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="artifact store URI: file:///path or s3://bucket/prefix "
        "(default: $MYRIAD_STORE, else ./.myriad/store)",
    ),
]


def _fail(message: str) -> NoReturn:
    raise UsageError(message)


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="show the traceback of an error (or MYRIAD_DEBUG=1)")
    ] = False,
) -> None:
    if debug:
        _state["debug"] = True


OnDemandOption = Annotated[
    bool,
    typer.Option(
        "--on-demand",
        help="let the packer load rarely used models on their first request (the on-demand "
        "tier), within --max-cold-fraction and --max-cold-start-seconds",
    ),
]
MaxColdFractionOption = Annotated[
    float,
    typer.Option(help="with --on-demand: most expected share of requests to meet a cold start"),
]
MaxColdStartOption = Annotated[
    float,
    typer.Option(help="with --on-demand: a model whose measured load is slower stays resident"),
]


@app.command()
def run(
    fleet: Annotated[Path, typer.Option(help="fleet file")] = Path("examples/demo.yaml"),
    catalog: Annotated[Path, typer.Option(help="instance catalog")] = Path("catalogs/aws.yaml"),
    store: StoreOption = None,
    runtime: RuntimeOption = "local",
    duration: Annotated[float, typer.Option(help="seconds of random load")] = 10.0,
    concurrency: Annotated[int, typer.Option(help="closed-loop clients")] = 8,
    time_limit: Annotated[float, typer.Option(help="packer time limit, seconds")] = 10.0,
    spot: Annotated[bool, typer.Option(help="pack with spot prices")] = False,
    precision: PrecisionOption = None,
    keep_running: Annotated[bool, typer.Option(help="leave the servers up afterwards")] = False,
    engine: EngineOption = None,
    zipf: Annotated[float, typer.Option(help="Zipf exponent of model choice; 0 = uniform")] = 0.0,
    on_demand: OnDemandOption = False,
    max_cold_fraction: MaxColdFractionOption = 0.01,
    max_cold_start_seconds: MaxColdStartOption = 5.0,
) -> None:
    """Run the whole pipeline: build, trace, pack, deploy, load test, report."""
    from flows.params import check_catalog, check_fleet
    from flows.pipeline import pipeline

    # Refused here in one line, before a Prefect server starts for a run that cannot succeed.
    check_fleet(str(fleet))
    check_catalog(str(catalog))

    summary = pipeline(
        fleet=str(fleet),
        catalog=str(catalog),
        store=store,
        runtime=runtime,
        duration_s=duration,
        concurrency=concurrency,
        time_limit_s=time_limit,
        spot=spot,
        precision=precision,
        keep_running=keep_running,
        engine=engine,
        zipf=zipf,
        on_demand=on_demand,
        max_cold_fraction=max_cold_fraction,
        max_cold_start_seconds=max_cold_start_seconds,
    )
    print_summary(summary)


def print_summary(summary: dict) -> None:
    from loadtest.report import format_value

    table = Table(title="Myriad pipeline summary", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, format_value(value))
    console.print(table)


@app.command()
def trace(
    fleet: Annotated[Path, typer.Option(help="fleet file")] = Path("examples/demo.yaml"),
    store: StoreOption = None,
    force: Annotated[bool, typer.Option(help="trace even what the store already holds")] = False,
    precision: PrecisionOption = None,
) -> None:
    """Trace every model of a fleet for each of its processors (skips unchanged models)."""
    import msgspec
    from rich.progress import Progress

    from packing.contracts import Fleet
    from packing.io import load
    from serving.build.tracing import TraceSettings, trace_to_store
    from serving.store import open_store
    from tasks.trace import trace_jobs

    fleet_spec = load(fleet, Fleet)
    settings = msgspec.convert({"precision": precision} if precision else {}, TraceSettings)
    artifact_store = open_store(store)
    jobs = trace_jobs(fleet_spec)
    traced = 0
    with Progress(console=console) as progress:
        bar = progress.add_task("tracing", total=len(jobs))
        for spec, processor in jobs:
            progress.update(bar, description=f"{spec.id} ({processor})")
            result = trace_to_store(
                spec,
                processor,
                artifact_store,
                settings,
                base_dir=fleet.resolve().parent,
                force=force,
            )
            traced += not result.cached
            progress.advance(bar)
    console.print(f"{traced} traced, {len(jobs) - traced} unchanged, in {artifact_store.uri}")


@app.command()
def pack(
    problem: Annotated[Path | None, typer.Option(help="packing-problem file")] = None,
    fleet: Annotated[
        Path | None, typer.Option(help="or: a traced fleet (profiles from the store)")
    ] = None,
    catalog: Annotated[Path, typer.Option(help="catalog, with --fleet")] = Path(
        "catalogs/aws.yaml"
    ),
    store: StoreOption = None,
    out: Annotated[Path, typer.Option(help="where to write plan.json")] = Path("plan.json"),
    time_limit: Annotated[float, typer.Option(help="solver time limit, seconds")] = 10.0,
    workers: Annotated[int, typer.Option(help="solver workers")] = 2,
    spot: Annotated[bool, typer.Option(help="use spot prices")] = False,
    current: Annotated[
        Path | None,
        typer.Option(help="the running plan: repack incrementally, keeping models in place"),
    ] = None,
    tolerance: Annotated[
        float, typer.Option(help="with --current: accepted cost above a fresh solve (0.05 = 5%)")
    ] = 0.05,
    png: Annotated[
        Path | None, typer.Option(help="packing figure (default: next to --out, .png)")
    ] = None,
    on_demand: OnDemandOption = False,
    max_cold_fraction: MaxColdFractionOption = 0.01,
    max_cold_start_seconds: MaxColdStartOption = 5.0,
) -> None:
    """Pack models onto the cheapest instances and write a plan, its table and figure."""
    from flows.params import on_demand_limits
    from packing.contracts import Catalog, Fleet, Plan, Problem
    from packing.io import load, save
    from packing.problems import build_problem
    from packing.repack import pack as pack_problem
    from packing.solver.progress import figures
    from serving.build.tracing import stored_profiles
    from serving.store import publish_plan
    from tasks.trace import trace_jobs

    tier = on_demand_limits(on_demand, max_cold_fraction, max_cold_start_seconds)
    if problem is not None:
        spec = load(problem, Problem)
        if spot:
            import msgspec

            spec = msgspec.structs.replace(spec, price="spot")
        if tier is not None:
            import msgspec

            spec = msgspec.structs.replace(
                spec, limits=msgspec.structs.replace(spec.limits, on_demand=tier)
            )
    elif fleet is not None:
        fleet_spec = load(fleet, Fleet)
        # The profiles the pack flow reads, by the same function (read-profiles task).
        jobs = [f"{model.id}/{processor}" for model, processor in trace_jobs(fleet_spec)]
        spec = build_problem(
            fleet_spec,
            stored_profiles(jobs, store),
            load(catalog, Catalog),
            price="spot" if spot else "on_demand",
            on_demand=tier,
        )
    else:
        _fail("give --problem PROBLEM, or --fleet FLEET to pack traced profiles")
    from packing.plot import plot_plan
    from packing.report import plan_table

    status = console.status("solving")

    def show(step) -> None:
        status.update(
            f"solving: {step.elapsed_s:.0f} of {step.time_limit_s:.0f} s, "
            f"{figures(step.cost, step.bound, step.gap)} ({step.stage})"
        )

    with status:
        plan, repacked = pack_problem(
            spec,
            current=load(current, Plan) if current is not None else None,
            tolerance=tolerance if current is not None else None,
            time_limit_s=time_limit,
            workers=workers,
            progress=show,
        )
    save(plan, out)
    # Published as the myriad-pack flow publishes it: plans/<id>/plan.json and plans/latest.
    plan_uri = publish_plan(plan, store, spec)
    figure = plot_plan(spec, plan, png or out.with_suffix(".png"))
    table = Table(title=f"plan {plan.plan_id} ({plan.solver_status})")
    rows = plan_table(spec, plan)
    for column in rows[0] if rows else []:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
    console.print(
        f"cost ${plan.cost_per_hour:.4f}/h, lower bound ${plan.lower_bound_cost_per_hour:.4f}/h, "
        f"gap {plan.gap:.2%}, {plan.solve_seconds:.1f} s → {out}, {figure}, {plan_uri}"
    )
    if any(server.on_demand_model_ids for server in plan.servers):
        from packing.report import cold_start_line

        console.print(cold_start_line(spec, plan))
    elif spec.limits.on_demand is not None:
        # Asked for and not used: say why, or the flag looks ignored.
        console.print(
            "on demand: every model resident (no model both rare enough and measured to load "
            "within the limit, no saving worth a cold start, or the plan with every model "
            "resident came out no dearer)"
        )
    if repacked is not None:
        moves = out.with_name(f"{out.stem}.moves.json")
        save(repacked.moves, moves)
        how = "incremental" if repacked.incremental else "fresh (incremental was dearer)"
        console.print(
            f"{how}: {repacked.kept_replicas} replicas kept in place, {len(repacked.moves)} "
            f"moves → {moves}; a fresh solve costs ${repacked.fresh_cost_per_hour:.4f}/h"
        )


@app.command()
def serve(
    plan: Annotated[Path | None, typer.Option(help="plan.json")] = None,
    server: Annotated[str | None, typer.Option(help="server id in the plan")] = None,
    models: Annotated[str | None, typer.Option(help="or: comma-separated model ids")] = None,
    processor: Annotated[str, typer.Option(help="with --models")] = "cpu",
    store: StoreOption = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    grpc_port: Annotated[
        int | None, typer.Option(help="also answer KServe v2 over gRPC on this port")
    ] = None,
    threads: int = 1,
    on_demand: Annotated[
        str | None,
        typer.Option(help="comma-separated model ids loaded on first request (default: plan's)"),
    ] = None,
    memory_budget: Annotated[
        str | None,
        typer.Option(help="bytes the models may hold, e.g. 2GiB (default: the plan server's)"),
    ] = None,
) -> None:
    """Run one model server in the foreground: its address, each model's state as it loads,
    and an error when none could be loaded."""
    from packing.contracts import Plan
    from packing.io import load
    from serving.backends.ondemand import parse_bytes
    from serving.http.server import ServerOptions, plan_server, run_server

    planned = None
    if plan is not None:
        if not server:
            _fail("--plan needs --server ID (a server of the plan)")
        model_ids, processor, planned = plan_server(load(plan, Plan), server)
    elif models:
        model_ids = [m for m in models.split(",") if m]
    else:
        _fail("give --models a,b,c, or --plan PLAN --server ID")
    try:
        budget = parse_bytes(memory_budget) if memory_budget else None
    except ValueError as exc:
        _fail(f"--memory-budget: {exc}")
    run_server(
        ServerOptions(
            model_ids=model_ids,
            processor=processor,
            store_uri=store,
            host=host,
            port=port,
            grpc_port=grpc_port,
            threads=threads,
            report_loading=True,
            planned=planned,
            on_demand=[m for m in (on_demand or "").split(",") if m],
            memory_budget=budget,
        )
    )


@app.command()
def build(
    processor: Annotated[
        list[str] | None,
        typer.Option(
            help="cpu | gpu | inf, or orchestrator (the Kubernetes work pool's image); repeat; "
            "default: cpu, gpu and inf"
        ),
    ] = None,
    push: Annotated[
        str | None, typer.Option(help="registry to push to (an ECR host logs in through boto3)")
    ] = None,
    base_image: Annotated[str | None, typer.Option(help="base image (build argument)")] = None,
) -> None:
    """Build the server image of each processor with docker or podman; push with --push."""
    from serving.build.images import build_image, container_engine, push_image
    from serving.build.record import write_build_record

    engine = container_engine()
    if engine is None:
        _fail("no container engine answers (docker info and podman info both failed)")
    table = Table(title=f"images ({engine})")
    for column in ("processor", "image", "digest", "pushed", "seconds"):
        table.add_column(column)
    for name in processor or ["cpu", "gpu", "inf"]:
        with console.status(f"building the {name} image"):
            result = build_image(name, registry=push, base_image=base_image, engine=engine)
            if push:
                result = push_image(result, push)
            write_build_record(result, push)
        table.add_row(
            name, result.image, result.digest[:19], str(result.pushed), f"{result.seconds:.0f}"
        )
    console.print(table)


@app.command()
def deploy(
    plan: Annotated[Path, typer.Option(help="plan.json")],
    runtime: RuntimeOption = "local",
    store: StoreOption = None,
    name: Annotated[str, typer.Option(help="deployment name")] = "local",
    engine: EngineOption = None,
    image: Annotated[
        list[str] | None,
        typer.Option(help="PROCESSOR=IMAGE for docker and kubernetes (default: the built tag)"),
    ] = None,
    registry: Annotated[
        str | None, typer.Option(help="registry of the images (as given to myriad build --push)")
    ] = None,
    catalog: Annotated[
        Path, typer.Option(help="kubernetes: instance catalog, to size requests and limits")
    ] = Path("catalogs/aws.yaml"),
    render_only: Annotated[
        bool, typer.Option(help="kubernetes: write the manifests, apply nothing")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="with --render-only: directory (default infra/k8s/<plan>)")
    ] = None,
    namespace: NamespaceOption = None,
    role_arn: RoleArnOption = None,
    store_secret: StoreSecretOption = None,
    store_credential: StoreCredentialOption = None,
) -> None:
    """Start the servers of a plan and wait until every model is loaded."""
    from packing.contracts import Catalog, Plan
    from packing.io import load
    from tasks.deploy import deploy as deploy_plan

    options = _deploy_options(
        name, store, engine, image, registry, namespace, role_arn, store_secret, store_credential
    )
    catalog_spec = load(catalog, Catalog) if runtime == "kubernetes" else None
    if render_only:
        from serving.runtimes.base import image_for
        from serving.runtimes.manifests import write_manifests

        if runtime != "kubernetes":
            _fail("--render-only renders Kubernetes manifests: use it with --runtime kubernetes")
        plan_spec = load(plan, Plan)
        target = out or Path("infra/k8s") / plan_spec.plan_id
        images = {s.processor: image_for(s.processor, options) for s in plan_spec.servers}
        paths = write_manifests(
            plan_spec, target, catalog=catalog_spec, options=options, images=images
        )
        console.print(f"{len(paths)} files in {target}: kubectl apply --server-side -k {target}")
        return
    with console.status(f"starting servers of {plan}"):
        deployment = deploy_plan(plan, store, runtime, catalog=catalog_spec, options=options)
    _print_deployment(deployment)
    console.print(f"stop them with: myriad teardown --name {name}")


NamespaceOption = Annotated[
    str | None,
    typer.Option(
        help="kubernetes: namespace (default myriad-<name>; a name that is myriad or starts "
        "with myriad- is its own)"
    ),
]
RoleArnOption = Annotated[
    str | None,
    typer.Option(
        help="kubernetes: IAM role for the servers' ServiceAccount (EKS IRSA), e.g. "
        "arn:aws:iam::<account>:role/<cluster>-<namespace>-server from eks-cluster.yaml"
    ),
]
StoreSecretOption = Annotated[
    str | None,
    typer.Option(
        help="kubernetes: a Secret whose keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_REGION, AWS_ENDPOINT_URL) become the servers' environment"
    ),
]
StoreCredentialOption = Annotated[
    list[str] | None,
    typer.Option(
        help="kubernetes: KEY=VALUE (repeat) rendered into the servers' store Secret; with "
        "--render-only it is written to store-secret.yaml"
    ),
]


def _deploy_options(
    name: str,
    store: str | None,
    engine: str | None,
    image: list[str] | None,
    registry: str | None,
    namespace: str | None = None,
    role_arn: str | None = None,
    store_secret: str | None = None,
    store_credential: list[str] | None = None,
):
    """One DeployOptions from the command's options, the store defaulting to the settings'."""
    from serving.runtimes.base import deploy_options

    credentials = {}
    for pair in store_credential or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"--store-credential {pair.split('=')[0]!r}...: give KEY=VALUE")
        credentials[key] = value
    return deploy_options(
        name,
        store,
        engine,
        _images(image),
        registry,
        namespace=namespace,
        role_arn=role_arn,
        store_secret=store_secret,
        store_credentials=credentials,
    )


def _images(pairs: list[str] | None) -> dict[str, str]:
    images = {}
    for pair in pairs or []:
        processor, sep, tag = pair.partition("=")
        if not sep or processor not in ("cpu", "gpu", "inf") or not tag:
            _fail(f"--image {pair!r}: give PROCESSOR=IMAGE with processor cpu, gpu or inf")
        images[processor] = tag
    return images


def _print_deployment(deployment) -> None:
    table = Table(title=f"deployment {deployment.name} ({deployment.runtime})")
    table.add_column("server")
    table.add_column("address")
    for server_id, url in deployment.servers.items():
        table.add_row(server_id, url)
    console.print(table)


@app.command()
def redeploy(
    plan: Annotated[Path, typer.Option(help="the new plan.json")],
    store: StoreOption = None,
    name: Annotated[str, typer.Option(help="deployment name")] = "local",
    engine: EngineOption = None,
    image: Annotated[list[str] | None, typer.Option(help="PROCESSOR=IMAGE")] = None,
    registry: Annotated[str | None, typer.Option(help="registry of the images")] = None,
    namespace: NamespaceOption = None,
    role_arn: RoleArnOption = None,
    store_secret: StoreSecretOption = None,
    store_credential: StoreCredentialOption = None,
) -> None:
    """Move a running deployment to a new plan: only changed servers are replaced, each new
    one ready before the old one stops."""
    from tasks.deploy import redeploy as redeploy_plan

    options = _deploy_options(
        name, store, engine, image, registry, namespace, role_arn, store_secret, store_credential
    )
    with console.status(f"moving {name} to {plan}"):
        result = redeploy_plan(plan, store, name, options=options)
    _print_deployment(result.deployment)
    console.print(
        f"kept {len(result.kept)}, started {len(result.started)}, stopped {len(result.stopped)}"
    )


@app.command()
def observe(
    name: Annotated[str, typer.Option(help="deployment name")] = "local",
    store: StoreOption = None,
    window: Annotated[float, typer.Option(help="seconds of traffic to observe")] = 60.0,
    interval: Annotated[float, typer.Option(help="seconds per rate sample")] = 5.0,
    quantile: Annotated[float, typer.Option(help="the high rate: this quantile of samples")] = 0.9,
    prometheus: Annotated[
        str | None,
        typer.Option(help="Prometheus URL to read (default: $MYRIAD_PROMETHEUS_URL, else scrape)"),
    ] = None,
    top: Annotated[int, typer.Option(help="models shown, busiest first")] = 15,
) -> None:
    """Each model's observed request rate, errors and latency in a running deployment, kept
    in the store beside its record (what ``myriad rebalance`` plans from)."""
    from serving.deployments import read_deployment
    from serving.observe import observe_deployment, publish_observation

    deployment = read_deployment(name, store)
    url = prometheus or settings.current().observe.prometheus_url
    with console.status(
        f"observing {name} for {window:.0f} s " + (f"through {url}" if url else "by scraping")
    ):
        observation = observe_deployment(deployment, window, interval, quantile, url)
    uri = publish_observation(observation, store or deployment.store_uri)
    print_observation(observation, top)
    console.print(f"observation: {uri}")


def print_observation(observation, top: int) -> None:
    table = Table(
        title=f"{observation.deployment}: {observation.total_rps():.1f} requests/s over "
        f"{observation.window_s:.0f} s ({observation.source}, plan {observation.plan_id})"
    )
    for column in ("model", "rate/s", f"p{observation.quantile * 100:.0f} rate/s", "requests",
                   "errors", "p50 ms", "p90 ms", "p99 ms"):  # fmt: skip
        table.add_column(column, justify="left" if column == "model" else "right")
    busiest = sorted(observation.models.items(), key=lambda item: -item[1].rate_rps)[:top]
    for model, traffic in busiest:
        table.add_row(
            model,
            f"{traffic.rate_rps:.2f}",
            f"{traffic.rate_high_rps:.2f}",
            str(traffic.requests),
            str(traffic.errors),
            *(f"{v:.1f}" if v is not None else "-" for v in
              (traffic.p50_ms, traffic.p90_ms, traffic.p99_ms)),
        )  # fmt: skip
    console.print(table)
    if len(observation.models) > top:
        console.print(f"... and {len(observation.models) - top} more models with traffic")


@app.command()
def rebalance(
    name: Annotated[str, typer.Option(help="deployment name")] = "local",
    fleet: Annotated[Path, typer.Option(help="the deployment's fleet")] = Path(
        "examples/demo.yaml"
    ),
    catalog: Annotated[Path, typer.Option(help="instance catalog")] = Path("catalogs/aws.yaml"),
    store: StoreOption = None,
    tolerance: Annotated[
        float, typer.Option(help="accepted cost above a fresh solve (0.05 = 5%)")
    ] = 0.05,
    max_moves: Annotated[
        int | None, typer.Option(help="at most this many replicas change place")
    ] = None,
    headroom: Annotated[float, typer.Option(help="plan for this times the observed rate")] = 1.2,
    floor_rps: Annotated[float, typer.Option(help="planned rate of a model seen idle")] = 0.01,
    min_window: Annotated[
        float, typer.Option(help="refuse an observation shorter than this, seconds")
    ] = 60.0,
    rate: Annotated[str, typer.Option(help="high (the quantile) | mean")] = "high",
    time_limit: Annotated[float, typer.Option(help="packer time limit, seconds")] = 10.0,
    engine: EngineOption = None,
    dry_run: Annotated[
        bool, typer.Option(help="print the moves and the new cost, change nothing")
    ] = False,
) -> None:
    """Repack a running deployment for its observed traffic (the latest ``myriad observe``)
    under a move budget, and redeploy only the servers whose models changed."""
    from packing.contracts import Catalog, Fleet
    from packing.io import load
    from packing.traffic import TrafficSettings
    from serving.rebalance import RebalanceSettings, apply_rebalance, rebalance_running
    from serving.runtimes.base import deploy_options

    options = RebalanceSettings(
        traffic=TrafficSettings(floor_rps=floor_rps, headroom=headroom, min_window_s=min_window),
        tolerance=tolerance,
        max_moves=max_moves,
        time_limit_s=time_limit,
        rate=rate,
    )
    with console.status(f"repacking {name} for its observed traffic"):
        deployment, result, store_uri = rebalance_running(
            name, store, load(fleet, Fleet), load(catalog, Catalog), options, engine
        )
    print_rebalance(result)
    if dry_run or result.unchanged:
        console.print("dry run: nothing changed" if dry_run else "nothing to move")
        return
    with console.status(f"moving {name} to plan {result.plan.plan_id}"):
        moved = apply_rebalance(result, deployment, deploy_options(name, store_uri, engine))
    console.print(
        f"kept {len(moved.kept)}, started {len(moved.started)}, stopped {len(moved.stopped)}"
    )


def print_rebalance(result) -> None:
    console.print(
        f"{result.deployment}: ${result.cost_before:.4f}/h -> ${result.cost_after:.4f}/h "
        f"(a fresh solve ${result.fresh_cost:.4f}/h), {len(result.moves)} replica moves, "
        f"{len(result.changed_servers)} servers to replace, plan {result.plan.plan_id}"
    )
    table = Table(title="planned against observed (busiest, then most mis-planned)")
    for column in ("model", "planned rps", "observed rps", "observed/planned"):
        table.add_column(column, justify="left" if column == "model" else "right")
    seen = set()
    for row in [*result.busiest, *result.most_misplanned]:
        if row.model_id in seen:
            continue
        seen.add(row.model_id)
        table.add_row(
            row.model_id, f"{row.planned_rps:.2f}", f"{row.observed_rps:.2f}", f"{row.ratio:.2f}"
        )
    console.print(table)
    if result.moves:
        moves = Table(title="moves")
        for column in ("model", "from", "to"):
            moves.add_column(column)
        for move in result.moves[:30]:
            moves.add_row(move.model_id, move.source or "(new)", move.target or "(removed)")
        console.print(moves)


@app.command()
def status(
    name: Annotated[str, typer.Option(help="deployment name")] = "local",
    store: StoreOption = None,
) -> None:
    """Each server of a deployment: its address and state (ready, loading, failed, down). With
    ``--store``, the record kept in that store (wherever the deploy ran)."""
    from serving.deployments import read_deployment
    from serving.runtimes import get_runtime

    deployment = read_deployment(name, store)
    table = Table(title=f"deployment {name} ({deployment.runtime}, plan {deployment.plan_id})")
    for column in ("server", "address", "state", "detail"):
        table.add_column(column)
    for server in get_runtime(deployment.runtime).status(deployment):
        table.add_row(server.server_id, server.url, server.state, server.detail)
    console.print(table)


@app.command()
def teardown(
    name: Annotated[str, typer.Option(help="deployment name")] = "local",
    store: StoreOption = None,
) -> None:
    """Stop the servers of a deployment (and remove what its runtime made)."""
    from serving.deployments import NoDeployment
    from tasks.deploy import teardown as teardown_deployment

    try:
        stopped = teardown_deployment(name, store)
    except NoDeployment:
        console.print(f"nothing to stop: no deployment named {name!r} is running")
        return
    console.print(f"stopped {len(stopped)} servers of {name}")


@app.command()
def gateway(
    name: Annotated[str, typer.Option(help="deployment name")] = "local",
    plan: Annotated[
        Path | None, typer.Option(help="plan.json (default: the deployment's own)")
    ] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
) -> None:
    """One HTTP address for a deployment: routes each model to a server that holds it, and
    follows redeploys."""
    from serving.deployments import deployment_path, read_deployment
    from serving.routing.gateway import serve_gateway

    read_deployment(name)  # a clear error when there is none
    console.print(f"gateway for {name} on http://{host}:{port}")
    serve_gateway(deployment_path(name), host, port, plan)


@app.command()
def loadtest(
    plan: Annotated[Path, typer.Option(help="plan.json")],
    name: Annotated[str, typer.Option(help="deployment name")] = "local",
    mode: Annotated[
        list[str] | None,
        typer.Option(help="sequential | random | closed | sweep | rate (repeat for several)"),
    ] = None,
    duration: Annotated[float, typer.Option(help="seconds per run (and per sweep step)")] = 10.0,
    concurrency: Annotated[int, typer.Option(help="closed-loop clients")] = 8,
    max_concurrency: Annotated[int, typer.Option(help="sweep: highest level")] = 256,
    latency_target_ms: Annotated[float, typer.Option(help="sweep: stop past this P90")] = 100.0,
    rate: Annotated[float, typer.Option(help="open loop: requests per second")] = 50.0,
    zipf: Annotated[float, typer.Option(help="Zipf exponent of model choice; 0 = uniform")] = 0.0,
    tokens: Annotated[int, typer.Option(help="tokens per request text")] = 16,
    processes: Annotated[int, typer.Option(help="load-generator processes")] = 1,
    max_requests: Annotated[
        int | None, typer.Option(help="stop a run after this many requests")
    ] = None,
    seed: int = 0,
    out: Annotated[
        Path | None, typer.Option(help="directory for report.json, report.md and the plots")
    ] = None,
) -> None:
    """Load-test a running deployment of a plan."""
    from rich.progress import Progress

    from loadtest.report import format_value, summarize, sweep_rows, write_report
    from loadtest.runner import LoadSettings, run_load_test
    from packing.contracts import Plan
    from packing.io import load
    from serving.deployments import read_deployment

    levels = [2**k for k in range(11)]
    settings = LoadSettings(
        modes=mode or ["sequential", "random", "closed"],
        duration_s=duration,
        concurrency=concurrency,
        sweep_levels=[level for level in levels if level <= max_concurrency],
        latency_target_ms=latency_target_ms,
        rate=rate,
        zipf=zipf,
        tokens=tokens,
        processes=processes,
        max_requests=max_requests,
        seed=seed,
    )
    plan_spec = load(plan, Plan)
    with Progress(console=console) as progress:
        bar = progress.add_task("load test", total=1.0)

        def advance(label: str, fraction: float) -> None:
            progress.update(bar, completed=fraction, description=f"load test: {label} done")

        figures = run_load_test(plan_spec, read_deployment(name), settings, progress=advance)
    summary = write_report(plan_spec, figures, out) if out else summarize(plan_spec, figures)
    print_summary(summary)
    curve = sweep_rows(figures)
    if curve:
        table = Table(title="concurrency sweep")
        for column in curve[0]:
            table.add_column(column, justify="left" if column == "status" else "right")
        for row in curve:
            table.add_row(*(format_value(value) for value in row.values()))
        console.print(table)
    if out:
        console.print(f"report: {out}/report.md, report.json and plots")


@app.command()
def publish(
    model: Annotated[list[str], typer.Option(help="model id that was retrained (repeatable)")],
    fleet: Annotated[str, typer.Option(help="the fleet it belongs to")] = "examples/demo.yaml",
    note: Annotated[str, typer.Option(help="free text carried in the event payload")] = "",
) -> None:
    """Announce retrained models: emit a ``myriad.model.updated`` event per model to the Prefect
    server at $PREFECT_API_URL; the ``retrain`` deployment's trigger runs the redeploy flow."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    if not settings.current().prefect.api_url:
        _fail("set PREFECT_API_URL to the Prefect server that runs the retrain deployment")
    for model_id in model:
        event = emit_event(
            event="myriad.model.updated",
            resource={
                "prefect.resource.id": f"myriad.model.{model_id}",
                "prefect.resource.name": model_id,
                "myriad.model.id": model_id,
                "myriad.fleet": fleet,
            },
            payload={"note": note} if note else None,
        )
        if event is None:
            _fail("Prefect is not set up to emit events here (PREFECT_API_URL, events enabled?)")
        console.print(f"emitted myriad.model.updated for {model_id} (event {event.id})")
    EventsWorker.drain_all(timeout=30)


def report_error(exc: BaseException) -> None:
    """One or two lines on stderr: what is wrong (and what to do, when the error says)."""
    from rich.markup import escape

    # escape(): a message quoting a pattern like [a-z0-9] must print as written.
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    err_console.print(f"[bold red]error:[/] {escape(lines[0])}")
    for line in lines[1:]:
        err_console.print(escape(line))


def main() -> None:
    try:
        current = settings.current()
        _state["debug"] = _state["debug"] or current.debug
        settings.ensure_data_dir(current)
        settings.use_embedded_prefect(current)
        logs.quiet_user_errors(lambda: _state["debug"])
        app()
    except MyriadError as exc:
        if _state["debug"]:
            raise
        report_error(exc)
        sys.exit(2)


if __name__ == "__main__":
    main()
