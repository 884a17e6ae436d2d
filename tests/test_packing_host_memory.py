"""Host memory as a resource: an instance's RAM holds its servers' bases and their models, so
the packer, its bound, the incremental re-pack and the validator keep within it.

The reference architecture shows the limit biting: inf1.xlarge (8 GiB of RAM) held 11
bert-base models and inf1.2xlarge (16 GiB) 24, though both have one Inferentia chip. A
server's base of 1 GiB and 0.55 GiB of host memory per model reproduce both counts at the
default max_memory_fraction of 0.9; the chip here would hold 30 by its memory and 40 by its
compute.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import msgspec
import pytest

from packing.contracts import Catalog, Limits, Problem, ProblemModel, Profile
from packing.io import load
from packing.repack import repack
from packing.solver import solve
from packing.solver.model import InfeasibleError
from packing.validate import PlanError, check, violations

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
BASE_GIB = 1.0
HOST_PER_MODEL = int(0.55 * GIB)


def _catalog(*names: str, base_gib: float = BASE_GIB) -> Catalog:
    aws = load(ROOT / "catalogs/aws.yaml", Catalog)
    return msgspec.structs.replace(
        aws,
        instance_types=[
            msgspec.structs.replace(aws.get(name), server_host_base_gib=base_gib) for name in names
        ],
    )


def _bert_base(count: int, host_bytes: int | None = HOST_PER_MODEL) -> list[ProblemModel]:
    """bert-base on inf1 at the reference's 2.05 requests/s each: 30 fill a chip's memory,
    40 its compute."""
    device_bytes = int(0.9 * 8 * GIB / 30)
    return [
        ProblemModel(
            id=f"bert-{i:04d}",
            traffic_rps=2.05,
            profiles=[
                Profile(
                    processor="inf",
                    memory_bytes=device_bytes,
                    seconds_per_request=0.01,
                    host_memory_bytes=host_bytes,
                )
            ],
        )
        for i in range(count)
    ]


def _problem(catalog: Catalog, models: list[ProblemModel]) -> Problem:
    return Problem(name="host-memory", catalog=catalog, limits=Limits(), models=models)


def _models_per_instance(plan) -> Counter[str]:
    return Counter({s.instance: len(s.model_ids) for s in plan.servers})


@pytest.mark.parametrize(("type_name", "holds"), [("inf1.xlarge", 11), ("inf1.2xlarge", 24)])
def test_ram_caps_models_per_instance_as_the_reference_measured(type_name, holds) -> None:
    problem = _problem(_catalog(type_name), _bert_base(96))
    plan = solve(problem, time_limit_s=10)
    check(problem, plan)
    per_instance = _models_per_instance(plan)
    assert max(per_instance.values()) == holds
    assert len(plan.instances) == -(-96 // holds)
    assert plan.gap == 0
    for server in plan.servers:
        assert server.host_memory_bytes == int(BASE_GIB * GIB) + len(server.model_ids) * (
            HOST_PER_MODEL
        )
        assert server.host_memory_bytes <= 0.9 * problem.catalog.get(type_name).host_memory_bytes


def test_without_a_host_figure_the_chip_alone_limits_and_plans_are_as_before() -> None:
    """Profiles that measured no host memory (older ones, on an accelerator) leave the chip's
    memory the limit: 30 per inf1.xlarge."""
    problem = _problem(_catalog("inf1.xlarge"), _bert_base(90, host_bytes=None))
    plan = solve(problem, time_limit_s=10)
    check(problem, plan)
    assert max(_models_per_instance(plan).values()) == 30
    assert len(plan.instances) == 3


def test_ram_moves_the_fleet_to_the_type_with_room() -> None:
    """With both one-chip types on offer, RAM makes inf1.2xlarge the cheaper per model
    ($0.362 / 24 against $0.228 / 11), though the chip alone would favour inf1.xlarge."""
    catalog = _catalog("inf1.xlarge", "inf1.2xlarge")
    with_ram = solve(_problem(catalog, _bert_base(96)), time_limit_s=10)
    without = solve(_problem(catalog, _bert_base(96, host_bytes=None)), time_limit_s=10)
    assert {i.type for i in with_ram.instances} == {"inf1.2xlarge"}
    assert {i.type for i in without.instances} == {"inf1.xlarge"}
    assert with_ram.cost_per_hour == pytest.approx(4 * 0.362)


def test_multi_device_instances_share_their_ram() -> None:
    """inf1.6xlarge: 4 chips, 48 GiB. Four servers' bases and 30 models a chip would need
    4 + 120 × 0.55 = 70 GiB, more than 43.2; the plan holds fewer and stays within RAM."""
    catalog = _catalog("inf1.6xlarge")
    problem = _problem(catalog, _bert_base(150))
    plan = solve(problem, time_limit_s=10)
    check(problem, plan)
    host_cap = 0.9 * catalog.get("inf1.6xlarge").host_memory_bytes
    per_instance: Counter[str] = Counter()
    for server in plan.servers:
        per_instance[server.instance] += server.host_memory_bytes
    assert max(per_instance.values()) <= host_cap
    assert max(Counter(s.instance for s in plan.servers for _ in s.model_ids).values()) <= 71


def test_validator_refuses_a_plan_that_overfills_ram() -> None:
    """A plan made as if a server took no host memory of its own fills inf1.xlarge to 13
    models; against the real base the validator names the instance and the figures."""
    careless = _problem(_catalog("inf1.xlarge", base_gib=0.0), _bert_base(26))
    plan = solve(careless, time_limit_s=10)
    check(careless, plan)
    assert max(_models_per_instance(plan).values()) == 13
    real = _problem(_catalog("inf1.xlarge"), _bert_base(26))
    found = [v for v in violations(real, plan) if "inf1.xlarge allows" in v]
    assert found and "base of 1.0 GiB each" in found[0]
    with pytest.raises(PlanError, match="host memory"):
        check(real, plan)


def test_incremental_repack_keeps_within_ram() -> None:
    """Models added to a running plan go where RAM still has room, not only the chip."""
    catalog = _catalog("inf1.2xlarge")
    before = _problem(catalog, _bert_base(40))
    current = solve(before, time_limit_s=10)
    after = _problem(catalog, _bert_base(60))
    result = repack(after, current, tolerance=0.5, time_limit_s=10)
    check(after, result.plan)
    assert result.incremental
    assert max(_models_per_instance(result.plan).values()) <= 24


def test_a_base_that_leaves_no_room_and_a_model_too_big_for_ram_are_named() -> None:
    with pytest.raises(InfeasibleError, match=r"\(inf1\.xlarge\) is too small for a server's"):
        solve(_problem(_catalog("inf1.xlarge", base_gib=9.0), _bert_base(2)), time_limit_s=2)
    with pytest.raises(InfeasibleError, match=r"needs 7\.50 GiB of host memory per replica"):
        solve(
            _problem(_catalog("inf1.xlarge"), _bert_base(2, host_bytes=int(7.5 * GIB))),
            time_limit_s=2,
        )
