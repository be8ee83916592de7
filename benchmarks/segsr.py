"""SEG/SR writing: the node's writer against plain highdicom, in the same run (issue 6, item 4).

For a synthetic CT series (default 200 slices of 512 x 512) and label maps with 1 and 5 labels
(ellipsoid blobs, each over a third to two thirds of the slices), each case builds a BINARY
Segmentation and a TID 1500 Comprehensive 3D SR and writes both as Part 10 files:

* ``node``: :func:`infergate.dicom.seg.build_seg` and :func:`infergate.dicom.sr.build_sr` with the
  measurements and volume totals that ``workers/pipeline.py`` passes, encoded and stored durably as
  the worker does (``save_as(..., enforce_file_format=True)`` into a buffer, then
  :func:`infergate.dicom.storage.replace_file`, which fsyncs).
* ``highdicom``: what a highdicom user writes without tuning: ``hd.seg.Segmentation`` of the label
  map with default options, and a ``MeasurementReport`` with one volumetric group per segment
  (the minimal equivalent of the node's report: no Image Library, no volume totals), each saved
  with ``save_as(path)``.

Repetitions of all cases are interleaved, so drift on a noisy machine affects every case alike;
times are medians with min-max, and each node/highdicom ratio is taken from the two cases of the
same segment count in the same run. Peak memory is Python's ``tracemalloc`` peak (numpy arrays
included) over one extra, untimed run per case, with the inputs allocated beforehand; RSS would
count the inputs and the interpreter. A JSON record of the run is appended to
``<results-dir>/segsr.jsonl``.

Usage::

    python benchmarks/segsr.py                  # 200 x 512², 1 and 5 segments, 7 repetitions
    python benchmarks/segsr.py --quick          # tiny sizes, 1 repetition (used by the tests)
    python benchmarks/segsr.py --slices 100 --size 256 --segments 3 --repeat 11 --validate
"""

from __future__ import annotations

import argparse
import datetime
import gc
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.sr.codedict import codes

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python benchmarks/segsr.py
    sys.path.insert(0, str(REPO_ROOT))

import infergate  # noqa: E402
from benchmarks import _data  # noqa: E402
from infergate.dicom.seg import build_seg  # noqa: E402
from infergate.dicom.sr import SegmentMeasurement, TotalVolume, build_sr  # noqa: E402
from infergate.dicom.storage import replace_file, result_relpath  # noqa: E402
from infergate.dicom.uids import derived_uid  # noqa: E402
from infergate.manifest import Code, ModelManifest  # noqa: E402
from infergate.progress import bars, wanted  # noqa: E402

TARGET_SECONDS = 0.5
TARGET_SEGMENTS = 5
TARGET = f"node SEG+SR, {TARGET_SEGMENTS} segments, written in < {TARGET_SECONDS} s (median)"
_MILLILITER = hd.sr.CodedConcept("ml", "UCUM", "milliliter")


@dataclass(frozen=True)
class Inputs:
    """One segment count's inputs, built before any timing."""

    sources: list[Dataset]
    label_map: np.ndarray
    manifest: ModelManifest
    volumes_ml: dict[int, float]


@dataclass(frozen=True)
class Written:
    """What one run wrote."""

    seg_bytes: int
    sr_bytes: int
    seg_frames: int
    phases: dict[str, float]


@dataclass
class Case:
    """A writer on one segment count, and what its runs measured."""

    writer: str
    segments: int
    run: Callable[[Inputs, Path], Written]
    times: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)
    written: Written | None = None
    peak_bytes: int = 0


def say(text: str) -> None:
    """Print one line of the report."""
    print(text, flush=True)  # noqa: T201


def make_inputs(slices: int, size: int, segments: int) -> Inputs:
    label_map = _data.label_map(slices, size, segments)
    voxel_ml = _data.SLICE_SPACING_MM * _data.PIXEL_SPACING_MM**2 / 1000.0
    counts = np.bincount(label_map.ravel(), minlength=segments + 1)
    volumes = {value: float(counts[value]) * voxel_ml for value in range(1, segments + 1)}
    return Inputs(_data.ct_series(slices, size), label_map, _data.manifest_with_labels(segments), volumes)


