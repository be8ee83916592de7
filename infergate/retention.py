"""Retention: removing received series and produced results once they are old and done with.

``INFERGATE_RETAIN_INPUTS_DAYS`` and ``INFERGATE_RETAIN_RESULTS_DAYS`` (0: keep forever, the
default) say how long the node keeps what it received and what it made. The watcher runs
:func:`run_cleanup` every ``INFERGATE_CLEANUP_INTERVAL_SECONDS``; ``infergate cleanup [--dry-run]``
runs it by hand.

What is removed
---------------
* **Inputs**: a received series whose last instance arrived before the inputs cutoff loses its
  Part 10 files, its instance rows (and the conflict records of those instances) and its folder.
  Its Series row is deleted too when no job refers to it (an unmatched series), and the Study row
  once it has no series left; a series that has jobs keeps its row, marked ``purged_at``.
* **Results**: a job that finished before the results cutoff loses its SEG/SR files, their
  WADO-RS/QIDO-RS index rows (and the node's SEG/SR series rows once empty) and its preview. Its
  result objects stay as rows marked ``purged_at``, with their UIDs and export record.

What is kept: the job rows, findings, measurements, timings and export history. A hospital keeps
the small record of what was analysed, found and sent; the bulky pixel data lives on in the PACS.
The REST API says so: ``purged_at`` in a job's JSON, 410 Gone from WADO-RS for removed objects.

What is never removed
---------------------
Nothing whose work is not finished: a series still receiving, a series with a job that is queued,
running or exporting, a study being retrieved from a source, and nothing whose export is not done.
An export that is pending, retrying or failed keeps both the job's results and its input series: a
failed export is re-driven by a person (``infergate export --failed``), and until it is delivered
the node holds the only copy. The one exception is a cancelled job, whose pending exports nothing
will ever send. Every pass reports how many old series and jobs it kept for these reasons.

Order of deletion, and why it is crash-safe
-------------------------------------------
Rows first, then files. The rows go in one committed transaction, which also writes the paths to
remove into the ``file_deletions`` outbox (:mod:`infergate.deletions`); the files are removed after
the commit, and the outbox rows after that. The reverse order would leave, after a crash, rows that
point at missing files: WADO-RS would answer with errors and a retry would run on half a series,
breaking the rule that a held instance has its row and its file. This order can only leave files
without rows, and the outbox names them, so the next pass removes them.

Concurrency
-----------
Every delete is guarded: the series row and its jobs (or the job row) are locked and the
conditions read again inside the transaction, so several watchers, a CLI run, a retry over REST or
a re-sent series never see a half-removed series. A series is removed under its folder's lock, the
lock the SCP holds while storing into it, so an instance that arrives meanwhile waits and is then
stored anew. A second pass over the same data finds nothing to do.

Logs name counts only; the audit trail records each study touched (PS3.15 A.5.3.5, 110105 DICOM
Study Deleted when nothing of the study is left, else 110103 DICOM Instances Accessed, Delete).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Select, and_, delete, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from infergate import deletions
from infergate.audit import Auditor, Outcome, instances_deleted, study_deleted
from infergate.config import Settings
from infergate.deletions import Removal
from infergate.dicom.storage import folder_lock, resolve_inside, result_relfolder, series_relfolder
from infergate.errors import InvalidInput
from infergate.progress import Progress, no_progress
from infergate.store.tables import (
    Export,
    ExportState,
    Instance,
    InstanceConflict,
    Job,
    JobPreview,
    JobState,
    ResultObject,
    Retrieval,
    RetrievalState,
    Series,
    SeriesState,
    Study,
    utcnow,
)

log = logging.getLogger(__name__)

#: Job states after which nothing runs or sends any more.
SETTLED = (JobState.done, JobState.failed, JobState.cancelled)
#: Series states that retention may remove: complete, and received (not the node's own SEG/SR).
_RECEIVED = (SeriesState.routed, SeriesState.unmatched)
_RETRIEVING = (RetrievalState.queued, RetrievalState.running)


@dataclass
class CleanupReport:
    """What a pass removed (or, dry, would remove): database ids and counts, never a UID."""

    dry_run: bool
    inputs_before: datetime | None
    results_before: datetime | None
    series: list[int] = field(default_factory=list)
    """Ids of the series whose instances were removed."""
    instances: int = 0
    series_rows_deleted: int = 0
    studies_rows_deleted: int = 0
    jobs: list[int] = field(default_factory=list)
    """Ids of the jobs whose result objects (and preview) were removed."""
    result_objects: int = 0
    previews: int = 0
    bytes: int = 0
    files: int = 0
    folders: int = 0
    refused_paths: int = 0
    files_kept: int = 0
    kept_unsettled: int = 0
    """Old series kept because a job of theirs is queued, running or exporting."""
    kept_not_delivered: int = 0
    """Old series and jobs kept because an export is not done."""
    kept_retrieving: int = 0
    """Old series kept because their study is being retrieved."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("inputs_before", "results_before"):
            value = data[key]
            data[key] = value.isoformat() if value is not None else None
        return data

    def add_removal(self, removal: Removal) -> None:
        self.bytes += removal.bytes
        self.files += removal.files
        self.folders += removal.folders
        self.refused_paths += removal.refused
        self.files_kept += removal.kept


