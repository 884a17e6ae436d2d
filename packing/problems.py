"""The packing problem of a traced fleet: one model per fleet model, a profile per processor it
was traced for (the ``profile.json`` of each artifact, in the shape of a trace result)."""

from __future__ import annotations

import msgspec

from packing.contracts import (
    ENGINE_PRECISIONS,
    Catalog,
    Fleet,
    Limits,
    OnDemandLimits,
    Problem,
    ProblemModel,
    Profile,
)


def build_problem(
    fleet: Fleet,
    trace_results: list[dict],
    catalog: Catalog,
    limits: Limits | None = None,
    price: str = "on_demand",
    engine: str | None = None,
    on_demand: OnDemandLimits | None = None,
) -> Problem:
    """One packing model per fleet model, with a profile per processor it was traced for.

    Traffic spread over many models rarely forms batches within one model, so by default the
    packer is given the batch-1 cost per request: the conservative figure. With ``engine`` (a
    cross-model engine precision: fp32, bf16, fp16, int8) batches form across the models of a
    server, so a model costs its bytes in the engine's weight bank and its best batched seconds
    per request; models the engine cannot run (not BERT) keep the TorchScript figures.
    """
    profiles: dict[str, list[Profile]] = {}
    for result in trace_results:
        profile = result["profile"]
        engine_bytes = (profile.get("engine_bytes") or {}).get(engine) if engine else None
        if engine and engine_bytes is None and profile.get("engine_bytes") is not None:
            raise ValueError(f"engine precision {engine!r}: choose {', '.join(ENGINE_PRECISIONS)}")
        if engine_bytes is not None:
            # The engine's weight bank is the model's memory: host memory on a CPU, the
            # device's on an accelerator.
            memory, seconds, batch, host = (
                int(engine_bytes),
                float(profile["seconds_per_request"]),
                int(profile["batch_size"]),
                None,
            )
        else:
            # Profiles traced before host memory was measured have none.
            memory, seconds, batch, host = (
                int(profile["memory_bytes"]),
                float(profile["seconds_per_request_batch1"]),
                1,
                profile.get("host_memory_bytes"),
            )
        profiles.setdefault(result["model_id"], []).append(
            Profile(
                processor=result["processor"],
                memory_bytes=memory,
                seconds_per_request=seconds,
                batch_size=batch,
                host_memory_bytes=None if host is None else int(host),
                load_seconds=_seconds(profile.get("load_seconds")),
                store_load_seconds=_seconds(profile.get("store_load_seconds")),
            )
        )
    models = []
    for spec in fleet.all_models():
        if spec.id not in profiles:
            raise ValueError(f"model {spec.id} has no traced profile; trace it before packing")
        models.append(
            ProblemModel(
                id=spec.id,
                traffic_rps=spec.traffic_rps,
                replicas=spec.replicas,
                profiles=profiles[spec.id],
            )
        )
    limits = limits or Limits()
    if on_demand is not None:
        limits = msgspec.structs.replace(limits, on_demand=on_demand)
    return Problem(name=fleet.name, price=price, limits=limits, catalog=catalog, models=models)


def _seconds(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]
