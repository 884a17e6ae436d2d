"""Each contract: the shipped files load, and bad input gets one message naming file and field."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from packing.contracts import Catalog, Fleet, Plan, Problem
from packing.io import ContractError, load, save

ROOT = Path(__file__).resolve().parent.parent

FLEET = """
name: demo
processors: [cpu]
models:
  - {id: a, source: "synthetic:bert-tiny"}
"""

CATALOG = """
name: t
region: us-east-1
prices_as_of: "2026-11-01"
source: test
instance_types:
  - {name: c5.large, family: c5, processor: cpu, devices: 1, device_memory_gib: 4,
     host_memory_gib: 4, vcpus: 2, on_demand_per_hour: 0.085, price_source: test}
"""

PROBLEM = f"""
name: p
catalog:
{"".join("  " + line + chr(10) for line in CATALOG.strip().splitlines())}
models:
  - id: a
    traffic_rps: 1
    profiles: [{{processor: cpu, memory_bytes: 1000, seconds_per_request: 0.01}}]
"""

PLAN = """
plan_id: plan-1
created_at: "2026-11-24T00:00:00Z"
problem: p
instances: [{id: i000-c5-large, type: c5.large, processor: cpu, price_per_hour: 0.085}]
servers:
  - {id: i000-c5-large-d0, instance: i000-c5-large, device: 0, processor: cpu, model_ids: [a],
     memory_bytes: 1000, memory_capacity_bytes: 4294967296, compute_utilization: 0.01}
