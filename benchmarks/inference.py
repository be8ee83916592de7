"""Each shipped model under ONNX Runtime against its torch source on CPU: speed, settings, output agreement.

Run from the repository root (torch, deepbet and dcm-classifier come with the test group)::

    .venv/bin/python benchmarks/inference.py                 # all models, 1 and all-core threads, all variants
    .venv/bin/python benchmarks/inference.py --quick         # one repetition, worker settings only (for tests)
    .venv/bin/python benchmarks/inference.py --models ct-tissue-seg --repeat 20 --profile

For every network of every package in ``models/`` it builds the torch module the way the package's
``export.py`` does (importing that script's own classes and input helpers), feeds the same input to torch
and to ONNX Runtime, shaped as the worker feeds it (one whole 273 x 273 slice for ``ct-tissue-seg``, the
manifest's ``target_shape`` for the classifiers, 128^3 and 256^3 for the brain-extraction cascade),
warms both up and then times ``--repeat`` calls of each, in blocks run forwards then backwards so that
both see the same machine load on average:

* torch eager under ``torch.inference_mode()`` with ``torch.set_num_threads(T)``; deepbet's networks
  exist only as TorchScript, so brain-extraction's reference is TorchScript run as deepbet runs it;
* ONNX Runtime with the worker's own session options (:func:`workers.runtime.session_options`) and
  ``T`` intra-op threads, then variants: each graph optimisation level, a model saved after
  optimisation and loaded without re-optimising, and no thread spinning.

``mr-series-type`` has no torch source: dcm-classifier ships only the skl2onnx conversion of its
scikit-learn random forests (no pickled estimator). Its reference is therefore dcm-classifier's own
runtime, ``ImageTypeClassifierBase.infer_modality`` (which builds an ONNX Runtime session per call), and
the 1.3x target does not apply ("n/a").

It prints one table per model (medians, ranges, same-run ratio torch / ONNX Runtime, largest absolute
output difference, PASS/FAIL of "ONNX Runtime >= 1.3x torch eager" with the worker's settings at the
highest thread count) and appends one JSON record (machine, versions, date, figures) to
``<results>/inference.jsonl``. With ``--profile`` it also runs ONNX Runtime's profiler and torch's on
each network and prints the operators that take the most time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(ROOT))

from infergate.manifest import ModelPackage, load_package  # noqa: E402
from infergate.progress import Progress, bars, no_progress, wanted  # noqa: E402
from workers.preprocess import model_grid_shape  # noqa: E402
from workers.runtime import session_options, zipmap_to_array  # noqa: E402

MODELS_DIR = ROOT / "models"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
#: The issue's target: ONNX Runtime at least this many times faster than torch eager on CPU.
TARGET_RATIO = 1.3
#: The CT series the tissue model is sized for: 512 x 512 pixels of 0.8 mm (as in benchmarks/_data.py).
CT_SLICE_PIXELS, CT_PIXEL_SPACING_MM = 512, 0.8
#: Largest |ONNX Runtime - reference| each model may show, as its export script or tests require.
TOLERANCES = {
    "brain-extraction": 5e-3,  # probabilities; tests/integration/test_brain_extraction.py
    "ct-tissue-seg": 0.0,  # one-hot scores; export.py refuses any difference
    "ct-bone-classifier": 1e-3,  # logits up to +-276; export.py
    "cxr-demo-classifier": 1e-4,  # logits; export.py
    "mr-series-type": 1e-5,  # probabilities
}
Runner = Callable[[np.ndarray], np.ndarray]
#: Above this many input voxels, ONNX Runtime variants other than the worker's are timed one at a time.
BLOCK_VOXELS = 4 * 1024 * 1024


def emit(line: str = "") -> None:
    """One line of the report on standard output."""
    print(line, flush=True)  # noqa: T201


# The networks -----------------------------------------------------------------------------------------------


@dataclass
class Network:
    """One ONNX file of a package, its input as the worker feeds it, and the reference it came from."""

    model_id: str
    file: str
    input_name: str
    output_name: str
    make_input: Callable[[], np.ndarray]
    #: Builds the reference callable (torch module or original runtime) on first use.
    make_reference: Callable[[], Runner]
    reference: str  # e.g. "torch eager (TissueRules, export.py)"
    has_torch_source: bool = True
    #: Turns ONNX Runtime's raw output into an array (ZipMap -> probabilities).
    convert: Callable[[Any], np.ndarray] = np.asarray
    tolerance: float = 0.0

    @property
    def label(self) -> str:
        return self.model_id if self.file == "model.onnx" else f"{self.model_id}/{self.file}"


def load_export_module(model_id: str) -> ModuleType:
    """``models/<model_id>/export.py`` as a module (it is a script, not part of a package)."""
    path = MODELS_DIR / model_id / "export.py"
    spec = importlib.util.spec_from_file_location(f"_export_{model_id.replace('-', '_')}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torch_runner(module: Any) -> Runner:
    import torch

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(module(torch.from_numpy(batch)).numpy())

    return run


def _tissue(package: ModelPackage) -> list[Network]:
    """One whole CT slice: the worker resamples each 512^2 slice of 0.8 mm to the 1.5 mm grid, batch 1."""
    import torch.nn.functional as F

    export = load_export_module("ct-tissue-seg")
    manifest = package.manifest
    _, rows, columns = model_grid_shape(
        (1, CT_SLICE_PIXELS, CT_SLICE_PIXELS), (2.5, CT_PIXEL_SPACING_MM, CT_PIXEL_SPACING_MM), manifest.preprocess, 2
    )
    batch = manifest.preprocess.batch_size

    def make_input() -> np.ndarray:
        # export.py's verification slices (body, fat, lungs, bone, noise) resized to the worker's grid
        sample = F.interpolate(export.verification_input()[:1], size=(rows, columns), mode="bilinear")
        return np.ascontiguousarray(sample.expand(batch, 1, rows, columns).numpy(), dtype=np.float32)

    return [
        Network(
            manifest.id,
            manifest.file,
            manifest.input_name,
            manifest.output_name,
            make_input,
            lambda: _torch_runner(export.TissueRules().eval()),
            "torch eager (TissueRules, export.py)",
            tolerance=TOLERANCES[manifest.id],
        )
    ]


def _bone(package: ModelPackage) -> list[Network]:
    """The manifest's 32 x 64 x 64 grid: soft tissue with a dense block near the decision fraction."""
    export = load_export_module("ct-bone-classifier")
    manifest = package.manifest
    assert manifest.preprocess.target_shape is not None
    shape = (manifest.preprocess.batch_size, 1, *manifest.preprocess.target_shape)

    def make_input() -> np.ndarray:
        rng = np.random.default_rng(0)
        sample = export.hu_to_unit(40.0) + 0.01 * rng.standard_normal(shape)
        sample[..., :6, :12, :12] = export.hu_to_unit(700.0)
        return np.ascontiguousarray(sample, dtype=np.float32)

    return [
        Network(
            manifest.id,
            manifest.file,
            manifest.input_name,
            manifest.output_name,
            make_input,
            lambda: _torch_runner(export.HighDensityNet().eval()),
            "torch eager (HighDensityNet, export.py)",
            tolerance=TOLERANCES[manifest.id],
        )
    ]


