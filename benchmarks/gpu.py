"""Throughput of each shipped model per ONNX Runtime provider (TensorRT, CUDA, CPU), batch size and precision.

For a GPU machine with onnxruntime-gpu in place of onnxruntime, plus the test group (torch builds the same
inputs as ``benchmarks/inference.py``) and, for the fp16 variants, onnx (the export extra)::

    .venv/bin/python -m pip uninstall -y onnxruntime && .venv/bin/python -m pip install 'onnxruntime-gpu>=1.17'
    .venv/bin/python benchmarks/gpu.py                     # all models, providers, batch sizes 1-16
    .venv/bin/python benchmarks/gpu.py --quick             # batch 1, 1 repetition (what the tests run)

Where the installed ONNX Runtime offers no GPU provider (or lists one that cannot start, e.g. no driver)
it prints "no GPU providers available; skipped" and appends a record saying so; ``--providers
CPUExecutionProvider`` runs the CPU rows alone, to check the script on any machine.

Per model it feeds the worker's input (:mod:`benchmarks.inference`'s builders), repeated along the batch
axis where the model's batch axis is dynamic (brain-extraction's networks are exported at batch 1), and
times ``session.run`` with numpy arrays in and out, as the worker calls it (host-device copies included).
Sessions get the worker's options (:func:`workers.runtime.session_options`) and the provider followed by
CPU, as :class:`workers.runtime.OnnxRunner` asks for them. Variants:

* ``fp32`` on each provider;
* ``fp16`` on CUDA: the model converted by ``onnxruntime.transformers.float16`` with float32 inputs and
  outputs kept (the worker's interface) and normalisation statistics (ReduceMean, Sqrt, Softmax) left in
  float32; on TensorRT: ``trt_fp16_enable``. A row is marked "within tolerance" only where its outputs stay
  within the model's tolerance of the CPU float32 output (``benchmarks.inference.TOLERANCES``);
  classifiers are also checked for the same decision.

Each row has the median, range, items per second, the GPU memory in use after the run (``nvidia-smi``)
and the kernels per provider from one profiled call (nodes a GPU provider cannot run fall back to CPU).
One JSON record goes to ``<results>/gpu.jsonl``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT, ROOT / "benchmarks"):  # run as a script: the repository's packages and inference.py
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import inference  # noqa: E402  (benchmarks/inference.py: the networks and their inputs)

from infergate.manifest import load_package  # noqa: E402
from infergate.progress import bars, wanted  # noqa: E402
from workers.runtime import CPU_PROVIDER, session_options  # noqa: E402

TENSORRT, CUDA = "TensorrtExecutionProvider", "CUDAExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)
DEFAULT_BATCHES = (1, 2, 4, 8, 16)
#: Larger batches are skipped once one batch's input passes this many voxels (memory and time).
MAX_BATCH_VOXELS = 64 * 1024 * 1024
#: Ops kept in float32 by the fp16 conversion: normalisation statistics and the final softmax.
FP16_BLOCKED_OPS = ["ReduceMean", "Sqrt", "Softmax"]
SKIPPED = "no GPU providers available; skipped"


def emit(line: str = "") -> None:
    print(line, flush=True)  # noqa: T201


@dataclass
class Config:
    provider: str
    precision: str  # "fp32" / "fp16"

    @property
    def label(self) -> str:
        return f"{self.provider.removesuffix('ExecutionProvider')} {self.precision}"


def gpu_memory_mib() -> int | None:
    """GPU memory in use on device 0 (MiB) by nvidia-smi, or None without it."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=0"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return int(out.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def gpu_name() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader", "--id=0"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return out.strip().splitlines()[0]
    return None


def provider_options(config: Config, workdir: Path) -> list[Any]:
    """The providers list for a session: the configured one (with options) then CPU, as the worker asks."""
    if config.provider == CPU_PROVIDER:
        return [CPU_PROVIDER]
    if config.provider == TENSORRT:
        options = {
            "trt_fp16_enable": config.precision == "fp16",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(workdir / "trt-cache"),
        }
        return [(TENSORRT, options), CUDA, CPU_PROVIDER]
    return [(config.provider, {}), CPU_PROVIDER]


def usable_gpu_providers(requested: list[str]) -> tuple[list[str], list[str]]:
    """The requested GPU providers that can really start a session here, and notes on those that cannot."""
    offered = ort.get_available_providers()
    probe = ROOT / "models" / "cxr-demo-classifier" / "model.onnx"
    usable: list[str] = []
    notes: list[str] = []
    for name in [p for p in requested if p in GPU_PROVIDERS]:
        if name not in offered:
            notes.append(f"{name} is not in this ONNX Runtime ({ort.get_device()}, {', '.join(offered)})")
            continue
        try:
            with tempfile.TemporaryDirectory() as folder:
                session = ort.InferenceSession(
                    str(probe),
                    sess_options=session_options(),
                    providers=provider_options(Config(name, "fp32"), Path(folder)),
                )
                started = session.get_providers()
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            notes.append(f"{name} failed to start: {exc}")
            continue
        if started[0] == name:
            usable.append(name)
        else:
            notes.append(f"{name} is listed but could not start (session got {started})")
    return usable, notes


def fp16_model(path: Path, workdir: Path) -> Path:
    """``path`` converted to float16 with float32 inputs/outputs (needs onnx, the export extra)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True, op_block_list=FP16_BLOCKED_OPS)
    target = workdir / f"{path.parent.name}-{path.stem}-fp16.onnx"
    onnx.save(model, str(target))
    return target


def placement(
    model: Path, providers: list[Any], batch: np.ndarray, network: inference.Network, workdir: Path
) -> dict[str, int]:
    """Kernels per provider in one profiled call: where a GPU provider left nodes to the CPU."""
    options = session_options()
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / f"gpu-{model.stem}")
    session = ort.InferenceSession(str(model), sess_options=options, providers=providers)
    session.run([network.output_name], {network.input_name: batch})
    events = json.loads(Path(session.end_profiling()).read_text())
    counts: Counter[str] = Counter(
        e["args"].get("provider", "?")
        for e in events
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
    )
    return dict(counts)


def batch_sizes(session: ort.InferenceSession, one: np.ndarray, wanted: list[int]) -> list[int]:
    """``wanted`` where the model's batch axis is dynamic (and the input stays reasonable), else [1]."""
    first = session.get_inputs()[0].shape[0]
    if isinstance(first, int):
        return [first]
    return [b for b in wanted if b == 1 or b * one.size <= MAX_BATCH_VOXELS]


def agreement(network: inference.Network, output: np.ndarray, expected: np.ndarray) -> tuple[float, bool]:
    """Largest |output - CPU float32| over the batch, and whether it is within tolerance (and decisions agree)."""
    difference = float(np.max(np.abs(output - expected)))
    within = difference <= network.tolerance
    if output.ndim == 2:  # classifiers: the same class must win
        within = within and bool(np.all(output.argmax(axis=1) == expected.argmax(axis=1)))
    return difference, within


def measure(
    network: inference.Network, configs: list[Config], args: argparse.Namespace, workdir: Path
) -> list[dict[str, Any]]:
    one = network.make_input()
    path = inference.MODELS_DIR / network.model_id / network.file
    cpu = ort.InferenceSession(str(path), sess_options=session_options(), providers=[CPU_PROVIDER])
    reference = network.convert(cpu.run([network.output_name], {network.input_name: one})[0])
    sizes = batch_sizes(cpu, one, args.batch_sizes)
    del cpu
    rows: list[dict[str, Any]] = []
    for config in configs:
        base = {"provider": config.provider, "precision": config.precision}
        model = path
        if config.precision == "fp16" and config.provider == CUDA:
            try:
                model = fp16_model(path, workdir)
            except ImportError as exc:
                rows.append(base | {"skipped": f"fp16 conversion needs onnx (the export extra): {exc}"})
                continue
            except Exception as exc:  # e.g. ai.onnx.ml operators the converter does not handle
                rows.append(base | {"skipped": f"fp16 conversion failed: {exc}"})
                continue
        providers = provider_options(config, workdir)
        memory_before = gpu_memory_mib()
        start = time.perf_counter()
        try:
            session = ort.InferenceSession(str(model), sess_options=session_options(), providers=providers)
        except Exception as exc:  # onnxruntime's pybind exceptions: report and go on
            rows.append(base | {"error": f"session: {exc}"})
            continue
        load_s = time.perf_counter() - start
        for size in sizes:
            batch = np.ascontiguousarray(np.repeat(one, size, axis=0))
            expected = np.repeat(reference, size, axis=0)
            run_input = {network.input_name: batch}
            try:
                start = time.perf_counter()
                output = network.convert(session.run([network.output_name], run_input)[0])
                first_s = time.perf_counter() - start  # includes TensorRT's engine build for a new shape
                for _ in range(args.warmup - 1):
                    session.run([network.output_name], run_input)
                times = []
                for _ in bars(wanted(args.progress))(range(args.repeat), desc=f"batch {size}"):
                    start = time.perf_counter()
                    session.run([network.output_name], run_input)
                    times.append(time.perf_counter() - start)
            except Exception as exc:  # e.g. out of GPU memory at a large batch
                rows.append(base | {"batch": size, "error": str(exc)})
                break
            difference, within = agreement(network, output, expected)
            median = statistics.median(times)
            memory = gpu_memory_mib()
            rows.append(
                base
                | {
                    "batch": size,
                    "n": len(times),
                    "median_s": median,
                    "min_s": min(times),
                    "max_s": max(times),
                    "items_per_s": size / median,
                    "first_call_s": first_s,
                    "load_s": load_s,
                    "max_abs_diff": difference,
                    "within_tolerance": within,
                    "gpu_memory_mib": None if memory is None or memory_before is None else memory - memory_before,
                    "session_providers": session.get_providers(),
                }
            )
        if rows and "median_s" in rows[-1] and not args.quick:
            with contextlib.suppress(Exception):  # profiling is a detail; never lose the timings for it
                rows[-1]["kernels_per_provider"] = placement(model, providers, one, network, workdir)
        del session
    return rows


def print_rows(network: inference.Network, rows: list[dict[str, Any]], shape: tuple[int, ...]) -> None:
    emit(f"\n{network.label}: input {shape} per item; tolerance {network.tolerance:g} vs CPU float32")
    emit(
        f"  {'provider':<10} {'prec':<5} {'batch':>5} {'n':>3}  {'median ms':>10}  {'range ms':>17}  "
        f"{'items/s':>9}  {'max |diff|':>10}  {'tolerance':<9}  {'GPU MiB':>7}  {'first ms':>9}"
    )
    for row in rows:
        name = row["provider"].removesuffix("ExecutionProvider")
        if "median_s" not in row:
            reason = row.get("skipped") or row.get("error")
            emit(f"  {name:<10} {row['precision']:<5} {row.get('batch', '-'):>5}  {reason}")
            continue
        span = f"{row['min_s'] * 1000:.3g}-{row['max_s'] * 1000:.3g}"
        memory = "-" if row["gpu_memory_mib"] is None else str(row["gpu_memory_mib"])
        emit(
            f"  {name:<10} {row['precision']:<5} {row['batch']:>5} {row['n']:>3}  {row['median_s'] * 1000:>10.3g}  "
            f"{span:>17}  {row['items_per_s']:>9.1f}  {row['max_abs_diff']:>10.2g}  "
            f"{'yes' if row['within_tolerance'] else 'NO':<9}  {memory:>7}  {row['first_call_s'] * 1000:>9.0f}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(inference.BUILDERS), default=sorted(inference.BUILDERS))
    parser.add_argument(
        "--providers", nargs="+", default=[TENSORRT, CUDA, CPU_PROVIDER], help="default: TensorRT, CUDA and CPU"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 2 4 8 16 (--quick: 1)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-fp16", action="store_true", help="float32 only")
    parser.add_argument("--quick", action="store_true", help="batch 1, 1 warm-up, 1 repetition, no profiling")
    parser.add_argument("--results", type=Path, default=inference.DEFAULT_RESULTS, help="folder of gpu.jsonl")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Progress bar over the repetitions on stderr (default: only when stderr is a terminal).",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.repeat, args.warmup = args.batch_sizes or [1], 1, 1
    args.batch_sizes = args.batch_sizes or list(DEFAULT_BATCHES)
    if args.repeat < 1 or args.warmup < 1 or any(b < 1 for b in args.batch_sizes):
        parser.error("--repeat, --warmup and --batch-sizes should be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.UTC)
    gpus, notes = usable_gpu_providers(args.providers)
    document: dict[str, Any] = {
        "benchmark": "gpu",
        "date": started.isoformat(timespec="seconds"),
        "machine": inference.machine() | {"gpu": gpu_name()},
        "versions": inference.versions() | {"onnxruntime_device": ort.get_device()},
        "available_providers": ort.get_available_providers(),
        "usable_gpu_providers": gpus,
        "notes": notes,
        "settings": {
            "providers": args.providers,
            "batch_sizes": args.batch_sizes,
            "repeat": args.repeat,
            "warmup": args.warmup,
            "fp16": not args.no_fp16,
            "quick": args.quick,
        },
    }
    for note in notes:
        emit(note)
    only_cpu = args.providers == [CPU_PROVIDER]
    if not gpus and not only_cpu:
        emit(SKIPPED)
        document["skipped"] = SKIPPED
        write(args.results, document)
        return 0
    configs = [Config(p, "fp32") for p in [*gpus, CPU_PROVIDER] if p in args.providers]
    if not args.no_fp16:
        configs += [Config(p, "fp16") for p in gpus]
    emit(f"providers: {', '.join(c.label for c in configs)}; GPU: {document['machine']['gpu']}")
    records = []
    with tempfile.TemporaryDirectory(prefix="infergate-gpu-") as folder:
        for model_id in args.models:
            for network in inference.BUILDERS[model_id](load_package(inference.MODELS_DIR / model_id)):
                rows = measure(network, configs, args, Path(folder))
                shape = tuple(network.make_input().shape[1:])
                print_rows(network, rows, shape)
                records.append(
                    {
                        "model": model_id,
                        "network": network.file,
                        "item_shape": list(shape),
                        "tolerance": network.tolerance,
                        "rows": rows,
                    }
                )
    document["networks"] = records
    document["machine"]["load_average_end"] = list(os.getloadavg())
    write(args.results, document)
    return 0


def write(results: Path, document: dict[str, Any]) -> None:
    results.mkdir(parents=True, exist_ok=True)
    out = results / "gpu.jsonl"
    with out.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(document) + "\n")
    emit(f"appended a record to {out}")


if __name__ == "__main__":
    sys.exit(main())