cost_per_hour: 0.085
lower_bound_cost_per_hour: 0.085
gap: 0
solver_status: optimal
solve_seconds: 0.1
"""


def write(tmp_path: Path, text: str, name: str = "file.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("examples/demo.yaml", Fleet),
        ("examples/reference-3000.yaml", Fleet),
        ("catalogs/aws.yaml", Catalog),
    ],
)
def test_shipped_files_load(path: str, kind: type) -> None:
    loaded = load(ROOT / path, kind)
    assert loaded.schema_version == 1


def test_shipped_fleets_expand() -> None:
    demo = load(ROOT / "examples/demo.yaml", Fleet).all_models()
    assert [m.id for m in demo][:3] == ["minilm", "tiny-00", "tiny-01"]
    assert len(demo) == 13
    reference = load(ROOT / "examples/reference-3000.yaml", Fleet).all_models()
    assert len(reference) == 3000
    assert reference[-1].id == "bert-2999"
    assert {m.source for m in reference} == {"synthetic:bert-base-cased"}


def test_catalog_covers_reference_and_current_families() -> None:
    catalog = load(ROOT / "catalogs/aws.yaml", Catalog)
    families = {t.family for t in catalog.instance_types}
    assert {"c5", "g4dn", "inf1", "inf2", "g5", "g6", "g6e", "p4d", "p5", "c6i", "c7i"} <= families
    reference = catalog.get("inf1.6xlarge")
    assert (reference.processor, reference.devices) == ("inf", 4)
    assert all(t.price_source for t in catalog.instance_types)


@pytest.mark.parametrize(
    ("kind", "text", "expected"),
    [
        (Fleet, FLEET.replace("id: a", "id: A"), "models[0].id"),
        (
            Fleet,
            FLEET.replace('bert-tiny"}', 'bert-tiny", traffic_rps: -1}'),
            "models[0].traffic_rps",
        ),
        (
            Fleet,
            FLEET.replace('bert-tiny"}', 'bert-tiny", max_length: many}'),
            "models[0].max_length",
        ),
        (Fleet, FLEET.replace("synthetic:bert-tiny", "ftp://x"), "models[0].source"),
        (Fleet, FLEET.replace("[cpu]", "[tpu]"), "processors[0]"),
        (Fleet, FLEET.replace("[cpu]", "[]"), "processors"),
        (
            Fleet,
            FLEET + '  - {id: a, source: "synthetic:bert-tiny"}\n',
            "model id 'a' appears more than once",
        ),
        (Fleet, FLEET.replace("models:", "modls:"), "unknown field `modls`"),
        (Fleet, FLEET.replace("name: demo", "name: demo\nschema_version: 9"), "schema_version"),
        (
            Fleet,
            FLEET.replace('bert-tiny"}', 'bert-tiny", processors: [gpu]}'),
            "pins processors ['gpu']",
        ),
        (Fleet, "- just\n- a list\n", "expected a mapping"),
        (Fleet, "name: [unclosed\n", "not valid YAML"),
        (Catalog, CATALOG.replace("0.085", "-0.085"), "instance_types[0].on_demand_per_hour"),
        (Catalog, CATALOG.replace("devices: 1", "devices: 0"), "instance_types[0].devices"),
        (Catalog, CATALOG.replace('"2026-11-01"', "last week"), "prices_as_of"),
        (Catalog, CATALOG.replace("vcpus: 2, ", ""), "missing required field `vcpus`"),
        (
            Problem,
            PROBLEM.replace("memory_bytes: 1000", "memory_bytes: -5"),
            "models[0].profiles[0].memory_bytes",
        ),
        (
            Problem,
            PROBLEM.replace("seconds_per_request: 0.01", "seconds_per_request: 0"),
            "seconds_per_request",
        ),
        (Problem, PROBLEM.replace("traffic_rps: 1", "traffic_rps: -1"), "models[0].traffic_rps"),
        (
            Problem,
            PROBLEM.replace("traffic_rps: 1", "traffic_rps: 1\n    weight: 2"),
            "unknown field `weight`",
        ),
        (Problem, PROBLEM.replace("profiles: [{", "profiles: []\n    x: [{"), "models[0].profiles"),
        (Problem, PROBLEM + "limits: {max_memory_fraction: 1.5}\n", "limits.max_memory_fraction"),
        (
            Problem,
            PROBLEM + "limits: {instance_quotas: {p9.huge: 1}}\n",
            "unknown instance types ['p9.huge']",
        ),
        (
            Plan,
            PLAN.replace("instance: i000-c5-large,", "instance: i999,"),
            "unknown instance i999",
        ),
        (Plan, PLAN.replace("gap: 0", "gap: -1"), "gap"),
        (Plan, PLAN.replace("model_ids: [a]", "model_ids: [Bad!]"), "servers[0].model_ids[0]"),
    ],
)
def test_bad_input_names_file_and_field(
    tmp_path: Path, kind: type, text: str, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ContractError) as error:
        load(path, kind)
    message = str(error.value)
    assert message.startswith(str(path)), message
    assert expected in message, message
    assert "\n" not in message.strip()


def test_good_documents_load(tmp_path: Path) -> None:
    assert load(write(tmp_path, FLEET), Fleet).all_models()[0].id == "a"
    assert load(write(tmp_path, CATALOG), Catalog).get("c5.large").devices == 1
    assert load(write(tmp_path, PROBLEM), Problem).models[0].profiles[0].memory_bytes == 1000
    plan = load(write(tmp_path, PLAN), Plan)
    assert plan.servers_for("a")[0].id == "i000-c5-large-d0"


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="nope.yaml: no such file"):
        load(tmp_path / "nope.yaml", Fleet)


def test_model_set_ids_are_checked_after_expansion(tmp_path: Path) -> None:
    text = (
        FLEET
        + "model_sets:\n"
        + "  - {prefix: a, count: 3, digits: 1, source: 'synthetic:bert-tiny', start: 0}\n"
    )
    path = write(tmp_path, text.replace("id: a,", "id: a0,"))
    with pytest.raises(ContractError, match="model id 'a0' appears more than once"):
        load(path, Fleet)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_save_round_trips_and_is_atomic(tmp_path: Path, suffix: str) -> None:
    plan = load(write(tmp_path, PLAN), Plan)
    target = tmp_path / f"plan{suffix}"
    save(plan, target)
    assert load(target, Plan) == plan
    # A value that cannot be encoded must leave the previous file intact and no temp file behind.
    broken = msgspec.structs.replace(plan, problem=object())  # type: ignore[arg-type]
    with pytest.raises((TypeError, msgspec.EncodeError, Exception)):
        save(broken, target)
    assert load(target, Plan) == plan
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["file.yaml", f"plan{suffix}"])


def test_names_listed_twice_are_refused_by_name(tmp_path: Path) -> None:
    doubled_model = PROBLEM + (
        "  - id: a\n    traffic_rps: 1\n"
        "    profiles: [{processor: cpu, memory_bytes: 1000, seconds_per_request: 0.01}]\n"
    )
    with pytest.raises(ContractError, match=r"models listed twice: \['a'\]"):
        load(write(tmp_path, doubled_model), Problem)
    doubled_type = CATALOG + CATALOG[CATALOG.index("  - {name") :]
    with pytest.raises(ContractError, match=r"instance types listed twice: \['c5.large'\]"):
        load(write(tmp_path, doubled_type), Catalog)
