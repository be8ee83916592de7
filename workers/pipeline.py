"""The job pipeline as plain functions: claim, load, infer, write SEG/SR, record, export.

Only :mod:`workers.tasks` knows about Celery; everything here takes a :class:`WorkerContext` and a
job id, so it is tested without a broker. Each stage is a separate function passing typed objects
(MONAI Deploy's operators): load series -> volume -> inference -> DICOM objects -> SQL rows.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from functools import cached_property
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import delete, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from infergate import metrics
from infergate.catalog import Catalog, fingerprint, load_catalog
from infergate.completion import route_followups
from infergate.config import Settings
from infergate.dicom import uids
from infergate.dicom.seg import build_seg
from infergate.dicom.sr import ClassificationFinding, SegmentMeasurement, TotalVolume, build_sr
from infergate.dicom.storage import replace_file, resolve_inside, result_relpath
from infergate.dicom.volume import load_volume
from infergate.errors import InvalidInput, ModelFailed, NotFound
from infergate.ingest import InstanceHeader, index_result_object
from infergate.logs import bind_study, log_context
from infergate.manifest import ModelPackage
from infergate.store import queries
from infergate.store.tables import (
    Export,
    ExportState,
    Finding,
    Instance,
    Job,
    JobPreview,
    JobState,
    Measurement,
    ResultObject,
    Series,
    Study,
    utcnow,
)
from workers.header_features import classify_from_headers
from workers.inference import InferenceOutput, infer
from workers.node_client import NodeClient
from workers.postprocess import segment_volumes_ml
from workers.preview import Preview, try_render_preview
from workers.remote import series_files
from workers.runtime import InferenceRunner
from workers.stages import StageTimer, merged, timed

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What a worker process needs; built once per process, lazily."""

    settings: Settings
    factory: sessionmaker[Session]
    runner: InferenceRunner
    _catalog: Catalog | None = field(default=None, repr=False)
    _fingerprint: tuple[tuple[str, int], ...] = field(default=(), repr=False)

    @cached_property
    def node(self) -> NodeClient | None:
        """The node's API for a worker without its data folder (``INFERGATE_NODE_URL``); None when co-located."""
        return NodeClient.from_settings(self.settings)

    def catalog(self) -> Catalog:
        """Models and rules, re-read when the models folder changed (``infergate models add``)."""
        current = fingerprint(self.settings)
        if self._catalog is None or current != self._fingerprint:
            self._catalog, self._fingerprint = load_catalog(self.settings), current
        return self._catalog

    def package(self, model_id: str) -> ModelPackage:
        packages = self.catalog().packages
        if model_id not in packages:
            raise NotFound(f"Model {model_id!r} is not installed in {self.settings.models_dir}.")
        return packages[model_id]


class JobOutcome(enum.Enum):
    skipped = "skipped"  # not claimable: done, failed, or running under another worker's lease
    exporting = "exporting"
    done = "done"
    retry = "retry"
    failed = "failed"


@dataclass(frozen=True)
class ResultFile:
    kind: str
    dataset: Dataset
    relpath: Path


@dataclass(frozen=True)
class JobResult:
    files: list[ResultFile]
    measurements: list[SegmentMeasurement]
    findings: list[ClassificationFinding]
    totals: list[TotalVolume]
    preview: Preview | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (workers.stages)


def load_series(settings: Settings, session: Session, series_id: int) -> list[Dataset]:
    """Read every stored instance of a series."""
    paths = session.scalars(select(Instance.path).where(Instance.series_id == series_id)).all()
    return read_instances(settings, series_id, paths)


def read_instances(settings: Settings, series_id: int, paths: Sequence[str]) -> list[Dataset]:
    """Read the stored instances of series ``series_id`` at ``paths`` (relative to the data folder)."""
    if not paths:
        raise NotFound(f"Series {series_id} has no stored instances.")
    return [dcmread(resolve_inside(settings.data_path, path)) for path in paths]


def result_uids(series_uid: str, package: ModelPackage, kind: str) -> tuple[str, str]:
    """(series, instance) UIDs of a result: the same job always yields the same UIDs (PS3.5 B.2)."""
    return uids.result_uids(series_uid, package.manifest.id, package.manifest.version, kind)