# Which series and jobs may go ---------------------------------------------------------------------


def _series_flags(before: datetime) -> Select[int, bool, bool, bool]:
    """Old received series that hold instances, each with what would keep it."""
    unsettled = select(Job.id).where(Job.series_id == Series.id, Job.state.not_in(SETTLED)).exists()
    not_delivered = (
        select(Export.id)
        .join(ResultObject, ResultObject.id == Export.result_object_id)
        .join(Job, Job.id == ResultObject.job_id)
        .where(Job.series_id == Series.id, Job.state != JobState.cancelled, Export.state != ExportState.done)
        .exists()
    )
    retrieving = (
        select(Retrieval.id)
        .where(Retrieval.study_instance_uid == Study.study_instance_uid, Retrieval.state.in_(_RETRIEVING))
        .exists()
    )
    holds = select(Instance.id).where(Instance.series_id == Series.id).exists()
    return (
        select(Series.id, unsettled.label("unsettled"), not_delivered.label("not_delivered"), retrieving.label("rt"))
        .join(Study, Study.id == Series.study_id)
        .where(Series.state.in_(_RECEIVED), Series.last_received_at < before, holds)
        .order_by(Series.last_received_at, Series.id)
    )


def _job_flags(before: datetime) -> Select[int, bool]:
    """Jobs settled before ``before`` that still hold result files or a preview, each with whether an
    export keeps them."""
    not_delivered = (
        select(Export.id)
        .join(ResultObject, ResultObject.id == Export.result_object_id)
        .where(ResultObject.job_id == Job.id, Export.state != ExportState.done)
        .exists()
    )
    holds = or_(
        select(ResultObject.id).where(ResultObject.job_id == Job.id, ResultObject.purged_at.is_(None)).exists(),
        select(JobPreview.job_id).where(JobPreview.job_id == Job.id).exists(),
    )
    return (
        select(Job.id, and_(Job.state != JobState.cancelled, not_delivered).label("not_delivered"))
        .where(Job.state.in_(SETTLED), Job.finished_at < before, holds)
        .order_by(Job.finished_at, Job.id)
    )


@dataclass
class Plan:
    """The series and jobs a pass would remove, and how many old ones it keeps (and why)."""

    series: list[int] = field(default_factory=list)
    jobs: list[int] = field(default_factory=list)
    kept_unsettled: int = 0
    kept_not_delivered: int = 0
    kept_retrieving: int = 0


