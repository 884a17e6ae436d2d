"""KServe v2 (the Open Inference Protocol) over gRPC: another front end over a server's data
plane, started by ``python -m serving --grpc-port PORT`` (:mod:`serving.grpc.service`).

``grpc_service_pb2*.py`` and ``model_config_pb2.py`` are generated from ``protos/`` (Triton's
``grpc_service.proto`` and ``model_config.proto``, unchanged) by ``generate.sh``.
"""