def make_results(
    job_id: int,
    series_uid: str,
    datasets: list[Dataset],
    package: ModelPackage,
    output: InferenceOutput,
    volume_spacing: tuple[float, float, float] | None,
    timer: StageTimer | None = None,
) -> JobResult:
    """Turn an inference output into SEG/SR datasets and the values to record (timed into ``timer``)."""
    timer = timer if timer is not None else StageTimer()
    manifest = package.manifest
    series_number = 9000 + 10 * (job_id % 100)
    files: list[ResultFile] = []
    measurements: list[SegmentMeasurement] = []
    findings: list[ClassificationFinding] = []
    totals: list[TotalVolume] = []
    seg = None
    if manifest.task == "segmentation":
        assert output.label_map is not None and volume_spacing is not None
        seg_series, seg_instance = result_uids(series_uid, package, "SEG")
        with timer.stage("seg_build"):
            seg = build_seg(
                datasets,
                output.label_map,
                manifest,
                series_instance_uid=seg_series,
                sop_instance_uid=seg_instance,
                series_number=series_number + 1,
            )
        files.append(ResultFile("SEG", seg, result_relpath(job_id, "SEG", seg_instance)))
        with timer.stage("postprocess"):
            volumes = segment_volumes_ml(output.label_map, volume_spacing, manifest.labels)
        measurements = [
            SegmentMeasurement(segment_number=number, label=label, volume_ml=volumes.get(label.value, 0.0))
            for number, label in enumerate(manifest.labels, start=1)
        ]
        totals = [
            TotalVolume(total=total, volume_ml=sum(volumes.get(value, 0.0) for value in total.labels))
            for total in manifest.volume_totals
        ]
    else:
        assert output.probabilities is not None
        for class_label in manifest.classes:
            probability = float(output.probabilities[class_label.index])
            positive = None
            if manifest.threshold is not None and manifest.positive_class == class_label.index:
                positive = probability >= manifest.threshold
            findings.append(ClassificationFinding(class_label=class_label, probability=probability, positive=positive))
    sr_series, sr_instance = result_uids(series_uid, package, "SR")
    with timer.stage("sr_build"):
        sr = build_sr(
            datasets,
            manifest,
            seg=seg,
            measurements=measurements,
            findings=findings,
            series_instance_uid=sr_series,
            sop_instance_uid=sr_instance,
            series_number=series_number + 2,
            totals=totals,
        )
    files.append(ResultFile("SR", sr, result_relpath(job_id, "SR", sr_instance)))
    return JobResult(files=files, measurements=measurements, findings=findings, totals=totals)


