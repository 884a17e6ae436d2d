# Model server image for Inferentia instances (inf1): torch-neuron comes from the AWS Neuron
# base image, since it is not on PyPI.
FROM public.ecr.aws/neuron/pytorch-inference-neuron:1.13.1-neuron-py310-sdk2.20.0-ubuntu20.04

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false MYRIAD_HOME=/var/lib/myriad
WORKDIR /app
COPY pyproject.toml README.md ./
COPY packing ./packing
COPY serving ./serving
COPY tasks ./tasks
COPY flows ./flows
# The base image's torch and torch-neuron stay; only Myriad's own dependencies are added.
RUN pip install --no-deps . && pip install "litestar>=2.25,<2.26" "uvicorn>=0.30" "tokenizers>=0.22" "msgspec>=0.19" "boto3>=1.35" "pyyaml>=6" "httpx>=0.27"
RUN useradd --create-home --uid 10001 myriad && mkdir -p /var/lib/myriad && chown myriad /var/lib/myriad
USER 10001
EXPOSE 8080
ENTRYPOINT ["python", "-m", "serving", "--processor", "inf", "--host", "0.0.0.0", "--port", "8080"]
