"""The SQL reconciler: re-sends jobs whose Celery message was lost.

Messages can vanish (a Redis restart without persistence, a filesystem-broker worker killed after
taking a message). SQL is the source of truth, so jobs that sit ``queued`` too long, ``running``
with an expired lease, or ``exporting`` with an overdue export are sent again. Tasks are
idempotent (the SQL lease in :func:`infergate.store.queries.claim_job`), so a duplicate message
costs nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from infergate import retrieval
from infergate.jobs import JobSender
from infergate.store import queries
from infergate.store.tables import Job, JobState, Retrieval, RetrievalState, utcnow

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    resent_queued: list[int] = field(default_factory=list)
    resent_expired: list[int] = field(default_factory=list)
    resent_exports: list[int] = field(default_factory=list)
    resent_retrievals: list[int] = field(default_factory=list)


def reconcile(
    factory: sessionmaker[Session],
    queue: JobSender,
    *,
    requeue_after: timedelta,
    retrieval_lease: timedelta = timedelta(minutes=15),
) -> ReconcileReport:
    """Re-send lost work; returns what was sent."""
    report = ReconcileReport()
    now = utcnow()
    with factory() as session, session.begin():
        stale, expired = queries.jobs_to_resend(session, now - requeue_after, now)
        overdue = queries.exports_overdue(session, now - requeue_after)
        retrievals = retrieval.to_resend(session, queued_before=requeue_after, lease=retrieval_lease)
        if retrievals:
            session.execute(
                update(Retrieval)
                .where(Retrieval.id.in_(retrievals))
                .values(state=RetrievalState.queued, updated_at=now)
            )
        # Touch the rows so the next pass waits a full period before sending again.
        if stale:
            session.execute(update(Job).where(Job.id.in_(stale)).values(queued_at=now))
        if expired:
            session.execute(
                update(Job)
                .where(Job.id.in_(expired), Job.state == JobState.running, Job.lease_until < now)
                .values(state=JobState.queued, queued_at=now, lease_until=None, updated_at=now)
            )
        if overdue:
            session.execute(update(Job).where(Job.id.in_(overdue)).values(updated_at=now))
    for job_id in stale + expired:
        try:
            queue.send_run(job_id)
        except Exception as exc:  # noqa: BLE001 - broker down: try again next pass
            log.warning("re-send of job %d failed (%s)", job_id, type(exc).__name__)
            continue
        (report.resent_queued if job_id in stale else report.resent_expired).append(job_id)
    for job_id in overdue:
        try:
            queue.send_export(job_id)
        except Exception as exc:  # noqa: BLE001
            log.warning("re-send of export for job %d failed (%s)", job_id, type(exc).__name__)
            continue
        report.resent_exports.append(job_id)
    for retrieval_id in retrievals:
        try:
            queue.send_retrieve(retrieval_id)
        except Exception as exc:  # noqa: BLE001
            log.warning("re-send of retrieval %d failed (%s)", retrieval_id, type(exc).__name__)
            continue
        report.resent_retrievals.append(retrieval_id)
    if report.resent_queued or report.resent_expired or report.resent_exports or report.resent_retrievals:
        log.info("reconciler re-sent %s", report)
    return report