def plan(session: Session, *, inputs_before: datetime | None, results_before: datetime | None) -> Plan:
    """Read which series and jobs are due; removes nothing (each removal checks again under locks)."""
    found = Plan()
    if inputs_before is not None:
        for series_id, unsettled, not_delivered, retrieving in session.execute(_series_flags(inputs_before)):
            if unsettled:
                found.kept_unsettled += 1
            elif not_delivered:
                found.kept_not_delivered += 1
            elif retrieving:
                found.kept_retrieving += 1
            else:
                found.series.append(series_id)
    if results_before is not None:
        for job_id, not_delivered in session.execute(_job_flags(results_before)):
            if not_delivered:
                found.kept_not_delivered += 1
            else:
                found.jobs.append(job_id)
    return found


# Removing one series or one job's results --------------------------------------------------------------


@dataclass
class _Removed:
    """One series' or one job's removal, for the report and the audit trail."""

    study_uid: str
    sop_classes: Counter[str]
    rows: int = 0
    previews: int = 0
    series_row_deleted: bool = False
    study_row_deleted: bool = False
    removal: Removal = field(default_factory=Removal)


def _drop_empty_series(session: Session, series_ids: Iterable[int], *, now: datetime) -> tuple[int, int]:
    """Recount ``series_ids`` after their instance rows went; delete those left empty that no job refers
    to, and their study once it has no series. Returns (series rows deleted, study rows deleted)."""
    series_deleted = studies_deleted = 0
    for series_id in series_ids:
        count = session.scalar(select(func.count(Instance.id)).where(Instance.series_id == series_id)) or 0
        has_jobs = session.scalar(select(Job.id).where(Job.series_id == series_id).limit(1)) is not None
        study_id = session.scalar(select(Series.study_id).where(Series.id == series_id))
        if count or has_jobs:
            session.execute(update(Series).where(Series.id == series_id).values(num_instances=count, purged_at=now))
            continue
        session.execute(delete(Series).where(Series.id == series_id))
        series_deleted += 1
        if session.scalar(select(Series.id).where(Series.study_id == study_id).limit(1)) is None:
            session.execute(delete(Study).where(Study.id == study_id))
            studies_deleted += 1
    return series_deleted, studies_deleted


def _delete_instances(session: Session, instance_ids: list[int]) -> None:
    for start in range(0, len(instance_ids), 500):
        chunk = instance_ids[start : start + 500]
        session.execute(delete(InstanceConflict).where(InstanceConflict.instance_id.in_(chunk)))
        session.execute(delete(Instance).where(Instance.id.in_(chunk)))


def purge_series(factory: sessionmaker[Session], root: Path, series_id: int, *, before: datetime) -> _Removed | None:
    """Remove the instances of one series if it is still due (see the module docstring); None if not."""
    with factory() as session:
        uids = session.execute(
            select(Study.study_instance_uid, Series.series_instance_uid)
            .join(Study, Study.id == Series.study_id)
            .where(Series.id == series_id)
        ).first()
    if uids is None:
        return None
    try:
        relfolder: Path | None = series_relfolder(uids[0], uids[1])
    except InvalidInput:
        relfolder = None  # not a path the SCP would have stored into: nothing to lock
    lock = folder_lock(root, relfolder) if relfolder is not None else contextlib.nullcontext()
    with lock:
        with factory() as session, session.begin():
            session.execute(select(Series.id).where(Series.id == series_id).with_for_update())
            session.execute(select(Job.id).where(Job.series_id == series_id).with_for_update())
            flags = session.execute(_series_flags(before).where(Series.id == series_id)).first()
            if flags is None or any(flags[1:]):
                return None
            instances = session.execute(
                select(Instance.id, Instance.path, Instance.sop_class_uid).where(Instance.series_id == series_id)
            ).all()
            _delete_instances(session, [row.id for row in instances])
            series_deleted, studies_deleted = _drop_empty_series(session, [series_id], now=utcnow())
            paths = [row.path for row in instances]
            if relfolder is not None:
                paths.append(relfolder.as_posix())
            outbox = deletions.record(session, paths)
        held = resolve_inside(root, relfolder) if relfolder is not None else None
        removal = deletions.remove(factory, root, outbox, held=held)
    return _Removed(
        study_uid=uids[0],
        sop_classes=Counter(row.sop_class_uid for row in instances),
        rows=len(instances),
        series_row_deleted=bool(series_deleted),
        study_row_deleted=bool(studies_deleted),
        removal=removal,
    )


