#!/usr/bin/env bash
# Gather the wheels a device machine lacks to run benchmarks/gpu_suite.sh, into an ignored
# folder that a device call carries (default benchmarks/.wheels/).
#
#     benchmarks/gather_wheels.sh [DEST]
#
# The device machine has Python 3.12, torch and much of the scientific stack, no network and
# none of the server's own dependencies. What it gets: the `serve` extra of pyproject.toml and
# the load generator's packages (aiohttp, hdrhistogram), with their dependencies, at the exact
# versions installed in this checkout's .venv (what CI tests), as CPython 3.12 manylinux
# x86-64 wheels. Left out, as the device has them at versions the server admits and they would
# take most of the 64 MiB a call may carry: torch, numpy, transformers, tokenizers, safetensors
# (and what only they need); boto3, which only an S3 store imports; pbr and setuptools, which
# hdrhistogram names but does not import. grpcio and protobuf go along when installed here: the
# generated KServe gRPC stubs check their versions.
#
# gpu_suite.sh installs the folder on the device with
#     pip install --no-index --no-deps --target /tmp/myriad-site DEST/*.whl
# and puts /tmp/myriad-site first on PYTHONPATH, so these versions win over the device's own.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/benchmarks/.wheels}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

pins="$("$PYTHON" - "$ROOT/pyproject.toml" <<'EOF'
import importlib.metadata as metadata
import re
import sys
import tomllib

from packaging.requirements import Requirement

DEVICE_HAS = {"torch", "numpy", "transformers", "tokenizers", "safetensors", "huggingface-hub"}
NOT_IMPORTED = {"boto3", "pbr", "setuptools"}
# The device's interpreter, for the dependencies' environment markers.
DEVICE = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython",
          "extra": ""}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


project = tomllib.load(open(sys.argv[1], "rb"))["project"]
roots = [Requirement(r).name for r in project["dependencies"]]
roots += [Requirement(r).name for r in project["optional-dependencies"]["serve"]]
roots += ["aiohttp", "hdrhistogram", "grpcio", "protobuf"]
pins, stack = {}, list(roots)
while stack:
    name = norm(stack.pop())
    if name in pins or name in DEVICE_HAS or name in NOT_IMPORTED:
        continue
    try:
        distribution = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        if name in ("grpcio", "protobuf"):
            continue  # optional: only the gRPC front end needs them
        sys.exit(f"{name} is not installed in {sys.executable}; run make first")
    pins[name] = distribution.version
    for line in distribution.requires or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(DEVICE):
            stack.append(requirement.name)
print(" ".join(f"{name}=={version}" for name, version in sorted(pins.items())))
EOF
)"

rm -rf "$DEST"
mkdir -p "$DEST"
# pip matches each manylinux tag exactly: the usual ones of current wheels.
platforms=()
for tag in manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
# shellcheck disable=SC2086 # one argument per pin
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$DEST" $pins
echo "$(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
