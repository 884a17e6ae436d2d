"""The engine-feed benchmark against a real server (``--workers 2``, null forward), so the
figure quoted for "one engine process feeds N requests/s" keeps measuring what it says: every
request answered, none failed, and the engine's CPU per request falling as frames grow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import engine_feed

pytestmark = pytest.mark.slow


def test_the_engine_process_is_fed_frames_and_answers_them_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = engine_feed.main(
        ["--models", "3", "--frame-sizes", "1", "8", "--rounds", "1", "--seconds", "2",
         "--connections", "2", "--in-flight", "2", "--null-forward",
         "--store", f"file://{tmp_path}/store"]
    )  # fmt: skip
    assert status == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["frame_size"] for line in lines] == [1, 8]
    for line in lines:
        assert line["failed"] == 0
        assert line["requests_per_s"] > 0
        assert 0 < line["engine_compute_cpu_ms_per_request"] < line["engine_cpu_ms_per_request"]
        assert line["p50_ms"] <= line["p90_ms"]
    # Per-frame work spread over eight requests instead of one.
    assert lines[1]["engine_cpu_ms_per_request"] < lines[0]["engine_cpu_ms_per_request"]