def _encode(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def compute(ctx: WorkerContext, job_id: int) -> JobResult:
    """Load, infer and build the result objects of one job (no SQL writes), timing each stage."""
    timer = StageTimer()
    with timer.stage("load"):
        with ctx.factory() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise NotFound(f"Job {job_id} does not exist.")
            series = session.get(Series, job.series_id)
            assert series is not None
            package = ctx.package(job.model_id)
            series_id, series_uid, attempt = series.id, series.series_instance_uid, job.attempts
            listed = session.execute(
                select(Instance.sop_instance_uid, Instance.path).where(Instance.series_id == series_id)
            ).all()
            study_uid = study_uid_of(session, series_id) or ""
        # the connection is back in the pool; a worker without the node's disk fetches over WADO-RS
        instances = [(sop, path) for sop, path in listed]
        with series_files(ctx.settings, ctx.node, job_id, study_uid, series_uid, instances) as paths:
            datasets = read_instances(ctx.settings, series_id, paths)
    if package.manifest.input == "header_features":
        # Header-only models need no pixels: no volume, so no geometry checks either.
        datasets.sort(key=lambda ds: int(ds.get("InstanceNumber") or 0))
        with timer.stage("preprocess"):  # header features; the network's call counts as "onnx"
            probabilities = classify_from_headers(datasets, package, timed(ctx.runner, timer))
        output = InferenceOutput(label_map=None, probabilities=probabilities)
        result = make_results(job_id, series_uid, datasets, package, output, None, timer)
    else:
        with timer.stage("load"):
            volume = load_volume(datasets, max_voxels=ctx.settings.max_volume_voxels)
        output = infer(volume, package, ctx.runner, timer)
        result = make_results(job_id, series_uid, volume.datasets, package, output, volume.spacing, timer)
        labels, findings = package.manifest.labels, result.findings
        with timer.stage("preview"):
            result = replace(result, preview=try_render_preview(job_id, volume, output.label_map, labels, findings))
    with timer.stage("write"):
        for item in result.files:
            data = _encode(item.dataset)
            replace_file(ctx.settings.data_path, item.relpath, data)
            if ctx.node is not None:  # the node's data folder must hold it before record() points at it
                uid, version = str(item.dataset.SOPInstanceUID), package.manifest.version
                ctx.node.store_result(job_id, item.kind, uid, data, model_version=version, attempt=attempt)
    return replace(result, timings=timer.as_dict())


def record(session: Session, ctx: WorkerContext, job_id: int, attempt: int, result: JobResult) -> JobOutcome | None:
    """Store rows of a finished computation and its ``timings``; None if this worker no longer holds the job."""
    began = time.perf_counter()
    destinations = [str(d) for d in ctx.settings.pacs]
    state = JobState.exporting if destinations else JobState.done
    now = utcnow()
    owned = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.running, Job.attempts == attempt)
        .values(
            state=state,
            lease_until=None,
            error=None,
            updated_at=now,
            finished_at=now if state == JobState.done else None,
        )
    )
    if not owned.rowcount:  # type: ignore[attr-defined]
        return None
    session.execute(delete(Finding).where(Finding.job_id == job_id))
    session.execute(delete(Measurement).where(Measurement.job_id == job_id))
    session.execute(delete(JobPreview).where(JobPreview.job_id == job_id))  # a rerun without one drops the old
    if result.preview is not None:
        session.add(JobPreview(job_id=job_id, png=result.preview.png, slice_index=result.preview.slice_index))
    for finding in result.findings:
        code = finding.class_label.code
        session.add(
            Finding(
                job_id=job_id,
                name=finding.class_label.name,
                code_value=code.value,
                code_scheme=code.scheme,
                code_meaning=code.meaning,
                probability=finding.probability,
                positive=finding.positive,
            )
        )
    for measurement in result.measurements:
        session.add(
            Measurement(
                job_id=job_id,
                segment_number=measurement.segment_number,
                segment_label=measurement.label.name,
                name="Volume",
                value=measurement.volume_ml,
                unit="mL",
            )
        )
    for total in result.totals:
        session.add(
            Measurement(
                job_id=job_id,
                segment_number=None,
                segment_label=total.total.name,
                name="Volume",
                value=total.volume_ml,
                unit="mL",
            )
        )
    for item in result.files:
        ds = item.dataset
        existing = session.scalar(select(ResultObject).where(ResultObject.sop_instance_uid == ds.SOPInstanceUID))
        if existing is None:
            existing = ResultObject(
                job_id=job_id,
                kind=item.kind,
                sop_class_uid=ds.SOPClassUID,
                sop_instance_uid=ds.SOPInstanceUID,
                series_instance_uid=ds.SeriesInstanceUID,
                path=item.relpath.as_posix(),
            )
            session.add(existing)
            session.flush()
        existing.purged_at = None  # a rerun after retention removed the object: it is held again
        _index_result(session, ctx, item)
        for destination in destinations:
            export = session.scalar(
                select(Export).where(Export.result_object_id == existing.id, Export.destination == destination)
            )
            if export is None:
                session.add(
                    Export(result_object_id=existing.id, destination=destination, state=ExportState.pending, attempts=0)
                )
            else:  # a rerun replaced the object: deliver it again
                export.state, export.next_attempt_at = ExportState.pending, None
    timings = merged(result.timings, {"record": time.perf_counter() - began})  # the commit is not counted
    session.execute(update(Job).where(Job.id == job_id).values(timings=timings))
    model_id = session.scalar(select(Job.model_id).where(Job.id == job_id))
    metrics.stage_timings(model_id or "unknown", timings)
    return JobOutcome.exporting if destinations else JobOutcome.done


def _index_result(session: Session, ctx: WorkerContext, item: ResultFile) -> None:
    """Index the SEG/SR as an instance of its source study, so that QIDO-RS and WADO-RS serve it."""
    ds = item.dataset
    header = InstanceHeader.from_dataset(
        ds,
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
    )
    size = resolve_inside(ctx.settings.data_path, item.relpath).stat().st_size
    index_result_object(session, header, item.relpath, size)