def _cxr(package: ModelPackage) -> list[Network]:
    """The manifest's 256 x 256 grid: export.py's synthetic frontal chest."""
    export = load_export_module("cxr-demo-classifier")
    manifest = package.manifest
    assert manifest.preprocess.target_shape is not None
    rows, columns = manifest.preprocess.target_shape

    def make_input() -> np.ndarray:
        image = export.synthetic_chest(lung=0.5, midline=0.85).numpy()
        assert image.shape == (rows, columns)
        batch = np.broadcast_to(image, (manifest.preprocess.batch_size, 1, rows, columns))
        return np.array(batch, dtype=np.float32)  # a writable copy, as torch.from_numpy wants

    return [
        Network(
            manifest.id,
            manifest.file,
            manifest.input_name,
            manifest.output_name,
            make_input,
            lambda: _torch_runner(export.LungContrastNet().eval()),
            "torch eager (LungContrastNet, export.py)",
            tolerance=TOLERANCES[manifest.id],
        )
    ]


def _brain(package: ModelPackage) -> list[Network]:
    """Both networks of the cascade at the worker's fixed shapes: 128^3 (region of interest), 256^3."""
    import torch

    export = load_export_module("brain-extraction")
    manifest = package.manifest
    roi = manifest.preprocess.roi
    assert roi is not None and manifest.preprocess.target_shape is not None
    shapes = {roi.file: tuple(roi.shape), manifest.file: tuple(manifest.preprocess.target_shape)}
    names = {manifest.file: (manifest.input_name, manifest.output_name), roi.file: (roi.input_name, roi.output_name)}
    networks = []
    for source_name, target_name, size in export.NETWORKS:
        assert shapes[target_name] == (size, size, size), (target_name, shapes[target_name])
        source = Path(export.DATA_PATH) / "models" / source_name

        def make_reference(source: Path = source) -> Runner:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated; deepbet ships it
                return _torch_runner(torch.jit.load(str(source), map_location="cpu").eval())

        networks.append(
            Network(
                manifest.id,
                target_name,
                *names[target_name],
                functools.partial(export.example_input, size),
                make_reference,
                f"TorchScript (deepbet {source_name}; deepbet has no eager module)",
                tolerance=TOLERANCES[manifest.id],
            )
        )
    return networks


