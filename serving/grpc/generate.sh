#!/usr/bin/env bash
# Regenerates the checked-in Python code of protos/ (Triton's grpc_service.proto and
# model_config.proto, taken unchanged from triton-inference-server/common, protobuf/):
#   .venv/bin/pip install grpcio-tools && bash serving/grpc/generate.sh
# The files keep their top-level names (grpc_service.proto, model_config.proto) so their
# descriptors are the ones tritonclient.grpc registers: both load in one process. The imports
# are made relative, and ruff neither lints nor formats the generated files.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-$here/../../.venv/bin/python}"
"$python" -m grpc_tools.protoc -I"$here/protos" --python_out="$here" --grpc_python_out="$here" \
  "$here/protos/grpc_service.proto" "$here/protos/model_config.proto"
rm -f "$here/model_config_pb2_grpc.py"  # model_config.proto has no service
for file in "$here"/grpc_service_pb2.py "$here"/grpc_service_pb2_grpc.py "$here"/model_config_pb2.py; do
  sed -i -E 's/^import (grpc_service_pb2|model_config_pb2) as/from . import \1 as/' "$file"
  { printf '# ruff: noqa\n# fmt: off\n'; cat "$file"; } > "$file.new" && mv "$file.new" "$file"
done
