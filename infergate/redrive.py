"""Re-driving exports: sending a finished job's result objects to the PACS again, when asked to.

A permanent refusal (0xA900, 0xC000, an association rejected-permanent) is not retried by the worker,
and transient failures stop after ``export_max_attempts``; once the cause is fixed, a person asks for
the export again (``POST /api/v1/jobs/{id}/export`` for one job, ``infergate export --failed`` for
every job whose export failed). :func:`redrive` is a plain function over a session, like
:mod:`infergate.submission`: the caller commits, then enqueues the export (if the broker is down,
the reconciler sends the job's overdue exports). :func:`redrive_failed` does that for each job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Destination, Settings
from infergate.errors import Conflict, InvalidInput, NotFound
from infergate.jobs import JobSender
from infergate.progress import Progress, no_progress
from infergate.store.tables import Export, ExportState, Job, JobState, ResultObject, utcnow

log = logging.getLogger(__name__)

#: States of a job whose exports can be re-driven: its result objects are final.
REDRIVABLE = (JobState.done, JobState.failed)


def _targets(settings: Settings, destination: str | None) -> list[str]:
    configured = [str(d) for d in settings.pacs]
    if destination is None:
        if not configured:
            raise Conflict("No result destinations are configured (INFERGATE_PACS); there is nowhere to export to.")
        return configured
    try:
        wanted = str(Destination.parse(destination))
    except ValueError as exc:
        raise InvalidInput(f'Argument "destination": {exc}') from None
    if wanted not in configured:
        # Only configured peers: re-drive must not become a way to send results anywhere.
        raise NotFound(f'Destination "{wanted}" is not one of the configured result destinations (INFERGATE_PACS).')
    return [wanted]


def redrive(session: Session, settings: Settings, job_id: int, *, destination: str | None = None) -> int:
    """Make a done or failed job's exports pending again and move the job back to ``exporting``.

    Every result object of the job is sent to ``destination``, or to every configured destination;
    existing export rows (failed or done) start again with a fresh attempt count, and rows are created
    for configured destinations the job has none for (e.g. a PACS added since the job ran).

    Returns
    -------
    int
        The number of exports made pending.

    Raises
    ------
    NotFound
        The job does not exist, or ``destination`` is not a configured destination.
    InvalidInput
        ``destination`` is not of the form ``AE@host:port``.
    Conflict
        The job is not finished (queued, running, exporting), was cancelled, failed before its export
        (no export of it failed), has no result objects or retention removed them, or no destination
        is configured.
    """
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise NotFound(f"Job {job_id} does not exist.")
    if job.state not in REDRIVABLE:
        allowed = ", ".join(state.value for state in REDRIVABLE)
        raise Conflict(f"Job {job_id} is {job.state.value}; only {allowed} jobs can be exported again.")
    objects = session.scalars(select(ResultObject.id).where(ResultObject.job_id == job_id)).all()
    if not objects:
        raise Conflict(f"Job {job_id} has no result objects to export.")
    purged = session.scalar(select(func.max(ResultObject.purged_at)).where(ResultObject.job_id == job_id))
    if purged is not None:
        raise Conflict(
            f"Job {job_id}'s result objects were removed by retention on {purged:%Y-%m-%d}; retry the job to make "
            "them again."
        )
    if job.state == JobState.failed:
        export_failed = session.scalar(
            select(Export.id).where(Export.result_object_id.in_(objects), Export.state == ExportState.failed).limit(1)
        )
        if export_failed is None:
            # its result objects are from an earlier run; exporting them would mark the job done
            raise Conflict(f"Job {job_id} failed before its export; retry the job instead.")
    targets = _targets(settings, destination)
    existing = {
        (row.result_object_id, row.destination): row.id
        for row in session.execute(
            select(Export.id, Export.result_object_id, Export.destination).where(
                Export.result_object_id.in_(objects), Export.destination.in_(targets)
            )
        )
    }
    if existing:
        session.execute(
            update(Export)
            .where(Export.id.in_(existing.values()))
            .values(
                state=ExportState.pending,
                attempts=0,
                last_status=None,
                last_error=None,
                next_attempt_at=None,
                delivered_at=None,
            )
        )
    for object_id in objects:
        for target in targets:
            if (object_id, target) not in existing:
                session.add(
                    Export(result_object_id=object_id, destination=target, state=ExportState.pending, attempts=0)
                )
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(state=JobState.exporting, error=None, finished_at=None, lease_until=None, updated_at=utcnow())
    )
    count = len(objects) * len(targets)
    log.info("job %d: %d exports re-driven to %s", job_id, count, ", ".join(targets))
    return count


def failed_export_jobs(session: Session, *, since: datetime | None = None) -> list[int]:
    """Ids of the jobs whose export failed (failed, with a failed export), oldest first.

    ``since`` keeps those that finished at or after it. Jobs whose result objects retention removed
    are left out: there is nothing left to send (retention never removes them while an export is
    failed, but a person may have purged them by hand).
    """
    stmt = (
        select(Job.id)
        .join(ResultObject, ResultObject.job_id == Job.id)
        .join(Export, Export.result_object_id == ResultObject.id)
        .where(Job.state == JobState.failed, Export.state == ExportState.failed, ResultObject.purged_at.is_(None))
        .group_by(Job.id)
        .order_by(Job.id)
    )
    if since is not None:
        stmt = stmt.where(Job.finished_at >= since)
    return list(session.scalars(stmt))


@dataclass
class BulkRedrive:
    """What :func:`redrive_failed` did: job ids and counts (no UIDs)."""

    jobs: list[int] = field(default_factory=list)
    exports: int = 0
    skipped: dict[int, str] = field(default_factory=dict)
    """Jobs that changed state since they were listed, with why (e.g. re-driven by someone else)."""
    unsent: list[int] = field(default_factory=list)
    """Jobs re-driven in SQL whose message could not be sent (broker down): the reconciler sends them."""


def redrive_failed(
    factory: sessionmaker[Session],
    settings: Settings,
    queue: JobSender,
    *,
    since: datetime | None = None,
    destination: str | None = None,
    progress: Progress = no_progress,
) -> BulkRedrive:
    """Re-drive every job whose export failed, one transaction per job, then enqueue its export.

    Raises
    ------
    Conflict, NotFound, InvalidInput
        No destination is configured, or ``destination`` is malformed or not configured: checked
        once, before any job is touched.
    """
    _targets(settings, destination)
    with factory() as session:
        job_ids = failed_export_jobs(session, since=since)
    report = BulkRedrive()
    for job_id in progress(job_ids, total=len(job_ids), desc="jobs"):
        try:
            with factory() as session, session.begin():
                report.exports += redrive(session, settings, job_id, destination=destination)
        except (Conflict, NotFound) as exc:
            report.skipped[job_id] = str(exc)
            continue
        report.jobs.append(job_id)
        try:
            queue.send_export(job_id)
        except Exception as exc:  # noqa: BLE001 - any broker failure; the reconciler sends overdue exports
            log.warning("could not enqueue the export of job %d (%s); the reconciler will", job_id, type(exc).__name__)
            report.unsent.append(job_id)
    return report
