"""Re-driving exports: sending a finished job's result objects to the PACS again, when asked to.

A permanent refusal (0xA900, 0xC000, an association rejected-permanent) is not retried by the worker,
and transient failures stop after ``export_max_attempts``; once the cause is fixed, a person asks for
the export again (``POST /api/v1/jobs/{id}/export``). A plain function over a session, like
:mod:`infergate.submission`: the caller commits, then enqueues the export (if the broker is down,
the reconciler sends the job's overdue exports).
"""

from __future__ import annotations

import logging

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from infergate.config import Destination, Settings
from infergate.errors import Conflict, InvalidInput, NotFound
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
        (no export of it failed), has no result objects, or no destination is configured.
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
