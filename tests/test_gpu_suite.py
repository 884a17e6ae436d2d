"""The device suite's dry run, so it cannot rot between device sessions: ``gpu_suite.sh
--dry-run`` runs every step's code on this CPU with tiny shapes (a real engine, a real server
with its front ends over HTTP and gRPC, the real load generator), and every figure group's JSON
must be there, finished, and hold figures of the right sign and order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_suite import GROUPS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def value(group: dict, name: str) -> float:
    figure = group["figures"][name]
    assert figure["unit"], name
    return figure["value"]


def test_dry_run_writes_every_group(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [str(ROOT / "benchmarks/gpu_suite.sh"), "--dry-run", "--logs", str(tmp_path / "logs"),
         str(out)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    groups = {g: json.loads((out / f"{g}.json").read_text()) for g in GROUPS}
    for name, group in groups.items():
        assert group["status"] == "ok", (name, group.get("error"), group.get("errors"),
                                         group.get("log_tail"))  # fmt: skip
    # At most 8 files, flat: what a device call's $OUT returns.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(f"{g}.json" for g in GROUPS), "summary.json"]
    )
    assert len(list(out.iterdir())) <= 8

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["device"] == "cpu" and summary["torch"]
    assert summary["date"] and set(summary["steps"]) == set(GROUPS)
    assert all(s["status"] == "ok" for s in summary["steps"].values())
    named = {(f["group"], f["name"]) for f in summary["figures"]}
    assert all(f["unit"] for f in summary["figures"])
    for group in groups.values():
        assert {(group["group"], n) for n in group["figures"]} <= named

    assert value(groups["device"], "copy_bandwidth_measured") > 0

    memory = groups["memory"]
    sizes = {p: value(memory, f"memory_per_model_{p}") for p in ("fp32", "bf16", "fp16", "int8")}
    assert sizes["int8"] < sizes["bf16"] == sizes["fp16"] < sizes["fp32"]
    for precision in sizes:
        assert memory["details"][precision]["allocated_over_planned"] == pytest.approx(1.0)

    accuracy = groups["accuracy"]
    for task in ("sequence-classification", "embedding"):
        assert value(accuracy, f"{task}_fp32_engine_vs_eager_max_abs") < 1e-4
        for precision in ("bf16", "int8"):
            assert value(accuracy, f"{task}_{precision}_min_cosine_vs_fp32") > 0.99
            assert 0 < value(accuracy, f"{task}_{precision}_max_abs_vs_fp32") < 0.1

    bf16 = groups["engine_bf16"]
    for label in ("uniform", "zipf", "uniform_full_bank"):
        assert value(bf16, f"requests_per_s_{label}") > 0
        assert value(bf16, f"weight_read_{label}") > 0
        assert value(bf16, f"copy_fraction_{label}") > 0
    assert value(bf16, "memory_per_model_allocated") == sizes["bf16"]

    int8 = groups["engine_int8"]
    assert value(int8, "requests_per_s_resident_uniform") > 0
    assert value(int8, "requests_per_s_zipf_all") > 0
    assert value(int8, "swap_in_from_host") > 0
    assert int8["details"]["swaps_timed"] > 0
    assert value(int8, "memory_per_model_allocated") == sizes["int8"]

    for name in ("frontends_bf16", "frontends_int8"):
        group = groups[name]
        assert value(group, "server_ready_seconds") > 0
        # The rate that meets P90 on a busy CI machine may be none; the server must answer.
        assert "http_requests_per_s_at_p90_100ms" in group["figures"]
        assert any(t["requests_per_s"] > 0 for t in group["details"]["http_tries"]), group
        if "grpc_skipped" in group["details"]:
            assert group["details"]["grpc_skipped"]
        else:
            assert "grpc_requests_per_s_at_p90_100ms" in group["figures"]
            assert any(t["requests_per_s"] > 0 for t in group["details"]["grpc_tries"]), group
        # The engine process fed frames directly: every request answered, its CPU counted.
        assert value(group, "engine_feed_requests_per_s") > 0
        assert group["details"]["engine_feed"]["failed"] == 0
        assert 0 < value(group, "engine_feed_engine_cpu_per_request")
