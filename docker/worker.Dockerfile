# syntax=docker/dockerfile:1
# CPU inference worker (`infergate worker`): Celery consuming the broker, ONNX Runtime on the CPU.
# `infergate-base` is docker/base.Dockerfile's image (see service.Dockerfile).
FROM infergate-base

# One inference per process; ONNX Runtime's own thread pool uses the cores (INFERGATE_ONNX_THREADS).
ENV INFERGATE_WORKER_CONCURRENCY=1
CMD ["infergate", "worker"]
