# Orchestrator image: what a flow run of the Kubernetes work pool (prefect.yaml's `myriad-k8s`,
# flows/work_pools/kubernetes.json) runs in, as the ServiceAccount `myriad-orchestrator` of
# infra/k8s/orchestrator/.
#
# The pipeline's dependencies (the `all` and `dask` extras: Prefect, OR-Tools, the Kubernetes
# client, torch for CPU tracing), git, and no code of this project: a flow run fetches the code
# with prefect.yaml's git_clone pull step and runs it from that checkout (Prefect puts the
# working directory on sys.path), so the image changes only when the dependencies do. No model
# weights. Runs as uid 10001; writes only under /tmp (MYRIAD_HOME=/tmp/myriad, HOME=/tmp).
#
# `myriad build --processor orchestrator [--push REGISTRY]` builds it, tagged
# <registry or myriad>/orchestrator:<version>-<content hash>. Build arguments and contexts as
# for cpu.Dockerfile:
#   BASE_IMAGE       a Debian-based Python 3.11 image (default python:3.11-slim-bookworm)
#   TORCH_VERSION    torch release (a local build such as 2.13.0+cpu needs a wheel in `wheels`)
#   TORCH_INDEX_URL  where torch and its dependencies come from
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
# torch first and pinned (CPU build): tracing for cpu runs in the flow run itself.
RUN --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=secret,id=ca,target=/run/secrets/ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
# The extras' dependencies alone: empty packages stand in for the sources (the code comes
# from git at run time), and the project itself is uninstalled again.
RUN --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=secret,id=ca,target=/run/secrets/ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    for p in packing serving loadtest tasks flows; do mkdir -p "$p" && touch "$p/__init__.py"; done \
    && pip install "./[all,dask]" && pip uninstall --yes myriad

FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# git: Prefect's git_clone pull step runs it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    MYRIAD_HOME=/tmp/myriad HOME=/tmp TMPDIR=/tmp HF_HUB_OFFLINE=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
COPY --from=builder /opt/venv /opt/venv
# The import check writes Prefect's home (/tmp/.prefect) as root: removed, or uid 10001 could
# not make its own.
RUN python -c "import prefect, prefect_kubernetes, kubernetes, ortools, torch, boto3" \
    && rm -rf /tmp/.prefect \
    && useradd --system --uid 10001 --user-group --home-dir /tmp --no-create-home myriad
USER 10001:10001
WORKDIR /tmp
# The Kubernetes worker gives the command (prefect flow-run execute).
CMD ["prefect", "version"]