def _encode(ds: Dataset) -> bytes:
    """As ``workers.pipeline._encode``."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def node_write(inputs: Inputs, out: Path) -> Written:
    """SEG and SR as ``workers.pipeline.make_results`` builds them, stored as the worker stores them."""
    manifest, series_uid = inputs.manifest, str(inputs.sources[0].SeriesInstanceUID)
    base = ("infergate", series_uid, manifest.id, manifest.version)
    start = time.perf_counter()
    seg = build_seg(
        inputs.sources,
        inputs.label_map,
        manifest,
        series_instance_uid=derived_uid(*base, "SEG", "series"),
        sop_instance_uid=derived_uid(*base, "SEG", "instance"),
        series_number=9001,
    )
    built_seg = time.perf_counter()
    measurements = [
        SegmentMeasurement(segment_number=number, label=label, volume_ml=inputs.volumes_ml.get(label.value, 0.0))
        for number, label in enumerate(manifest.labels, start=1)
    ]
    totals = [
        TotalVolume(total=total, volume_ml=sum(inputs.volumes_ml.get(value, 0.0) for value in total.labels))
        for total in manifest.volume_totals
    ]
    sr = build_sr(
        inputs.sources,
        manifest,
        seg=seg,
        measurements=measurements,
        findings=[],
        series_instance_uid=derived_uid(*base, "SR", "series"),
        sop_instance_uid=derived_uid(*base, "SR", "instance"),
        series_number=9002,
        totals=totals,
    )
    built_sr = time.perf_counter()
    sizes = []
    for kind, ds in (("SEG", seg), ("SR", sr)):
        data = _encode(ds)
        replace_file(out, result_relpath(1, kind, ds.SOPInstanceUID), data)
        sizes.append(len(data))
    phases = {"seg_build": built_seg - start, "sr_build": built_sr - built_seg, "write": time.perf_counter() - built_sr}
    return Written(sizes[0], sizes[1], int(seg.NumberOfFrames), phases)


def _concept(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def highdicom_write(inputs: Inputs, out: Path) -> Written:
    """The straightforward highdicom construction of the same SEG and a minimal TID 1500 report."""
    manifest = inputs.manifest
    algorithm = hd.content.AlgorithmIdentificationSequence(
        name=manifest.name, family=codes.cid7162.ArtificialIntelligence, version=manifest.version
    )
    start = time.perf_counter()
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label.name,
            segmented_property_category=_concept(label.category),
            segmented_property_type=_concept(label.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, label in enumerate(manifest.labels, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=inputs.sources,
        pixel_array=inputs.label_map,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=1,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="reference",
        manufacturer_model_name="highdicom",
        software_versions=hd.__version__,
        device_serial_number="0",
    )
    built_seg = time.perf_counter()
    groups = [
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=label.name),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=number,
                source_series=hd.sr.SourceSeriesForSegmentation(inputs.sources[0].SeriesInstanceUID),
            ),
            finding_type=_concept(label.type),
            measurements=[
                hd.sr.Measurement(name=codes.SCT.Volume, value=inputs.volumes_ml[label.value], unit=_MILLILITER)
            ],
        )
        for number, label in enumerate(manifest.labels, start=1)
    ]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(),
        procedure_reported=hd.sr.CodedConcept("77477000", "SCT", "Computed tomography"),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*inputs.sources, seg],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=2,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="reference",
    )
    built_sr = time.perf_counter()
    seg.save_as(out / "seg.dcm")
    sr.save_as(out / "sr.dcm")
    phases = {"seg_build": built_seg - start, "sr_build": built_sr - built_seg, "write": time.perf_counter() - built_sr}
    sizes = ((out / "seg.dcm").stat().st_size, (out / "sr.dcm").stat().st_size)
    return Written(sizes[0], sizes[1], int(seg.NumberOfFrames), phases)


def _run_once(case: Case, inputs: Inputs, work: Path) -> tuple[float, Written]:
    out = Path(tempfile.mkdtemp(dir=work))
    gc.collect()
    try:
        start = time.perf_counter()
        written = case.run(inputs, out)
        return time.perf_counter() - start, written
    finally:
        shutil.rmtree(out)


def _peak_bytes(case: Case, inputs: Inputs, work: Path) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        _run_once(case, inputs, work)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _validate(case: Case, inputs: Inputs, work: Path) -> list[str]:
    """dciodvfy's error lines for the objects one run of ``case`` writes (empty when valid)."""
    executable = shutil.which("dciodvfy")
    if executable is None:
        return ["dciodvfy is not installed"]
    out = Path(tempfile.mkdtemp(dir=work))
    try:
        case.run(inputs, out)
        errors = []
        for path in sorted(out.rglob("*.dcm")):
            done = subprocess.run([executable, str(path)], capture_output=True, text=True, timeout=600, check=False)
            errors += [f"{path.name}: {line}" for line in (done.stdout + done.stderr).splitlines() if "Error" in line]
        return errors
    finally:
        shutil.rmtree(out)


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return None
    return done.stdout.strip() or None