def _series_type(package: ModelPackage) -> list[Network]:
    """One volume's 28 header features; reference: dcm-classifier's own ``infer_modality``."""
    export = load_export_module("mr-series-type")
    manifest = package.manifest
    from dcm_classifier.dicom_config import inference_features
    from dcm_classifier.image_type_inference import ImageTypeClassifierBase

    labels = [label for label, _, _ in export.CLASSES]

    def make_input() -> np.ndarray:
        # a 3-D T1-weighted gradient-echo series' header values, in dcm-classifier's feature order
        rng = np.random.default_rng(0)
        row = [float(rng.choice([0.0, 1.0, rng.uniform(1, 3000)])) for _ in inference_features]
        return np.asarray([row], dtype=np.float32)

    def make_reference() -> Runner:
        classifier = ImageTypeClassifierBase()
        classifier.series_number = 1

        def run(batch: np.ndarray) -> np.ndarray:
            out = []
            for features in batch:
                _, table = classifier.infer_modality(dict(zip(inference_features, features.tolist(), strict=True)))
                out.append([table[f"GUESS_ONNX_{label}"].iloc[0] for label in labels])
            return np.asarray(out, dtype=np.float32)

        return run

    return [
        Network(
            manifest.id,
            manifest.file,
            manifest.input_name,
            manifest.output_name,
            make_input,
            make_reference,
            "dcm-classifier's own infer_modality (no torch source: skl2onnx random forests)",
            has_torch_source=False,
            convert=lambda rows: zipmap_to_array(rows, manifest),
            tolerance=TOLERANCES[manifest.id],
        )
    ]


BUILDERS: dict[str, Callable[[ModelPackage], list[Network]]] = {
    "brain-extraction": _brain,
    "ct-bone-classifier": _bone,
    "ct-tissue-seg": _tissue,
    "cxr-demo-classifier": _cxr,
    "mr-series-type": _series_type,
}


# ONNX Runtime variants --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    describe: str
    level: str | None = None  # GraphOptimizationLevel member name; None keeps the worker's
    saved: bool = False  # optimise once, save, load the saved file with optimisations off
    spinning: bool = True


WORKER = Variant("worker", "workers.runtime.session_options (ORT_ENABLE_ALL)")
VARIANTS = (
    WORKER,
    Variant("disable_all", "ORT_DISABLE_ALL: no graph optimisation", level="ORT_DISABLE_ALL"),
    Variant("basic", "ORT_ENABLE_BASIC: constant folding, redundant nodes", level="ORT_ENABLE_BASIC"),
    Variant("extended", "ORT_ENABLE_EXTENDED: + operator fusions", level="ORT_ENABLE_EXTENDED"),
    Variant("layout", "ORT_ENABLE_LAYOUT: + NCHWc layout", level="ORT_ENABLE_LAYOUT"),
    Variant("saved_optimised", "ORT_ENABLE_ALL model saved, reloaded with ORT_DISABLE_ALL", saved=True),
    Variant("no_spinning", "worker options + session.intra_op.allow_spinning=0", spinning=False),
)


