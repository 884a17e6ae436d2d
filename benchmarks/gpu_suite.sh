#!/usr/bin/env bash
# Every GPU figure of the cross-model engine in one run of under 8 minutes on one H100 or
# H200, written as JSON to OUTDIR (benchmarks/gpu_suite.py says what each group measures).
#
#     benchmarks/gpu_suite.sh OUTDIR                 # on the device machine
#     benchmarks/gpu_suite.sh --dry-run OUTDIR       # CPU, tiny shapes, the same code (CI)
#     benchmarks/gpu_suite.sh --only engine_int8,frontends_int8 OUTDIR   # a rerun of some
#
# Before a device session, here (PyPI reachable):
#
#     benchmarks/gather_wheels.sh          # about 23 MB of wheels into benchmarks/.wheels/
#
# then one call of the device tool `run` (a session has 15 minutes of device time in all; the
# machine's start takes one or two, the suite under eight; the machine goes back 30 s after
# the call, so a rerun starts a fresh one, which needs 4 minutes left):
#
#     run(command="PYTHONUNBUFFERED=1 benchmarks/gpu_suite.sh $OUT 2>&1",
#         carry=["benchmarks/.wheels"], timeout_s=540)
#
# (no pipe: a command stopped at its limit loses a pipeline's output; and no log file: $OUT
# returns at most 8 files, which the suite's JSON files fill.)
#
# Reading the results: the reply's output_tail ends with a table of every figure (group,
# name, value, unit) and a status line per step; the files come back under the reply's
# files_at: summary.json (device, torch and CUDA versions, date, commit, each step's status,
# seconds and error, every figure with its unit), one <group>.json per figure group (its
# figures, the details behind them and, when a step failed or ran out of time, its log's
# tail). A step with status timed_out or failed keeps the figures it had; rerun only those
# with --only (and `carry` again: a fresh machine is bare) if time is left, else give the
# machine back. Record the figures in benchmarks/RESULTS.md with device and date.
#
# The device has Python 3.12, torch, numpy, transformers and tokenizers, and no network: the
# carried wheels (the server's other dependencies and the load generator's) are installed
# offline into /tmp/myriad-site, first on PYTHONPATH, before anything starts (about 10 s).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${MYRIAD_WHEELS:-$ROOT/benchmarks/.wheels}"
# The checkout's environment where it has one (here, CI), else the machine's (the device).
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

if [ $# -eq 0 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi

# Only where the server's dependencies are missing (the device): a checkout's own environment
# (CI's dry run) keeps what it has, and wheels built for 3.12 would not load on another Python.
if ! "$PYTHON" -c 'import litestar, uvicorn, zmq, msgspec, hdrh' 2>/dev/null \
    && compgen -G "$WHEELS/*.whl" >/dev/null; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
        echo "gpu_suite.sh: the wheels of $WHEELS are for Python 3.12, $PYTHON is not" >&2
        exit 1
    fi
    started=$(date +%s)
    site=/tmp/myriad-site
    if ! "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --root-user-action=ignore --upgrade --target "$site" "$WHEELS"/*.whl; then
        echo "gpu_suite.sh: installing the wheels of $WHEELS failed" >&2
        exit 1
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "wheels installed from $WHEELS in $(($(date +%s) - started)) s"
fi

cd "$ROOT" && exec "$PYTHON" -m benchmarks.gpu_suite "$@"