def purge_results(factory: sessionmaker[Session], root: Path, job_id: int, *, before: datetime) -> _Removed | None:
    """Remove the result files, their index rows and the preview of one job if it is still due; None if not."""
    with factory() as session, session.begin():
        session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
        flags = session.execute(_job_flags(before).where(Job.id == job_id)).first()
        if flags is None or flags[1]:
            return None
        study_uid = session.scalar(
            select(Study.study_instance_uid)
            .join(Series, Series.study_id == Study.id)
            .join(Job, Job.series_id == Series.id)
            .where(Job.id == job_id)
        )
        objects = session.execute(
            select(ResultObject.id, ResultObject.path, ResultObject.sop_instance_uid, ResultObject.sop_class_uid).where(
                ResultObject.job_id == job_id, ResultObject.purged_at.is_(None)
            )
        ).all()
        indexed = session.execute(
            select(Instance.id, Instance.path, Instance.series_id).where(
                Instance.sop_instance_uid.in_([row.sop_instance_uid for row in objects])
            )
        ).all()
        now = utcnow()
        _delete_instances(session, [row.id for row in indexed])
        series_deleted, studies_deleted = _drop_empty_series(session, {row.series_id for row in indexed}, now=now)
        previews = session.execute(delete(JobPreview).where(JobPreview.job_id == job_id)).rowcount  # type: ignore[attr-defined]
        if objects:
            session.execute(
                update(ResultObject).where(ResultObject.id.in_([row.id for row in objects])).values(purged_at=now)
            )
        paths = [row.path for row in objects] + [row.path for row in indexed] + [result_relfolder(job_id).as_posix()]
        outbox = deletions.record(session, paths)
    removal = deletions.remove(factory, root, outbox)
    return _Removed(
        study_uid=study_uid or "",
        sop_classes=Counter(row.sop_class_uid for row in objects),
        rows=len(objects),
        previews=int(previews or 0),
        series_row_deleted=bool(series_deleted),
        study_row_deleted=bool(studies_deleted),
        removal=removal,
    )


# A pass -----------------------------------------------------------------------------------------------


def cutoffs(settings: Settings, now: datetime | None = None) -> tuple[datetime | None, datetime | None]:
    """(inputs_before, results_before) from the retention settings; None where kept forever."""
    now = now or utcnow()
    inputs, results = settings.retain_inputs, settings.retain_results
    return (now - inputs if inputs else None, now - results if results else None)



def _dry_counts(session: Session, found: Plan, report: CleanupReport) -> None:
    """What a real pass would remove, from the rows: instances, result objects, previews and bytes."""
    for start in range(0, len(found.series), 500):
        chunk = found.series[start : start + 500]
        count, size = session.execute(
            select(func.count(Instance.id), func.coalesce(func.sum(Instance.size), 0)).where(
                Instance.series_id.in_(chunk)
            )
        ).one()
        report.instances += int(count)
        report.bytes += int(size)
    for start in range(0, len(found.jobs), 500):
        chunk = found.jobs[start : start + 500]
        uids = select(ResultObject.sop_instance_uid).where(
            ResultObject.job_id.in_(chunk), ResultObject.purged_at.is_(None)
        )
        report.result_objects += session.scalar(select(func.count()).select_from(uids.subquery())) or 0
        report.bytes += int(
            session.scalar(select(func.coalesce(func.sum(Instance.size), 0)).where(Instance.sop_instance_uid.in_(uids)))
            or 0
        )
        previews = select(func.count(JobPreview.job_id)).where(JobPreview.job_id.in_(chunk))
        report.previews += session.scalar(previews) or 0