def make_session(path: Path, threads: int, variant: Variant, workdir: Path) -> tuple[ort.InferenceSession, float]:
    """A CPU session for ``variant`` and the seconds its creation took (the saved variant: the reload)."""
    options = session_options(threads)
    if variant.level is not None:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, variant.level)
    if not variant.spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = path
    if variant.saved:
        model = workdir / f"{path.parent.name}-{path.stem}-optimised.onnx"
        options.optimized_model_filepath = str(model)
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        options = session_options(threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    start = time.perf_counter()
    session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    return session, time.perf_counter() - start


def ort_runner(session: ort.InferenceSession, network: Network) -> Runner:
    def run(batch: np.ndarray) -> np.ndarray:
        (output,) = session.run([network.output_name], {network.input_name: batch})
        return network.convert(output)

    return run


# Timing -----------------------------------------------------------------------------------------------------


@dataclass
class Row:
    threads: int
    runtime: str  # "torch" / "reference" / "onnxruntime"
    variant: str
    times: list[float] = field(default_factory=list)
    max_abs_diff: float | None = None
    load_s: float | None = None
    ratio: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def record(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "runtime": self.runtime,
            "variant": self.variant,
            "n": len(self.times),
            "median_s": self.median,
            "min_s": min(self.times),
            "max_s": max(self.times),
            "ratio": self.ratio,
            "max_abs_diff": self.max_abs_diff,
            "load_s": self.load_s,
        }


def set_torch_threads(threads: int) -> None:
    """torch's intra-op threads for the reference (left set: switching back and forth costs a warm-up each time)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def warm_up(run: Runner, batch: np.ndarray, count: int, seconds: float) -> np.ndarray:
    """Call ``run`` ``count`` times and then until ``seconds`` have passed; returns the last output.

    Time matters as well as count: on this 2-vCPU machine a new or resized OpenMP team sometimes shares
    one CPU with the calling thread for up to about a second, and every parallel region then costs a
    scheduler tick (torch's 20 us network took 8 ms per call), whether or not onnxruntime is imported.
    """
    start = time.perf_counter()
    output = run(batch)
    for _ in range(count - 1):
        output = run(batch)
    while time.perf_counter() - start < seconds:
        output = run(batch)
    return output


def timed(run: Runner, batch: np.ndarray) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    output = run(batch)
    return time.perf_counter() - start, output


def repetitions(first_seconds: float, repeat: int, max_seconds: float) -> int:
    """``repeat``, cut so that one row takes about ``max_seconds`` at most, but never below 3 (or ``repeat``)."""
    if first_seconds <= 0:
        return repeat
    return max(min(repeat, 3), min(repeat, int(max_seconds / first_seconds)))


def _blocks(
    batch: np.ndarray,
    entries: list[tuple[Row, Runner]],
    repeat: int,
    max_seconds: float,
    progress: Progress = no_progress,
) -> None:
    """Time ``entries`` in blocks, in order A B C ... then ... C B A (half the repetitions each way).

    Blocks rather than alternating single calls: torch's OpenMP threads and ONNX Runtime's thread pools
    spin for a while after each call, and on a small machine one runtime's spinning threads stall the
    other's (measured: torch's 0.1 ms network took 40 ms at 2 threads when every call alternated with
    ONNX Runtime sessions). Each block starts with an untimed call so that the previous block's threads have
    gone quiet; the mirrored second pass cancels a steady drift in machine load between the first and last
    entries.
    """
    first = sum(max(timed(run, batch)[0], 1e-9) for _, run in entries)
    count = repetitions(first, repeat, max_seconds * len(entries))
    settle = first / len(entries) < 0.5  # for seconds-long calls the settling call costs more than it helps
    # one bar over every timed call of the row(s); advanced between calls, never inside a timing
    ticks = iter(progress(range(count * len(entries)), total=count * len(entries), desc="timed calls"))
    for order, n in ((entries, (count + 1) // 2), (entries[::-1], count // 2)):
        for row, run in order:
            if settle and n:
                run(batch)
            for _ in range(n):
                row.times.append(timed(run, batch)[0])
                next(ticks, None)
    next(ticks, None)  # the bar closes once its iterable is exhausted


def measure(network: Network, args: argparse.Namespace, workdir: Path) -> list[Row]:
    """All rows of one network, per thread count; ratios are against the reference of the same thread count.

    Rows are timed in mirrored blocks (:func:`_blocks`). For a network whose input exceeds
    ``BLOCK_VOXELS`` the reference and the worker's settings are timed together and each other variant on
    its own afterwards, so that a single extra session (gigabytes at 256^3) is alive at a time.
    """
    batch = network.make_input()
    reference = network.make_reference()
    path = MODELS_DIR / network.model_id / network.file
    rows: list[Row] = []
    variants = [v for v in VARIANTS if v.name in args.variants and v is not WORKER]
    big = batch.size > BLOCK_VOXELS
    progress = bars(wanted(args.progress))
    for threads in args.threads:
        if network.has_torch_source:
            set_torch_threads(threads)
        ref_row = Row(threads, "torch" if network.has_torch_source else "reference", "eager")
        if not network.has_torch_source:
            ref_row.variant = "original"
        expected = warm_up(reference, batch, args.warmup, args.warmup_seconds)
        entries: list[tuple[Row, Runner]] = [(ref_row, reference)]
        for variant in [WORKER] if big else [WORKER, *variants]:
            session, load_s = make_session(path, threads, variant, workdir)
            entries.append((Row(threads, "onnxruntime", variant.name, load_s=load_s), ort_runner(session, network)))
        for row, run in entries[1:]:
            actual = warm_up(run, batch, args.warmup, args.warmup_seconds)
            row.max_abs_diff = float(np.max(np.abs(actual - expected)))
        _blocks(batch, entries, args.repeat, args.max_seconds, progress)
        block_rows = [row for row, _ in entries]
        del entries
        for variant in variants if big else []:
            session, load_s = make_session(path, threads, variant, workdir)
            run = ort_runner(session, network)
            row = Row(threads, "onnxruntime", variant.name, load_s=load_s)
            actual = warm_up(run, batch, args.warmup, args.warmup_seconds)
            row.max_abs_diff = float(np.max(np.abs(actual - expected)))
            _blocks(batch, [(row, run)], args.repeat, args.max_seconds, progress)
            block_rows.append(row)
            del session, run
        for row in block_rows[1:]:
            row.ratio = ref_row.median / row.median
        rows += block_rows
    return rows


# Profiling --------------------------------------------------------------------------------------------------


def profile_ort(network: Network, threads: int, runs: int, workdir: Path) -> dict[str, Any]:
    """ONNX Runtime's own profile of ``runs`` calls with the worker's options: time per operator type.

    Kernel names show what the optimiser made of the graph (``FusedConv``, ``NchwcConv`` and the
    ``ReorderInput``/``ReorderOutput`` layout transposes); a provider other than CPU would be a fallback.
    """
    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / f"ort-{network.model_id}-{Path(network.file).stem}")
    session = ort.InferenceSession(
        str(MODELS_DIR / network.model_id / network.file), sess_options=options, providers=["CPUExecutionProvider"]
    )
    batch = network.make_input()
    run = ort_runner(session, network)
    run(batch)  # the first call allocates; keep it in the profile but as one of runs + 1
    for _ in range(runs):
        run(batch)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: Counter[str] = Counter()
    count: Counter[str] = Counter()
    providers: Counter[str] = Counter()
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        op = event["args"].get("op_name", "?")
        per_op[op] += event["dur"]
        count[op] += 1
        providers[event["args"].get("provider", "?")] += 1
    total = sum(per_op.values()) or 1
    calls = runs + 1
    return {
        "calls": calls,
        "total_ms_per_call": total / 1000.0 / calls,
        "ops": [
            {"op": op, "ms_per_call": dur / 1000.0 / calls, "share": dur / total, "nodes": count[op] // calls}
            for op, dur in per_op.most_common()
        ],
        "providers": dict(providers),
    }


def profile_torch(network: Network, threads: int, runs: int) -> dict[str, Any]:
    """torch's profiler over ``runs`` calls of the reference: self CPU time per aten operator."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not network.has_torch_source:
        return {}
    run = network.make_reference()
    batch = network.make_input()
    set_torch_threads(threads)
    warm_up(run, batch, 3, 1.0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            run(batch)
    averages = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)
    total = sum(a.self_cpu_time_total for a in averages) or 1
    del torch
    return {
        "total_ms_per_call": total / 1000.0 / runs,
        "ops": [
            {"op": a.key, "ms_per_call": a.self_cpu_time_total / 1000.0 / runs, "share": a.self_cpu_time_total / total}
            for a in averages[:12]
        ],
    }


def print_profile(label: str, name: str, profile: dict[str, Any], top: int = 8) -> None:
    if not profile:
        return
    emit(f"  {name} profile of {label}: {profile['total_ms_per_call']:.2f} ms of operators per call")
    for op in profile["ops"][:top]:
        nodes = f" ({op['nodes']} nodes)" if "nodes" in op else ""
        emit(f"    {op['op']:<36} {op['ms_per_call']:10.3f} ms  {op['share']:6.1%}{nodes}")
    if "providers" in profile:
        emit(f"    kernels per provider: {profile['providers']}")


# Report -----------------------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g}" if seconds < 0.1 else f"{seconds * 1000:.0f}"


def verdict(network: Network, rows: list[Row], threads: int) -> str:
    """PASS/FAIL of the target for the worker's settings at ``threads``; n/a without a torch source."""
    if not network.has_torch_source:
        return "n/a"
    (worker,) = [r for r in rows if r.threads == threads and r.variant == WORKER.name]
    assert worker.ratio is not None
    return "PASS" if worker.ratio >= TARGET_RATIO else "FAIL"


def print_table(network: Network, rows: list[Row], shape: tuple[int, ...]) -> None:
    emit(f"\n{network.label}: input {shape} float32; reference: {network.reference}")
    header = (
        f"  {'threads':>7}  {'runtime':<12} {'variant':<16} {'n':>3}  {'median ms':>10}  {'range ms':>17}  "
        f"{'ratio':>6}  {'max |diff|':>10}  {'load ms':>8}  target"
    )
    emit(header)
    for row in rows:
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        diff = f"{row.max_abs_diff:.2g}" if row.max_abs_diff is not None else "-"
        load = _ms(row.load_s) if row.load_s is not None else "-"
        target = "-"
        if row.ratio is not None:
            if not network.has_torch_source:
                target = "n/a"
            else:
                target = "PASS" if row.ratio >= TARGET_RATIO else "FAIL"
            if row.max_abs_diff is not None and row.max_abs_diff > network.tolerance:
                target += f" (diff > {network.tolerance:g})"
        span = f"{_ms(min(row.times))}-{_ms(max(row.times))}"
        emit(
            f"  {row.threads:>7}  {row.runtime:<12} {row.variant:<16} {len(row.times):>3}  {_ms(row.median):>10}  "
            f"{span:>17}  {ratio:>6}  {diff:>10}  {load:>8}  {target}"
        )


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_mib": memory,
        "load_average": list(os.getloadavg()),
    }


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("numpy", "onnxruntime", "onnx", "torch", "deepbet", "dcm-classifier"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    found["infergate_commit"] = commit
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(BUILDERS), default=sorted(BUILDERS))
    parser.add_argument("--repeat", type=int, default=10, help="timed calls per row (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    parser.add_argument("--warmup-seconds", type=float, default=1.0, help="and untimed calls for this long (1 s)")
    parser.add_argument(
        "--max-seconds", type=float, default=20.0, help="cut a row's repetitions to about this long, keeping 3"
    )
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: 1 and all cores)")
    parser.add_argument("--variants", nargs="+", choices=[v.name for v in VARIANTS], default=None)
    parser.add_argument("--quick", action="store_true", help="1 warm-up, 1 repetition, worker settings, all cores")
    parser.add_argument("--profile", action="store_true", help="also profile ONNX Runtime and torch per network")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="folder of inference.jsonl")
    parser.add_argument("--note", default="", help="free text kept in the record (e.g. what was changed)")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Progress bar over the repetitions on stderr (default: only when stderr is a terminal).",
    )
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    if args.quick:
        args.repeat, args.warmup, args.warmup_seconds = 1, 1, 0.0
        args.threads = args.threads or [cores]
        args.variants = args.variants or [WORKER.name]
    args.threads = sorted(set(args.threads or [1, cores]))
    args.variants = args.variants or [v.name for v in VARIANTS]
    if args.repeat < 1 or args.warmup < 1 or any(t < 1 for t in args.threads):
        parser.error("--repeat, --warmup and --threads should be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    top_threads = max(args.threads)
    started = datetime.datetime.now(datetime.UTC)
    host = machine()
    emit(
        f"ONNX Runtime vs torch on CPU, {host['cpu']} ({host['cpus']} CPUs), load {host['load_average'][0]:.2f}; "
        f"threads {args.threads}, repeat {args.repeat}, warm-up {args.warmup}; target ORT >= {TARGET_RATIO}x torch "
        f"eager with the worker's settings at {top_threads} threads"
    )
    records: list[dict[str, Any]] = []
    summary: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="infergate-bench-") as folder:
        workdir = Path(folder)
        for model_id in args.models:
            package = load_package(MODELS_DIR / model_id)
            networks = BUILDERS[model_id](package)
            model_ref = model_ort = 0.0
            model_verdicts = []
            for network in networks:
                rows = measure(network, args, workdir)
                shape = tuple(network.make_input().shape)
                print_table(network, rows, shape)
                result = verdict(network, rows, top_threads)
                top = {
                    r.runtime: r
                    for r in rows
                    if r.threads == top_threads and r.variant in (WORKER.name, "eager", "original")
                }
                within = all(r.max_abs_diff is None or r.max_abs_diff <= network.tolerance for r in rows)
                record: dict[str, Any] = {
                    "model": model_id,
                    "network": network.file,
                    "input_shape": list(shape),
                    "reference": network.reference,
                    "torch_source": network.has_torch_source,
                    "tolerance": network.tolerance,
                    "within_tolerance": within,
                    "verdict": result,
                    "rows": [row.record() for row in rows],
                }
                if args.profile:
                    record["profile"] = {
                        "onnxruntime": profile_ort(network, top_threads, max(args.repeat // 2, 2), workdir),
                        "torch": profile_torch(network, top_threads, max(args.repeat // 2, 2)),
                    }
                    print_profile(network.label, "ONNX Runtime", record["profile"]["onnxruntime"])
                    print_profile(network.label, "torch", record["profile"]["torch"])
                records.append(record)
                model_ref += top["torch" if network.has_torch_source else "reference"].median
                model_ort += top["onnxruntime"].median
                model_verdicts.append(result)
            ratio = model_ref / model_ort
            overall = "n/a" if "n/a" in model_verdicts else ("PASS" if ratio >= TARGET_RATIO else "FAIL")
            summary.append((model_id, ratio, overall))
            if len(networks) > 1:
                emit(f"  {model_id}, all networks together: ratio {ratio:.2f}x -> {overall}")
    emit(f"\nSummary: ONNX Runtime (worker settings, {top_threads} threads) vs reference, target >= {TARGET_RATIO}x")
    for model_id, ratio, overall in summary:
        emit(f"  {model_id:<22} {ratio:6.2f}x  {overall}")
    document = {
        "benchmark": "inference",
        "date": started.isoformat(timespec="seconds"),
        "note": args.note,
        "models_sha256": {m: load_package(MODELS_DIR / m, verify_hash=False).manifest.sha256 for m in args.models},
        "machine": host | {"load_average_end": list(os.getloadavg())},
        "versions": versions(),
        "settings": {
            "repeat": args.repeat,
            "warmup": args.warmup,
            "warmup_seconds": args.warmup_seconds,
            "threads": args.threads,
            "variants": args.variants,
            "quick": args.quick,
            "max_seconds": args.max_seconds,
            "target_ratio": TARGET_RATIO,
        },
        "summary": [{"model": m, "ratio": r, "verdict": v} for m, r, v in summary],
        "networks": records,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / "inference.jsonl"
    with out.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(document) + "\n")
    emit(f"appended a record to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
