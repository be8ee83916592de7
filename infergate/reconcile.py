"""The SQL reconciler: re-sends jobs whose Celery message was lost.

Messages can vanish (a Redis restart without persistence, a filesystem-broker worker killed after
taking a message). SQL is the source of truth, so jobs that sit ``queued`` too long, ``running``
with an expired lease, or ``exporting`` with an overdue export are sent again. Tasks are
idempotent (the SQL lease in :func:`infergate.store.queries.claim_job`), so a duplicate message
costs nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
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
    #: Jobs due to be sent that could not be (the broker is down): pass them as ``unsent`` next time.
    unsent: list[int] = field(default_factory=list)


def reconcile(
    factory: sessionmaker[Session],
    queue: JobSender,
    *,
    requeue_after: timedelta,
    retrieval_lease: timedelta = timedelta(minutes=15),
    unsent: Collection[int] = (),
) -> ReconcileReport:
    """Re-send lost work; returns what was sent.

    ``unsent`` names jobs whose last send failed (the broker was down): those still queued are
    sent now rather than ``requeue_after`` after they were queued. A pass stops sending at the
    first broker failure; what it could not send stays due for the next pass.
    """
    report = ReconcileReport()
    now = utcnow()
    with factory() as session, session.begin():
        stale, expired = queries.jobs_to_resend(session, now - requeue_after, now)
        if unsent:
            stale += [job_id for job_id in queries.queued_jobs(session, unsent) if job_id not in stale]
        overdue = queries.exports_overdue(session, now - requeue_after)
        retrievals = retrieval.to_resend(session, queued_before=requeue_after, lease=retrieval_lease)
        if retrievals:
            session.execute(
                update(Retrieval)
                .where(Retrieval.id.in_(retrievals))
                .values(state=RetrievalState.queued, updated_at=now)
            )
        if expired:
            # Queued again, but with the old queued_at: until a send succeeds the job stays due.
            session.execute(
                update(Job)
                .where(Job.id.in_(expired), Job.state == JobState.running, Job.lease_until < now)
                .values(state=JobState.queued, lease_until=None, updated_at=now)
            )
    broker_down = False

    def send(what: str, item_id: int, send_one: Callable[[int], None]) -> bool:
        nonlocal broker_down
        if broker_down:
            return False
        try:
            send_one(item_id)
        except Exception as exc:  # noqa: BLE001 - broker down: the rest waits for the next pass
            log.warning("re-send of %s %d failed (%s); retrying on the next pass", what, item_id, type(exc).__name__)
            broker_down = True
            return False
        return True

    for job_id in stale + expired:
        if send("job", job_id, queue.send_run):
            (report.resent_queued if job_id in stale else report.resent_expired).append(job_id)
        else:
            report.unsent.append(job_id)
    for job_id in overdue:
        if send("export of job", job_id, queue.send_export):
            report.resent_exports.append(job_id)
    for retrieval_id in retrievals:
        if send("retrieval", retrieval_id, queue.send_retrieve):
            report.resent_retrievals.append(retrieval_id)
    sent_jobs = report.resent_queued + report.resent_expired
    if sent_jobs or report.resent_exports:
        # Touch what was sent, so the next pass waits a full period before sending it again;
        # what could not be sent keeps its old time and is due on the next pass.
        with factory() as session, session.begin():
            if sent_jobs:
                session.execute(
                    update(Job).where(Job.id.in_(sent_jobs), Job.state == JobState.queued).values(queued_at=now)
                )
            if report.resent_exports:
                session.execute(update(Job).where(Job.id.in_(report.resent_exports)).values(updated_at=now))
    if report.resent_queued or report.resent_expired or report.resent_exports or report.resent_retrievals:
        log.info("reconciler re-sent %s", report)
    return report
