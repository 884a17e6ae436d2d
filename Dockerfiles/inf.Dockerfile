# Model server image for AWS Inferentia2 and Trainium (inf2, trn1, trn1n): torch-neuronx from
# the Neuron pip repository on a Python 3.11 base.
#
# inf1 is NOT supported by this image. inf1 needs torch-neuron (Neuron SDK 1.x line), which
# pins torch 1.13 and Python <= 3.10; this project needs Python >= 3.11 and torch >= 2.6. To run
# on inf1 anyway, start from the older SDK image
# (public.ecr.aws/neuron/pytorch-inference-neuron:1.13.1-neuron-py310-...) at your own risk
# (untested, the server will not install there unmodified), or use inf2. See Dockerfiles/README.md.
#
# As the CPU image otherwise: only the server and the `serve` extra, no model weights, uid
# 10001, a read-only root with /var/lib/myriad and /tmp as volumes. The Neuron driver
# (aws-neuronx-dkms) lives on the host; the runtime library comes from the Neuron apt
# repository (its Ubuntu suites serve Debian bookworm too). Run with --device /dev/neuron<N>.
#
# Build arguments and contexts (all optional):
#   BASE_IMAGE             a Debian-based Python 3.11 image (default python:3.11-slim-bookworm)
#   TORCH_VERSION          the torch release torch-neuronx pins (CPU build)
#   TORCH_NEURONX_VERSION  torch-neuronx release matching TORCH_VERSION
#   NEURON_APT_SUITE       Neuron apt suite (jammy)
#   --build-context wheels=DIR   extra wheels pip may use (default: none)
#   --secret id=ca,src=BUNDLE    a CA bundle for pip behind a TLS-intercepting proxy
ARG BASE_IMAGE=python:3.11-slim-bookworm

# Overridden by `--build-context wheels=DIR`; empty by default.
FROM scratch AS wheels

# The base with the Neuron runtime library (libnrt) and tools (neuron-ls, neuron-top).
FROM ${BASE_IMAGE} AS neuron
ARG NEURON_APT_SUITE=jammy
ENV DEBIAN_FRONTEND=noninteractive
ADD https://apt.repos.neuron.amazonaws.com/GPG-PUB-KEY-AMAZON-AWS-NEURON.PUB /etc/apt/keyrings/neuron.asc
# hadolint ignore=DL3008
RUN chmod 0644 /etc/apt/keyrings/neuron.asc \
    && echo "deb [signed-by=/etc/apt/keyrings/neuron.asc] https://apt.repos.neuron.amazonaws.com ${NEURON_APT_SUITE} main" \
        > /etc/apt/sources.list.d/neuron.list \
    && apt-get update \
    && apt-get install -y --no-install-recommends aws-neuronx-runtime-lib aws-neuronx-collectives \
        aws-neuronx-tools \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/aws/neuron/bin:$PATH

FROM neuron AS builder
ARG TORCH_VERSION=2.8.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_NEURONX_VERSION=2.8.*
ARG NEURON_INDEX_URL=https://pip.repos.neuron.amazonaws.com
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_FIND_LINKS=/wheels \
    PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, the CPU build (PyPI's pulls CUDA libraries an Inferentia host never uses); then
# torch-neuronx, whose exact torch pin the CPU build satisfies.
RUN --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=secret,id=ca,target=/run/secrets/ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}" \
    && pip install --extra-index-url "$NEURON_INDEX_URL" "torch-neuronx==${TORCH_NEURONX_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
# The `serve` extra's dependencies alone: empty packages stand in for the sources, so a change
# in the code reuses this layer and the venv copy below.
RUN --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=secret,id=ca,target=/run/secrets/ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    mkdir -p packing serving && touch packing/__init__.py serving/__init__.py \
    && pip install "./[serve]" && pip uninstall --yes myriad

FROM neuron
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app MYRIAD_HOME=/var/lib/myriad TMPDIR=/tmp HOME=/var/lib/myriad \
    HF_HUB_OFFLINE=1 HF_HOME=/var/lib/myriad/hf TORCHINDUCTOR_CACHE_DIR=/tmp/inductor \
    NEURON_CC_FLAGS=--cache_dir=/var/lib/myriad/neuron-cache
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
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/v2/health/ready', timeout=2)"]
ENTRYPOINT ["python", "-m", "serving", "--processor", "inf", "--host", "0.0.0.0", "--port", "8080"]
