"""Where a job's time goes: seconds per pipeline stage, measured with :func:`time.perf_counter`.

The worker records them per job in ``jobs.timings`` (shown as ``timings`` in the job JSON), so an
operator sees whether a slow job spent its time reading files, in ONNX Runtime or writing DICOM.
Stages, in the order a job passes them:

``queue_wait``
    From the job being queued to a worker claiming it (from the job's timestamps).
``load``
    Reading the stored instances (``dcmread``) and building the volume (decoding pixels).
``preprocess``
    Checking the volume fits the model, resampling, windowing, normalising, cropping; header
    features for a header-feature model.
``onnx``
    Inside ONNX Runtime (the runner's ``run``/``run_file``), region-of-interest model included.
``postprocess``
    Everything of inference outside the network: sliding-window tiling and blending, argmax or
    threshold, back to the source grid, cleaning, softmax; segment volumes.
``seg_build`` / ``sr_build``
    highdicom's SEG and SR constructors.
``preview``
    The key-slice PNG (segmentation and volume classification).
``write``
    Encoding the SEG/SR as Part 10 and writing them to the data folder.
``record``
    The result rows (findings, measurements, objects, exports, DICOMweb index), up to the commit.
``export``
    C-STORE of the results to the destinations (:mod:`workers.export`), retries added up.

Stages nest: time spent in an inner stage (``onnx`` inside ``preprocess`` for a
region-of-interest model) counts for the inner one only, so the values add up to the job's time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np

from infergate.manifest import ModelPackage, RegionOfInterest
from workers.runtime import InferenceRunner, RegionRunner

#: Stages a worker measures, in pipeline order (``timings`` holds those a job went through).
STAGES = (
    "queue_wait",
    "load",
    "preprocess",
    "onnx",
    "postprocess",
    "seg_build",
    "sr_build",
    "preview",
    "write",
    "record",
    "export",
)


class StageTimer:
    """Seconds per named stage; a stage entered twice adds up, nested stages are not counted twice."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open stage: seconds of the stages nested in it so far

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Measure the ``with`` block as stage ``name``, less the stages nested inside it."""
        self._inner.append(0.0)
        began = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - began
            inner = self._inner.pop()
            self.add(name, max(0.0, elapsed - inner))
            if self._inner:
                self._inner[-1] += elapsed

    def add(self, name: str, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f'Argument "seconds" of stage {name!r} should not be negative, got {seconds}.')
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def as_dict(self) -> dict[str, float]:
        """The stages in pipeline order (unknown names last), rounded to microseconds, for JSON."""
        order = {name: index for index, name in enumerate(STAGES)}
        names = sorted(self.seconds, key=lambda name: (order.get(name, len(order)), name))
        return {name: round(self.seconds[name], 6) for name in names}


def merged(timings: Mapping[str, float] | None, added: Mapping[str, float]) -> dict[str, float]:
    """``timings`` with ``added`` summed in, as a new dict (assigning it marks a JSON column changed)."""
    out = dict(timings or {})
    for name, seconds in added.items():
        out[name] = round(out.get(name, 0.0) + seconds, 6)
    return out


class TimedRunner:
    """An :class:`~workers.runtime.InferenceRunner` that counts the time of each call as ``onnx``."""

    def __init__(self, runner: InferenceRunner, timer: StageTimer) -> None:
        self.runner, self.timer = runner, timer

    def run(self, package: ModelPackage, batch: np.ndarray) -> np.ndarray:
        with self.timer.stage("onnx"):
            return self.runner.run(package, batch)


class TimedRegionRunner(TimedRunner):
    """:class:`TimedRunner` for a runner that is also a :class:`~workers.runtime.RegionRunner`."""

    runner: InferenceRunner

    def run_file(self, package: ModelPackage, file: RegionOfInterest, batch: np.ndarray) -> np.ndarray:
        assert isinstance(self.runner, RegionRunner)
        with self.timer.stage("onnx"):
            return self.runner.run_file(package, file, batch)


def timed(runner: InferenceRunner, timer: StageTimer) -> TimedRunner:
    """``runner`` with its calls timed; a region runner stays one (and a plain runner stays plain)."""
    if isinstance(runner, RegionRunner):
        return TimedRegionRunner(runner, timer)
    return TimedRunner(runner, timer)
