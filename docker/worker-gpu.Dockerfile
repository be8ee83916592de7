# syntax=docker/dockerfile:1
# GPU inference worker (`infergate worker`) with onnxruntime-gpu on CUDA 12 and cuDNN 9, the pair that the
# PyPI onnxruntime-gpu wheels (1.19 and later) are built for. Run with the NVIDIA container toolkit; compose
# starts it with `docker compose --profile gpu up`.
#   docker build -f docker/worker-gpu.Dockerfile -t infergate-worker-gpu .
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    INFERGATE_DATA_DIR=/data \
    INFERGATE_MODELS_DIR=/app/models

# Ubuntu 22.04 ships Python 3.11 in universe; a venv keeps pip away from the system Python.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip \
    && useradd --create-home --uid 10001 --user-group infergate \
    && mkdir -p /data \
    && chown infergate:infergate /data

WORKDIR /app

# The project's dependencies with the `gpu` extra, minus the CPU onnxruntime. Both wheels install the same
# `onnxruntime` package folder, so installing both and uninstalling the CPU one afterwards deletes files that
# onnxruntime-gpu needs; never installing it avoids that.
COPY pyproject.toml README.md ./
RUN python -c 'import re, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; deps = [d for d in p["dependencies"] if re.split(r"[^A-Za-z0-9._-]", d, maxsplit=1)[0].lower() != "onnxruntime"]; print("\n".join(deps + p["optional-dependencies"]["gpu"]))' \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY infergate ./infergate
COPY service ./service
COPY workers ./workers
# --no-deps: pip would otherwise pull the CPU onnxruntime back in. The uninstall is a guard that does
# nothing when it is absent, and the check fails the build unless the CUDA provider is compiled in.
RUN pip install --no-deps . \
    && rm -rf build *.egg-info \
    && pip uninstall -y onnxruntime \
    && python -c 'import onnxruntime as ort, sys; sys.exit("CUDAExecutionProvider" not in ort.get_available_providers())'

COPY models ./models

USER infergate
CMD ["infergate", "worker"]
