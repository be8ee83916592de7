"""The job pipeline and export as plain functions: real ONNX models, real files, real databases.

A real C-STORE SCP (pynetdicom, in process) stands in for the PACS; no broker is involved, which
is what keeps Celery out of these tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image
from pydicom import dcmread
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from infergate import submission
from infergate.config import Settings
from infergate.dicom.storage import resolve_inside
from infergate.retention import run_cleanup
from infergate.store import queries
from infergate.store.tables import (
    Export,
    ExportState,
    Instance,
    Job,
    JobPreview,
    JobState,
    ResultObject,
    Series,
    utcnow,
)
from tests.data.make_series import write_ct_series
from tests.helpers.dicom_validation import dciodvfy_errors
from tests.helpers.ingest import ingest_file
from tests.helpers.storage_scp import StorageSCP
from workers import preview
from workers.export import backoff, export_job
from workers.pipeline import JobOutcome, WorkerContext, compute, record, run_job
from workers.runtime import OnnxRunner


def _ingest_series(settings: Settings, factory: sessionmaker[Session], folder: Path, slices: int) -> int:
    info = write_ct_series(folder, slices=slices, size=64)
    for path in info.paths:
        ingest_file(factory, settings.data_path, path)
    with factory() as session:
        series_id = session.scalar(select(Series.id))
    assert series_id is not None
    return series_id


def _job(factory: sessionmaker[Session], series_id: int, model_id: str) -> int:
    with factory() as session, session.begin():
        job_id = queries.create_job(session, series_id, model_id, "1")
    assert job_id is not None
    return job_id


@pytest.fixture
def pacs() -> Iterator[StorageSCP]:
    scp = StorageSCP().start()
    yield scp
    scp.stop()


def _ctx(settings: Settings, factory: sessionmaker[Session]) -> WorkerContext:
    return WorkerContext(
        settings=settings,
        factory=factory,
        runner=OnnxRunner(["CPUExecutionProvider"]),
    )


def test_segmentation_job_writes_valid_seg_and_sr_and_exports_once(
    db_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path, pacs: StorageSCP
) -> None:
    settings = Settings(**{**db_settings.model_dump(), "pacs": pacs.destination})
    series_id = _ingest_series(settings, session_factory, tmp_path / "ct", slices=16)
    job_id = _job(session_factory, series_id, "ct-tissue-seg")
    ctx = _ctx(settings, session_factory)

    assert run_job(ctx, job_id) == (JobOutcome.exporting, None)
    assert run_job(ctx, job_id) == (JobOutcome.skipped, None)  # a duplicate message does nothing
    assert export_job(ctx, job_id) is None
    with session_factory() as session:
        job = queries.job_with_results(session, job_id)
        assert job is not None and job.state == JobState.done and job.attempts == 1
        assert {m.segment_label for m in job.measurements} == {"Soft tissue", "Fat", "Lung", "Bone", "Body"}
        objects = {r.kind: r for r in job.result_objects}
        assert set(objects) == {"SEG", "SR"}
        assert all(e.state == ExportState.done and e.attempts == 1 for r in job.result_objects for e in r.exports)
    assert sorted(pacs.received) == sorted(r.sop_instance_uid for r in objects.values())
    for obj in objects.values():
        path = resolve_inside(settings.data_path, obj.path)
        assert dciodvfy_errors(path) == []
        assert dcmread(path).SOPInstanceUID == obj.sop_instance_uid
    with session_factory() as session:
        stored = session.get(JobPreview, job_id)
        assert stored is not None and 0 <= stored.slice_index < 16
    with Image.open(BytesIO(stored.png)) as image:
        assert image.format == "PNG" and image.size == (256, 256)  # 64x64 square pixels, enlarged


def test_rerun_replaces_results_with_the_same_uids(
    db_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    series_id = _ingest_series(db_settings, session_factory, tmp_path / "ct", slices=10)
    job_id = _job(session_factory, series_id, "ct-bone-classifier")
    ctx = _ctx(db_settings, session_factory)
    assert run_job(ctx, job_id)[0] is JobOutcome.done
    with session_factory() as session:
        first = session.scalars(select(ResultObject.sop_instance_uid)).all()
    with session_factory() as session, session.begin():
        session.execute(update(Job).where(Job.id == job_id).values(state=JobState.queued))
    assert run_job(ctx, job_id)[0] is JobOutcome.done
    with session_factory() as session:
        assert session.scalars(select(ResultObject.sop_instance_uid)).all() == first
        job = queries.job_with_results(session, job_id)
        assert job is not None and len(job.findings) == 2 and job.attempts == 2
        assert len(session.scalars(select(JobPreview)).all()) == 1  # replaced, not added
        stored = session.get(JobPreview, job_id)
        assert stored is not None and stored.slice_index == 5  # a classification shows the middle slice


def test_a_rerun_after_retention_removed_the_results_holds_them_again(
    db_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    series_id = _ingest_series(db_settings, session_factory, tmp_path / "ct", slices=10)
    job_id = _job(session_factory, series_id, "ct-bone-classifier")
    ctx = _ctx(db_settings, session_factory)
    assert run_job(ctx, job_id)[0] is JobOutcome.done
    with session_factory() as session, session.begin():
        session.execute(update(Job).where(Job.id == job_id).values(finished_at=utcnow() - timedelta(days=40)))
    report = run_cleanup(
        session_factory, db_settings.data_path, inputs_before=None, results_before=utcnow() - timedelta(days=30)
    )
    assert report.jobs == [job_id] and report.result_objects == 1
    with session_factory() as session:
        (removed,) = session.scalars(select(ResultObject)).all()
    assert removed.purged_at is not None and not resolve_inside(db_settings.data_path, removed.path).exists()

    with session_factory() as session, session.begin():
        submission.retry(session, job_id)  # the inputs are still held
    assert run_job(ctx, job_id)[0] is JobOutcome.done
    with session_factory() as session:
        (again,) = session.scalars(select(ResultObject)).all()
        assert again.sop_instance_uid == removed.sop_instance_uid and again.purged_at is None
        assert session.scalar(select(Instance.id).where(Instance.sop_instance_uid == again.sop_instance_uid))
    assert resolve_inside(db_settings.data_path, again.path).is_file()


def test_a_preview_that_cannot_be_rendered_does_not_fail_the_job(
    db_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> preview.Preview:
        raise RuntimeError("no preview today")

    monkeypatch.setattr(preview, "render_preview", broken)
    series_id = _ingest_series(db_settings, session_factory, tmp_path / "ct", slices=10)
    job_id = _job(session_factory, series_id, "ct-bone-classifier")
    assert run_job(_ctx(db_settings, session_factory), job_id)[0] is JobOutcome.done
    with session_factory() as session:
        job = queries.job_with_results(session, job_id)
        assert job is not None and len(job.findings) == 2 and session.get(JobPreview, job_id) is None


def test_unsuitable_series_fails_without_retry(
    db_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    series_id = _ingest_series(db_settings, session_factory, tmp_path / "ct", slices=3)  # model needs >= 8
    job_id = _job(session_factory, series_id, "ct-bone-classifier")
    assert run_job(_ctx(db_settings, session_factory), job_id) == (JobOutcome.failed, None)
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == JobState.failed and "InvalidInput" in (job.error or "")


def test_export_to_unreachable_pacs_backs_off_then_fails(
    db_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    unreachable = StorageSCP()  # never started: connection refused
    settings = Settings(
        **{
            **db_settings.model_dump(),
            "pacs": unreachable.destination,
            "export_max_attempts": 2,
            "export_backoff_seconds": 0.2,
        }
    )
    series_id = _ingest_series(settings, session_factory, tmp_path / "ct", slices=10)
    job_id = _job(session_factory, series_id, "ct-bone-classifier")
    ctx = _ctx(settings, session_factory)
    assert run_job(ctx, job_id)[0] is JobOutcome.exporting
    delay = export_job(ctx, job_id)
    assert delay is not None and 0 < delay <= 0.2
    with session_factory() as session, session.begin():
        export = session.scalar(select(Export))
        assert export is not None and export.state == ExportState.pending and export.attempts == 1
        assert "unreachable" in (export.last_error or "") or "rejected" in (export.last_error or "")
        export.next_attempt_at = utcnow() - timedelta(seconds=1)
    assert export_job(ctx, job_id) is None
    with session_factory() as session:
        export = session.scalar(select(Export))
        job = session.get(Job, job_id)
        assert export is not None and export.state == ExportState.failed and export.attempts == 2
        assert job is not None and job.state == JobState.failed and "export failed" in (job.error or "")


def test_permanent_refusal_is_not_retried(
    db_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    refusing = StorageSCP(status=0xA900).start()
    try:
        settings = Settings(**{**db_settings.model_dump(), "pacs": refusing.destination})
        series_id = _ingest_series(settings, session_factory, tmp_path / "ct", slices=10)
        job_id = _job(session_factory, series_id, "ct-bone-classifier")
        ctx = _ctx(settings, session_factory)
        assert run_job(ctx, job_id)[0] is JobOutcome.exporting
        assert export_job(ctx, job_id) is None
    finally:
        refusing.stop()
    with session_factory() as session:
        export = session.scalar(select(Export))
        assert export is not None and export.state == ExportState.failed
        assert export.attempts == 1 and export.last_status == 0xA900


def test_backoff_doubles_and_is_capped(make_settings: object) -> None:
    settings = Settings(export_backoff_seconds=2, export_backoff_max_seconds=10)
    assert [backoff(settings, n) for n in (1, 2, 3, 4, 5)] == [2, 4, 8, 10, 10]


def test_job_cancelled_while_running_keeps_no_result(
    db_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    series_id = _ingest_series(db_settings, session_factory, tmp_path / "ct", slices=10)
    job_id = _job(session_factory, series_id, "ct-bone-classifier")
    ctx = _ctx(db_settings, session_factory)
    with session_factory() as session, session.begin():
        assert queries.claim_job(session, job_id, timedelta(minutes=5))
    result = compute(ctx, job_id)
    with session_factory() as session, session.begin():
        submission.cancel(session, job_id)
    with session_factory() as session, session.begin():
        assert record(session, ctx, job_id, 1, result) is None
    with session_factory() as session:
        job = queries.job_with_results(session, job_id)
        assert job is not None and job.state == JobState.cancelled and job.findings == []
