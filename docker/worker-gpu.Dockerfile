# syntax=docker/dockerfile:1
# GPU inference worker (`infergate worker`): ONNX Runtime with its TensorRT and CUDA execution providers.
# Run with the NVIDIA container toolkit; compose starts it with `docker compose --profile gpu up`.
#   docker build -f docker/worker-gpu.Dockerfile -t infergate-worker-gpu .
#
# One pinned, documented combination (ONNX Runtime's TensorRT EP requirements table):
#   onnxruntime-gpu 1.22.0  - the PyPI wheel, built for CUDA 12.x and cuDNN 9.x
#   TensorRT 10.9.0.34      - the TensorRT that onnxruntime-gpu 1.22 is built against (CUDA 12.0-12.8)
#   CUDA 12.8 + cuDNN 9     - nvidia/cuda:12.8.1-cudnn-runtime: the newest CUDA that both support
# The host needs an NVIDIA driver for CUDA 12.8 (570 or newer, or a datacenter LTS branch the image lists in
# NVIDIA_REQUIRE_CUDA). Change the three together: a TensorRT that the wheel was not built against fails
# when the provider loads, and the worker then runs on CUDA (or the CPU) with only a warning in its log.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ARG ONNXRUNTIME_GPU_VERSION=1.22.0
ARG TENSORRT_VERSION=10.9.0.34

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    INFERGATE_DATA_DIR=/data \
    INFERGATE_MODELS_DIR=/app/models \
    ORT_TENSORRT_ENGINE_CACHE_ENABLE=1 \
    ORT_TENSORRT_CACHE_PATH=/var/cache/infergate/tensorrt

# Ubuntu 22.04 ships Python 3.11 in universe; a venv keeps pip away from the system Python.
# /var/cache/infergate/tensorrt: ONNX Runtime's TensorRT engine cache (the two ORT_TENSORRT_* variables above).
# Building an engine takes from seconds to minutes per model and GPU type; with the cache a restarted worker
# loads it instead. Engine file names carry the model's hash and the GPU's compute capability, so a stale or
# foreign engine is never used. Compose keeps the folder in a volume.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip \
    && useradd --create-home --uid 10001 --user-group infergate \
    && mkdir -p /data /var/cache/infergate/tensorrt \
    && chown infergate:infergate /data /var/cache/infergate/tensorrt

WORKDIR /app

# The project's dependencies with the `gpu` extra, minus the CPU onnxruntime. Both wheels install the same
# `onnxruntime` package folder, so installing both and uninstalling the CPU one afterwards deletes files that
# onnxruntime-gpu needs; never installing it avoids that. The constraint pins onnxruntime-gpu (see above).
COPY pyproject.toml README.md ./
RUN python -c 'import re, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; deps = [d for d in p["dependencies"] if re.split(r"[^A-Za-z0-9._-]", d, maxsplit=1)[0].lower() != "onnxruntime"]; print("\n".join(deps + p["optional-dependencies"]["gpu"]))' \
        > /tmp/requirements.txt \
    && echo "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" > /tmp/constraints.txt \
    && pip install -r /tmp/requirements.txt -c /tmp/constraints.txt

# TensorRT's runtime libraries (libnvinfer, its plugins and ONNX parser) as NVIDIA's wheel. The package on PyPI
# is a stub that downloads this wheel from NVIDIA's index at install time; naming the index makes that explicit,
# and only this one package is taken from it. --no-deps: its only dependency, the CUDA runtime, is in the base
# image. ld.so.conf makes the libraries visible to ONNX Runtime, which dlopens libnvinfer.so.10 by name.
RUN pip install --no-deps --index-url https://pypi.nvidia.com "tensorrt-cu12-libs==${TENSORRT_VERSION}" \
    && python -c 'import pathlib, sysconfig; print(pathlib.Path(sysconfig.get_paths()["platlib"], "tensorrt_libs"))' \
        > /etc/ld.so.conf.d/tensorrt.conf \
    && ldconfig \
    && ldconfig -p | grep -q 'libnvinfer.so.10 ' \
    && ldconfig -p | grep -q 'libnvinfer_plugin.so.10 '

COPY infergate ./infergate
COPY service ./service
COPY workers ./workers
# --no-deps: pip would otherwise pull the CPU onnxruntime back in. The uninstall is a guard that does
# nothing when it is absent, and the check fails the build unless the pinned onnxruntime-gpu has both GPU
# providers compiled in (no GPU is needed for that; whether they start is decided on the GPU host).
RUN pip install --no-deps . \
    && rm -rf build *.egg-info \
    && pip uninstall -y onnxruntime \
    && EXPECTED="${ONNXRUNTIME_GPU_VERSION}" python -c 'import os, sys, onnxruntime as ort; p = ort.get_available_providers(); ok = ort.__version__ == os.environ["EXPECTED"] and {"TensorrtExecutionProvider", "CUDAExecutionProvider"} <= set(p); sys.exit(None if ok else f"onnxruntime {ort.__version__}, providers {p}")'

COPY models ./models

USER infergate
CMD ["infergate", "worker"]