def _audit(auditor: Auditor, factory: sessionmaker[Session], touched: dict[str, Counter[str]]) -> None:
    """One record per study: 110105 Study Deleted if none of it is left, else 110103 Accessed, Delete."""
    node = auditor.node(is_requestor=True)
    for study_uid, sop_classes in touched.items():
        with factory() as session:
            left = session.scalar(
                select(Instance.id)
                .join(Series, Series.id == Instance.series_id)
                .join(Study, Study.id == Series.study_id)
                .where(Study.study_instance_uid == study_uid)
                .limit(1)
            )
        make = study_deleted if left is None else instances_deleted
        auditor.emit(
            make(node=node, studies={study_uid: dict(sop_classes)}, outcome=Outcome.SUCCESS, description="retention")
        )


def run_cleanup(
    factory: sessionmaker[Session],
    root: Path,
    *,
    inputs_before: datetime | None,
    results_before: datetime | None,
    dry_run: bool = False,
    progress: Progress = no_progress,
    auditor: Auditor | None = None,
) -> CleanupReport:
    """One retention pass: finish an interrupted pass, then remove due inputs and results.

    Parameters
    ----------
    factory
        Sessions on the results store.
    root
        The data folder.
    inputs_before, results_before
        Series whose last instance arrived, and jobs that finished, before these are due; None keeps
        them (``INFERGATE_RETAIN_*_DAYS`` = 0).
    dry_run
        Report what would be removed and touch nothing (not even an interrupted pass's leftovers).
    progress
        Draws a bar over the series and jobs (``infergate cleanup`` on a terminal).
    auditor
        Receives one audit record per study touched.

    Returns
    -------
    CleanupReport
        Ids and counts; never a UID or a path.
    """
    report = CleanupReport(dry_run=dry_run, inputs_before=inputs_before, results_before=results_before)
    with factory() as session:
        found = plan(session, inputs_before=inputs_before, results_before=results_before)
        if dry_run:
            _dry_counts(session, found, report)
    report.kept_unsettled = found.kept_unsettled
    report.kept_not_delivered = found.kept_not_delivered
    report.kept_retrieving = found.kept_retrieving
    if dry_run:
        report.series, report.jobs = found.series, found.jobs
        return report
    report.add_removal(deletions.sweep(factory, root))
    touched: dict[str, Counter[str]] = {}

    def _account(removed: _Removed) -> None:
        report.series_rows_deleted += removed.series_row_deleted
        report.studies_rows_deleted += removed.study_row_deleted
        report.add_removal(removed.removal)
        touched.setdefault(removed.study_uid, Counter()).update(removed.sop_classes)

    for series_id in progress(found.series, total=len(found.series), desc="series"):
        assert inputs_before is not None
        removed = purge_series(factory, root, series_id, before=inputs_before)
        if removed is not None:
            report.series.append(series_id)
            report.instances += removed.rows
            _account(removed)
    for job_id in progress(found.jobs, total=len(found.jobs), desc="results"):
        assert results_before is not None
        removed = purge_results(factory, root, job_id, before=results_before)
        if removed is not None:
            report.jobs.append(job_id)
            report.result_objects += removed.rows
            report.previews += removed.previews
            _account(removed)
    if auditor is not None and touched:
        _audit(auditor, factory, {uid: classes for uid, classes in touched.items() if uid})
    if report.series or report.jobs or report.kept_not_delivered or report.refused_paths:
        log.info(
            "retention: removed %d instances of %d series and %d result objects of %d jobs (%d files, %d bytes); "
            "kept %d old series/jobs whose export is not done, %d with unfinished jobs, %d being retrieved",
            report.instances,
            len(report.series),
            report.result_objects,
            len(report.jobs),
            report.files,
            report.bytes,
            report.kept_not_delivered,
            report.kept_unsettled,
            report.kept_retrieving,
        )
    return report
