# Model server image for NVIDIA instances (g4dn, g5, g6, g6e, p4d, p5).
#
# As the CPU image (Dockerfiles/cpu.Dockerfile): only the server and the `serve` extra, no
# model weights, uid 10001, a read-only root with /var/lib/myriad and /tmp as volumes. torch
# comes from the PyTorch cu128 index and brings its own CUDA libraries (the nvidia-* wheels), so
# the base is CUDA's small `base` image (driver compatibility only), not `runtime`/`cudnn`.
# Ubuntu 24.04's Python is 3.12, inside the project's range.
#
# Build arguments and contexts (all optional):
#   BASE_IMAGE       an Ubuntu/Debian image with a working apt (default nvidia/cuda base)
#   TORCH_VERSION    torch release
#   TORCH_INDEX_URL  where torch and its dependencies come from
#   --build-context wheels=DIR   extra wheels pip may use (default: none)
#   --secret id=ca,src=BUNDLE    a CA bundle for pip behind a TLS-intercepting proxy
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# Overridden by `--build-context wheels=DIR`; empty by default.
FROM scratch AS wheels

# The base with a Python interpreter: the builder's venv links to it, the runtime runs it.
FROM ${BASE_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM python AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_FIND_LINKS=/wheels \
    PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and pinned: with it present, the extra's torch range installs nothing more.
RUN --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=secret,id=ca,target=/run/secrets/ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
# The `serve` extra's dependencies alone: empty packages stand in for the sources, so a change
# in the code reuses this layer and the venv copy below.
RUN --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=secret,id=ca,target=/run/secrets/ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    mkdir -p packing serving && touch packing/__init__.py serving/__init__.py \
    && pip install "./[serve]" && pip uninstall --yes myriad

FROM python
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app MYRIAD_HOME=/var/lib/myriad TMPDIR=/tmp HOME=/var/lib/myriad \
    HF_HUB_OFFLINE=1 HF_HOME=/var/lib/myriad/hf TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
COPY --from=builder /opt/venv /opt/venv
# The server's code, outside the venv, compiled ahead (the root is read-only at run time).
WORKDIR /app
COPY packing ./packing
COPY serving ./serving
RUN python -m compileall -q packing serving \
    && python -c "import serving.http.app, serving.backends.torchscript, serving.backends.crossmodel, serving.http.server" \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/myriad --no-create-home myriad \
    && mkdir -p /var/lib/myriad && chown 10001:10001 /var/lib/myriad
VOLUME ["/var/lib/myriad", "/tmp"]
USER 10001:10001
WORKDIR /var/lib/myriad
EXPOSE 8080
# Ready means every model of this server is loaded.
HEALTHCHECK --interval=10s --timeout=3s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/v2/health/ready', timeout=2)"]
ENTRYPOINT ["python", "-m", "serving", "--processor", "gpu", "--host", "0.0.0.0", "--port", "8080"]