class LeaseKeeper:
    """Renews the SQL lease of a running attempt every third of the lease, while it computes.

    A job may then run longer than its lease without the reconciler handing it to another worker
    (which would run it a second time and throw this attempt's result away), while the lease can
    stay short, so that the job of a worker that died comes back soon: a dead worker renews nothing.
    """

    def __init__(self, ctx: WorkerContext, job_id: int, attempt: int) -> None:
        self.ctx, self.job_id, self.attempt = ctx, job_id, attempt
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def _run(self) -> None:
        lease = timedelta(seconds=self.ctx.settings.job_lease_seconds)
        while not self._stop.wait(lease.total_seconds() / 3):
            try:
                with self.ctx.factory() as session, session.begin():
                    if not queries.renew_lease(session, self.job_id, self.attempt, lease):
                        return  # cancelled or taken over: record() finds out and keeps nothing
            except SQLAlchemyError as exc:  # the database is unreachable for now: the next tick retries
                log.warning("job %d: lease not renewed (%s)", self.job_id, type(exc).__name__)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def study_uid_of(session: Session, series_id: int) -> str | None:
    """The Study Instance UID of a series (for the log context: it is hashed before any line names it)."""
    return session.scalar(
        select(Study.study_instance_uid).join(Series, Series.study_id == Study.id).where(Series.id == series_id)
    )


def run_job(ctx: WorkerContext, job_id: int) -> tuple[JobOutcome, float | None]:
    """Run one job if it can be claimed; its log lines name the job and (hashed) its study.

    Returns
    -------
    (JobOutcome, float | None)
        The outcome and, for ``retry``, the delay in seconds before the next attempt.
    """
    with log_context(job_id=job_id):
        return _run_job(ctx, job_id)


def _run_job(ctx: WorkerContext, job_id: int) -> tuple[JobOutcome, float | None]:
    settings = ctx.settings
    with ctx.factory() as session, session.begin():
        if not queries.claim_job(session, job_id, timedelta(seconds=settings.job_lease_seconds)):
            # a duplicate message: the job is settled, or running under another worker's lease
            log.info("job %d: not claimable, message dropped", job_id)
            return JobOutcome.skipped, None
        job = session.get(Job, job_id)
        assert job is not None and job.started_at is not None
        attempt, model_id = job.attempts, job.model_id
        bind_study(study_uid_of(session, job.series_id))
        queue_wait = max(0.0, (job.started_at - job.queued_at).total_seconds())
        if attempt > settings.job_max_attempts:
            # Every attempt ended without an outcome: its worker died (a model that crashes the
            # process, the OOM killer) or it outlived its lease. Redelivering would loop forever.
            message = (
                f"gave up after {settings.job_max_attempts} attempts: each ended without a result "
                "(the worker running it died or lost its lease)"
            )
            log.warning("job %d failed: %s", job_id, message)
            queries.set_job_state(session, job_id, JobState.failed, message)
            return JobOutcome.failed, None
    log.info("job %d: running %s (attempt %d)", job_id, model_id, attempt)
    try:
        with LeaseKeeper(ctx, job_id, attempt):
            result = compute(ctx, job_id)
    except (InvalidInput, ModelFailed, NotFound) as exc:
        log.warning("job %d failed: %s", job_id, exc)
        with ctx.factory() as session, session.begin():
            queries.set_job_state(
                session, job_id, JobState.failed, f"{type(exc).__name__}: {exc}", only_from=JobState.running
            )
        return JobOutcome.failed, None
    except Exception as exc:
        log.exception("job %d attempt %d raised", job_id, attempt)
        message = f"{type(exc).__name__}: {exc}"[:2000]
        final = attempt >= settings.job_max_attempts
        with ctx.factory() as session, session.begin():
            queries.set_job_state(
                session,
                job_id,
                JobState.failed if final else JobState.queued,
                message + ("" if final else f" (attempt {attempt}, will retry)"),
                only_from=JobState.running,
            )
        return (JobOutcome.failed, None) if final else (JobOutcome.retry, min(60.0, 2.0**attempt))
    result = replace(result, timings={"queue_wait": round(queue_wait, 6), **result.timings})
    with ctx.factory() as session, session.begin():
        outcome = record(session, ctx, job_id, attempt, result)
    if outcome is None:
        log.warning("job %d: lease lost while running; results left to the other attempt", job_id)
        return JobOutcome.skipped, None
    log.info("job %d: %s", job_id, outcome.value)
    return outcome, None


def followup_jobs(ctx: WorkerContext, job_id: int) -> list[int]:
    """Jobs that routing rules waiting for this job's findings now call for (created, not yet sent)."""
    with ctx.factory() as session, session.begin():
        job = session.get(Job, job_id)
        if job is None or job.state not in (JobState.exporting, JobState.done) or not job.findings:
            return []
        catalog = ctx.catalog()
        return route_followups(session, job.series_id, rules=catalog.rules, packages=catalog.packages)
