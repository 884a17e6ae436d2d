# Model server image for CPU instances (c5, c6i, c7i, m*, r*).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false MYRIAD_HOME=/var/lib/myriad
WORKDIR /app
# The CPU wheel index keeps the image free of CUDA libraries it would never use.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY packing ./packing
COPY serving ./serving
COPY tasks ./tasks
COPY flows ./flows
RUN pip install .
RUN useradd --create-home --uid 10001 myriad && mkdir -p /var/lib/myriad && chown myriad /var/lib/myriad
USER 10001
EXPOSE 8080
ENTRYPOINT ["python", "-m", "serving", "--host", "0.0.0.0", "--port", "8080"]