def machine() -> dict[str, object]:
    """Where the figures come from."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "highdicom": hd.__version__,
        "pydicom": pydicom.__version__,
        "numpy": np.__version__,
        "infergate": infergate.__version__,
        "commit": _git_commit(),
    }


def _summary(case: Case) -> dict[str, object]:
    assert case.written is not None
    return {
        "writer": case.writer,
        "segments": case.segments,
        "times_s": [round(t, 6) for t in case.times],
        "median_s": round(statistics.median(case.times), 6),
        "min_s": round(min(case.times), 6),
        "max_s": round(max(case.times), 6),
        "phase_medians_s": {name: round(statistics.median(p[name] for p in case.phases), 6) for name in case.phases[0]},
        "peak_mib": round(case.peak_bytes / 2**20, 3),
        "seg_bytes": case.written.seg_bytes,
        "sr_bytes": case.written.sr_bytes,
        "seg_frames": case.written.seg_frames,
    }


def _ratios(cases: list[Case]) -> list[dict[str, object]]:
    """node/highdicom per segment count: ratio of medians and the range of per-round ratios."""
    out: list[dict[str, object]] = []
    for segments in sorted({c.segments for c in cases}):
        node = next(c for c in cases if c.segments == segments and c.writer == "node")
        ref = next(c for c in cases if c.segments == segments and c.writer == "highdicom")
        per_round = [n / r for n, r in zip(node.times, ref.times, strict=True)]
        out.append(
            {
                "segments": segments,
                "median_ratio": round(statistics.median(node.times) / statistics.median(ref.times), 4),
                "min_ratio": round(min(per_round), 4),
                "max_ratio": round(max(per_round), 4),
            }
        )
    return out


def _table(cases: list[Case]) -> str:
    header = (
        f"{'writer':<10} {'segs':>4} {'median s':>9} {'min-max s':>15} {'SEG s':>7} {'SR s':>7} {'write s':>8} "
        f"{'peak MiB':>9} {'SEG KiB':>9} {'SR KiB':>8} {'frames':>6}"
    )
    lines = [header, "-" * len(header)]
    for case in cases:
        assert case.written is not None
        phase = {name: statistics.median(p[name] for p in case.phases) for name in case.phases[0]}
        span = f"{min(case.times):.3f}-{max(case.times):.3f}"
        lines.append(
            f"{case.writer:<10} {case.segments:>4} {statistics.median(case.times):>9.3f} {span:>15} "
            f"{phase['seg_build']:>7.3f} {phase['sr_build']:>7.3f} {phase['write']:>8.3f} "
            f"{case.peak_bytes / 2**20:>9.1f} {case.written.seg_bytes / 1024:>9.0f} "
            f"{case.written.sr_bytes / 1024:>8.0f} {case.written.seg_frames:>6}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--slices", type=int, default=200, help="source images (default 200)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns (default 512)")
    parser.add_argument("--segments", type=int, nargs="+", default=[1, 5], help="segment counts (default 1 5)")
    parser.add_argument("--repeat", type=int, default=7, help="timed repetitions per case (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per case first (default 1)")
    parser.add_argument("--quick", action="store_true", help="12 slices of 64², 1 repetition, no warm-up")
    parser.add_argument("--validate", action="store_true", help="run dciodvfy on each case's objects")
    parser.add_argument("--results-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--work-dir", type=Path, default=None, help="where objects are written (default: a temp dir)")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Progress bar over the repetitions on stderr (default: only when stderr is a terminal).",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.slices, args.size, args.repeat, args.warmup = 12, 64, 1, 0
    if args.slices < 1 or args.size < 8 or args.repeat < 1 or args.warmup < 0 or min(args.segments) < 1:
        parser.error("--slices, --repeat and --segments should be positive, --size at least 8, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.UTC)
    segment_counts = sorted(set(args.segments))
    say(f"SEG/SR writing: {args.slices} x {args.size}² CT, segments {segment_counts}, repeat {args.repeat}")
    inputs = {n: make_inputs(args.slices, args.size, n) for n in segment_counts}
    writers = (("node", node_write), ("highdicom", highdicom_write))
    cases = [Case(writer, n, run) for n in segment_counts for writer, run in writers]
    validation: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="segsr-") as tmp:
        work = Path(tmp)
        for _ in range(args.warmup):
            for case in cases:
                _run_once(case, inputs[case.segments], work)
        load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
        for _ in bars(wanted(args.progress))(range(args.repeat), desc="repetitions"):
            for case in cases:
                seconds, written = _run_once(case, inputs[case.segments], work)
                case.times.append(seconds)
                case.phases.append(written.phases)
                case.written = written
        for case in cases:
            case.peak_bytes = _peak_bytes(case, inputs[case.segments], work)
            if args.validate:
                validation[f"{case.writer}/{case.segments}"] = _validate(case, inputs[case.segments], work)

    summaries = [_summary(c) for c in cases]
    ratios = _ratios(cases)
    say(_table(cases))
    for r in ratios:
        say(
            f"same-run ratio node/highdicom, {r['segments']} segment(s): {r['median_ratio']:.2f} "
            f"(per round {r['min_ratio']:.2f}-{r['max_ratio']:.2f})"
        )
    target: dict[str, object] = {"name": TARGET, "limit_s": TARGET_SECONDS, "evaluated": False}
    node_target = next((c for c in cases if c.writer == "node" and c.segments == TARGET_SEGMENTS), None)
    full_size = (args.slices, args.size) == (200, 512)
    if node_target is not None:
        median = statistics.median(node_target.times)
        passed = median < TARGET_SECONDS
        target.update(evaluated=full_size, median_s=round(median, 6), passed=passed if full_size else None)
        verdict = ("PASS" if passed else "FAIL") if full_size else "n/a (target is for 200 x 512²)"
        say(f"target: {TARGET}: {verdict} (median {median:.3f} s)")
    for name, errors in validation.items():
        say(f"dciodvfy {name}: {len(errors)} error(s)" + "".join(f"\n  {e}" for e in errors[:10]))

    record = {
        "benchmark": "segsr",
        "date": started.isoformat(timespec="seconds"),
        "machine": machine() | {"load_average_before_timing": list(load_before) if load_before else None},
        "params": {
            "slices": args.slices,
            "size": args.size,
            "segments": segment_counts,
            "repeat": args.repeat,
            "warmup": args.warmup,
            "quick": args.quick,
        },
        "memory": "tracemalloc peak over one untimed run per case, inputs excluded",
        "cases": summaries,
        "ratios": ratios,
        "target": target,
        "dciodvfy_errors": {name: len(errors) for name, errors in validation.items()} or None,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    results = args.results_dir / "segsr.jsonl"
    with results.open("a", encoding="utf-8") as stream:
        stream.write(json.dumps(record, sort_keys=True) + "\n")
    say(f"record appended to {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
