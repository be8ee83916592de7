# syntax=docker/dockerfile:1
# Base of the service and CPU worker images: Python 3.11 with infergate and its dependencies installed from
# the build context (the repository root). docker-compose.yml builds it as the `migrate` service's image,
# tagged `infergate-base`, and hands it to the other builds through `additional_contexts`. By hand:
#   docker build -f docker/base.Dockerfile -t infergate-base .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    INFERGATE_DATA_DIR=/data \
    INFERGATE_MODELS_DIR=/app/models

# libgomp1: the OpenMP runtime some onnxruntime and scipy builds load; the slim image lacks it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --user-group infergate \
    && mkdir -p /data \
    && chown infergate:infergate /data

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so that a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY infergate ./infergate
COPY service ./service
COPY workers ./workers
RUN pip install --no-deps . && rm -rf build *.egg-info

# The ONNX model packages; an installed package cannot find the repository's models/ folder, so
# INFERGATE_MODELS_DIR points here.
COPY models ./models

USER infergate
CMD ["infergate", "--help"]
