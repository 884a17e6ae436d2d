# Model server image for CPU instances (c5, c6i, c7i, m*, r*).
#
# Only the server goes in: packing/ and serving/ with the `serve` extra (no Prefect, no
# OR-Tools), torch from the PyTorch CPU index, no model weights (servers pull their models from
# the store at start). Runs as uid 10001 and on a read-only root: the model cache
# (MYRIAD_HOME=/var/lib/myriad) and /tmp are the only places it writes; mount them as volumes.
#
# Build arguments and contexts (all optional):
#   BASE_IMAGE       a Debian-based Python 3.11 image (default python:3.11-slim-bookworm)
#   TORCH_VERSION    torch release (a local build such as 2.13.0+cpu needs a wheel in `wheels`)
#   TORCH_INDEX_URL  where torch and its dependencies come from (wheels in `wheels` count too;
#                    https://pypi.org/simple with a local torch wheel)
#   --build-context wheels=DIR   extra wheels pip may use (default: none)
#   --secret id=ca,src=BUNDLE    a CA bundle for pip behind a TLS-intercepting proxy
ARG BASE_IMAGE=python:3.11-slim-bookworm

# Overridden by `--build-context wheels=DIR`; empty by default.
FROM scratch AS wheels

FROM ${BASE_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
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

FROM ${BASE_IMAGE}
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
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/v2/health/ready', timeout=2)"]
ENTRYPOINT ["python", "-m", "serving", "--host", "0.0.0.0", "--port", "8080"]
