"""KServe v2 (the Open Inference Protocol) over gRPC: another front end over a server's data
plane, started by ``python -m serving --grpc-port PORT`` (:mod:`serving.grpc.service`).

``grpc_service_pb2*.py`` and ``model_config_pb2.py`` are generated from ``protos/`` (Triton's
``grpc_service.proto`` and ``model_config.proto``, unchanged) by ``generate.sh``.
"""

# The gRPC port of a server in a container or a pod (KServe's, beside 8080 for HTTP). Here, not
# in service.py, so the runtimes name it without importing grpc and the generated messages.
GRPC_PORT = 8081
