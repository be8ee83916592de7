"""Retention: old inputs and results go with their files; nothing whose work is unfinished goes.

Every test runs on SQLite and on PostgreSQL (``db_settings``), on series stored through the SCP's
own ingest path and results written as the worker writes them (``tests/helpers/held.py``).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from infergate import deletions
from infergate.audit import Auditor, MemorySink
from infergate.config import Settings
from infergate.errors import Conflict
from infergate.redrive import redrive
from infergate.retention import CleanupReport, run_cleanup
from infergate.store.session import transaction
from infergate.store.tables import (
    Export,
    ExportState,
    FileDeletion,
    Finding,
    Instance,
    Job,
    JobPreview,
    JobState,
    Measurement,
    ResultObject,
    Retrieval,
    RetrievalState,
    Series,
    SeriesState,
    utcnow,
)
from infergate.submission import retry
from tests.helpers.held import PACS, HeldSeries, add_job, receive_series, study_exists

pytestmark = pytest.mark.timeout(120)

RETAIN = timedelta(days=30)


@pytest.fixture
def root(db_settings: Settings) -> Path:
    return db_settings.data_path


def _inputs(factory: sessionmaker[Session], root: Path, **kwargs: object) -> CleanupReport:
    return run_cleanup(factory, root, inputs_before=utcnow() - RETAIN, results_before=None, **kwargs)  # type: ignore[arg-type]


def _results(factory: sessionmaker[Session], root: Path, **kwargs: object) -> CleanupReport:
    return run_cleanup(factory, root, inputs_before=None, results_before=utcnow() - RETAIN, **kwargs)  # type: ignore[arg-type]


def _both(factory: sessionmaker[Session], root: Path, **kwargs: object) -> CleanupReport:
    before = utcnow() - RETAIN
    return run_cleanup(factory, root, inputs_before=before, results_before=before, **kwargs)  # type: ignore[arg-type]


def _instances(factory: sessionmaker[Session], series_id: int) -> int:
    with factory() as session:
        return session.scalar(select(func.count(Instance.id)).where(Instance.series_id == series_id)) or 0


def _held(series: HeldSeries) -> bool:
    return all(path.is_file() for path in series.paths)


def test_an_old_settled_series_goes_with_its_files_and_the_job_record_stays(
    session_factory: sessionmaker[Session], root: Path, tmp_path: Path
) -> None:
    unmatched = receive_series(session_factory, root, tmp_path, state=SeriesState.unmatched)
    routed = receive_series(session_factory, root, tmp_path)
    job = add_job(session_factory, root, routed)
    recent = receive_series(session_factory, root, tmp_path, days_ago=10)
    sink = MemorySink()

    report = _inputs(session_factory, root, auditor=Auditor(sink, source_id="INFERGATE"))

    assert sorted(report.series) == sorted([unmatched.id, routed.id])
    assert report.instances == 6 and report.files == 6 and report.bytes > 0
    assert not any(path.exists() for path in unmatched.paths + routed.paths)
    assert not (root / "instances" / unmatched.study_uid).exists()  # empty study and series folders go too
    assert not (root / "instances" / routed.study_uid / routed.series_uid).exists()
    assert _held(recent) and _instances(session_factory, recent.id) == 3
    # the unmatched series had no job: its series and study rows go
    assert report.series_rows_deleted == 1 and report.studies_rows_deleted == 1
    assert not study_exists(session_factory, unmatched.study_uid)
    with session_factory() as session:
        kept = session.get(Series, routed.id)
        assert kept is not None and kept.purged_at is not None and kept.num_instances == 0
        assert session.get(Job, job.id) is not None
        assert session.scalar(select(func.count(Finding.id)).where(Finding.job_id == job.id)) == 1
        assert session.scalar(select(func.count(FileDeletion.id))) == 0
    assert job.result_path.is_file()  # results have their own cutoff (off here)
    records = [json.loads(line) for line in sink.lines]
    events = {
        record["ParticipantObjectIdentification"][0]["ParticipantObjectID"]: record["EventIdentification"]
        for record in records
    }
    assert events[unmatched.study_uid]["EventID"]["csd-code"] == "110105"  # nothing of it left
    assert events[routed.study_uid]["EventID"]["csd-code"] == "110103"  # its SEG is still held
    assert {event["EventActionCode"] for event in events.values()} == {"D"}


@pytest.mark.parametrize("export", [ExportState.pending, ExportState.failed])
def test_an_export_that_is_not_done_keeps_inputs_and_results(
    session_factory: sessionmaker[Session], root: Path, tmp_path: Path, export: ExportState
) -> None:
    series = receive_series(session_factory, root, tmp_path)
    state = JobState.exporting if export == ExportState.pending else JobState.failed
    job = add_job(session_factory, root, series, state=state, export=export)
    if export == ExportState.pending:  # settled by hand, so that only the export keeps it
        with transaction(session_factory) as session:
            finished = utcnow() - timedelta(days=40)
            session.execute(update(Job).where(Job.id == job.id).values(state=JobState.done, finished_at=finished))

    report = _both(session_factory, root)

    assert report.series == [] and report.jobs == []
    assert report.kept_not_delivered == 2  # the series and the job's results
    assert _held(series) and job.result_path.is_file()
    with session_factory() as session:
        assert session.get(JobPreview, job.id) is not None


def test_a_cancelled_jobs_unsent_export_does_not_keep_anything(
    session_factory: sessionmaker[Session], root: Path, tmp_path: Path
) -> None:
    series = receive_series(session_factory, root, tmp_path)
    job = add_job(session_factory, root, series, state=JobState.cancelled, export=ExportState.pending)
    report = _both(session_factory, root)
    assert report.series == [series.id] and report.jobs == [job.id]
    assert not job.result_path.exists() and not any(path.exists() for path in series.paths)


def test_a_series_still_receiving_is_kept(session_factory: sessionmaker[Session], root: Path, tmp_path: Path) -> None:
    series = receive_series(session_factory, root, tmp_path, state=SeriesState.receiving)
    report = _inputs(session_factory, root)
    assert report.series == [] and _held(series) and _instances(session_factory, series.id) == 3


@pytest.mark.parametrize("state", [JobState.queued, JobState.running, JobState.exporting])
def test_a_job_in_progress_keeps_its_series(
    session_factory: sessionmaker[Session], root: Path, tmp_path: Path, state: JobState
) -> None:
    series = receive_series(session_factory, root, tmp_path)
    add_job(session_factory, root, series, state=state, export=None)
    report = _inputs(session_factory, root)
    assert report.series == [] and report.kept_unsettled == 1
    assert _held(series) and _instances(session_factory, series.id) == 3


def test_a_study_being_retrieved_is_kept(session_factory: sessionmaker[Session], root: Path, tmp_path: Path) -> None:
    series = receive_series(session_factory, root, tmp_path, state=SeriesState.unmatched)
    with transaction(session_factory) as session:
        session.add(Retrieval(study_instance_uid=series.study_uid, source="PACS", state=RetrievalState.running))
    report = _inputs(session_factory, root)
    assert report.series == [] and report.kept_retrieving == 1 and _held(series)


def test_results_go_after_their_cutoff_while_the_job_row_and_findings_stay(
    session_factory: sessionmaker[Session], root: Path, tmp_path: Path
) -> None:
    series = receive_series(session_factory, root, tmp_path)
    old = add_job(session_factory, root, series)
    other = receive_series(session_factory, root, tmp_path)
    recent = add_job(session_factory, root, other, finished_days_ago=5)

    report = _results(session_factory, root)

    assert report.jobs == [old.id] and report.result_objects == 1 and report.previews == 1
    assert not old.result_path.exists() and not old.result_path.parent.exists()
    assert recent.result_path.is_file() and _held(series)  # inputs have their own cutoff (off here)
    with session_factory() as session:
        job = session.get(Job, old.id)
        assert job is not None and job.state == JobState.done
        assert session.scalar(select(func.count(Finding.id)).where(Finding.job_id == old.id)) == 1
        assert session.scalar(select(func.count(Measurement.id)).where(Measurement.job_id == old.id)) == 1
        result = session.scalar(select(ResultObject).where(ResultObject.job_id == old.id))
        assert result is not None and result.purged_at is not None
        assert result.sop_instance_uid == old.sop_instance_uid  # the record of what was made stays
        assert session.scalar(select(func.count(Export.id)).where(Export.result_object_id == result.id)) == 1
        assert session.get(JobPreview, old.id) is None and session.get(JobPreview, recent.id) is not None
        # its QIDO-RS/WADO-RS index row and its (now empty) SEG series row are gone
        assert session.scalar(select(Instance.id).where(Instance.sop_instance_uid == old.sop_instance_uid)) is None
        assert session.scalar(select(Series.id).where(Series.series_instance_uid == old.series_instance_uid)) is None
        assert (
            session.scalar(select(Instance.id).where(Instance.sop_instance_uid == recent.sop_instance_uid)) is not None
        )


def test_a_second_pass_finds_nothing_to_do(session_factory: sessionmaker[Session], root: Path, tmp_path: Path) -> None:
    series = receive_series(session_factory, root, tmp_path)
    add_job(session_factory, root, series)
    first = _both(session_factory, root)
    assert first.series and first.jobs
    second = _both(session_factory, root)
    assert (second.series, second.jobs, second.instances, second.result_objects) == ([], [], 0, 0)
    assert (second.files, second.series_rows_deleted, second.studies_rows_deleted) == (0, 0, 0)


def test_a_dry_run_removes_nothing_and_says_what_a_pass_would_remove(
    session_factory: sessionmaker[Session], root: Path, tmp_path: Path
) -> None:
    series = receive_series(session_factory, root, tmp_path)
    job = add_job(session_factory, root, series)
    unmatched = receive_series(session_factory, root, tmp_path, state=SeriesState.unmatched)

    dry = _both(session_factory, root, dry_run=True)

    assert dry.dry_run and _held(series) and _held(unmatched) and job.result_path.is_file()
    assert _instances(session_factory, series.id) == 3
    with session_factory() as session:
        assert session.get(JobPreview, job.id) is not None
        assert session.scalar(select(ResultObject.purged_at).where(ResultObject.job_id == job.id)) is None
    real = _both(session_factory, root)
    assert sorted(dry.series) == sorted(real.series) and dry.jobs == real.jobs
    assert (dry.instances, dry.result_objects, dry.previews) == (real.instances, real.result_objects, real.previews)
    assert dry.bytes == real.bytes


def test_a_stored_path_that_leaves_the_instances_folder_is_never_deleted(
    session_factory: sessionmaker[Session], root: Path, tmp_path: Path
) -> None:
    series = receive_series(session_factory, root, tmp_path)
    outside = tmp_path / "outside.dcm"
    outside.write_bytes(b"not the node's")
    precious = root / "precious.db"
    precious.write_bytes(b"the node's own file, beside instances/")
    with transaction(session_factory) as session:
        ids = session.scalars(select(Instance.id).where(Instance.series_id == series.id).order_by(Instance.id)).all()
        session.execute(update(Instance).where(Instance.id == ids[0]).values(path="../outside.dcm"))
        session.execute(update(Instance).where(Instance.id == ids[1]).values(path="precious.db"))
        session.execute(update(Instance).where(Instance.id == ids[2]).values(path="instances/../precious.db"))

    report = _inputs(session_factory, root)

    assert report.series == [series.id] and report.refused_paths == 3
    assert outside.read_bytes() == b"not the node's" and precious.is_file()
    assert _instances(session_factory, series.id) == 0
    with session_factory() as session:
        assert session.scalar(select(func.count(FileDeletion.id))) == 0


def test_files_left_by_an_interrupted_pass_are_removed_by_the_next(
    session_factory: sessionmaker[Session], root: Path, tmp_path: Path
) -> None:
    """A pass that died after its commit left outbox rows and files; the next pass removes them, but never a
    file that a row refers to again (a series sent again since)."""
    orphan = root / "instances" / "1.2.3" / "4.5.6" / "7.8.9.dcm"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"left behind")
    series = receive_series(session_factory, root, tmp_path, days_ago=1)
    with transaction(session_factory) as session:
        deletions.record(session, ["instances/1.2.3/4.5.6/7.8.9.dcm", "instances/1.2.3/4.5.6"])
        deletions.record(session, [path.relative_to(root).as_posix() for path in series.paths])

    report = _inputs(session_factory, root)

    assert not orphan.exists() and not orphan.parent.parent.exists()
    assert report.files == 1 and report.files_kept == 3
    assert _held(series)
    with session_factory() as session:
        assert deletions.pending(session) == 0


def test_inputs_removed_refuse_a_retry_and_results_removed_refuse_a_redrive(
    session_factory: sessionmaker[Session], root: Path, tmp_path: Path, db_settings: Settings
) -> None:
    series = receive_series(session_factory, root, tmp_path)
    job = add_job(session_factory, root, series)
    _both(session_factory, root)
    with pytest.raises(Conflict, match="retention removed its input series"):
        with transaction(session_factory) as session:
            retry(session, job.id)
    settings = Settings(**{**db_settings.model_dump(), "pacs": PACS})
    with pytest.raises(Conflict, match="removed by retention"):
        with transaction(session_factory) as session:
            redrive(session, settings, job.id)
