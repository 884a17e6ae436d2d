# Model server image for NVIDIA instances (g4dn, g5, g6, g6e, p4d, p5).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MYRIAD_HOME=/var/lib/myriad
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
RUN pip install --index-url https://download.pytorch.org/whl/cu128 "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY packing ./packing
COPY serving ./serving
COPY tasks ./tasks
COPY flows ./flows
RUN pip install .
RUN useradd --create-home --uid 10001 myriad && mkdir -p /var/lib/myriad && chown myriad /var/lib/myriad
USER 10001
EXPOSE 8080
ENTRYPOINT ["python", "-m", "serving", "--processor", "gpu", "--host", "0.0.0.0", "--port", "8080"]
