"""Delivering result objects to the configured destinations, with capped exponential backoff.

One ``exports`` row per (object, destination) holds attempts, the last status and the next attempt
time, so retries survive restarts and are visible over REST. Permanent refusals (a failure status
other than out-of-resources, an association rejected-permanent, no accepted presentation context)
are not retried; transient ones (peer down, association rejected-transient or aborted, 0xA7xx) are,
up to ``export_max_attempts``. A failed export is sent again only when asked to
(``POST /api/v1/jobs/{id}/export``, :mod:`infergate.redrive`).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.orm import Session

from infergate import metrics
from infergate.config import Destination, Settings
from infergate.dicom.scu import StoreResult, send_files
from infergate.logs import bind_study, log_context
from infergate.store import queries
from infergate.store.tables import Export, ExportState, Job, JobState, ResultObject, utcnow
from workers.pipeline import WorkerContext, study_uid_of
from workers.remote import result_files
from workers.stages import merged

log = logging.getLogger(__name__)


def backoff(settings: Settings, attempts: int) -> float:
    """Delay before attempt ``attempts + 1``: doubling from ``export_backoff_seconds``, capped."""
    return min(settings.export_backoff_max_seconds, settings.export_backoff_seconds * 2 ** max(0, attempts - 1))


def _apply(settings: Settings, export: Export, result: StoreResult, now: datetime) -> None:
    export.attempts += 1
    export.last_status = result.status
    export.last_error = result.error
    if result.ok:
        export.state, export.delivered_at, export.next_attempt_at = ExportState.done, now, None
    elif not result.transient or export.attempts >= settings.export_max_attempts:
        export.state, export.next_attempt_at = ExportState.failed, None
    else:
        export.next_attempt_at = now + timedelta(seconds=backoff(settings, export.attempts))


def _settle(session: Session, job_id: int, seconds: float) -> float | None:
    """Set the job's final state once no export is pending; else the seconds until the next attempt.

    The ``seconds`` this runner spent sending are added to the job's ``export`` timing.
    """
    job = session.get(Job, job_id)
    if job is not None and seconds > 0:
        job.timings = merged(job.timings, {"export": seconds})
        metrics.stage_timings(job.model_id, {"export": seconds})
    exports = session.scalars(select(Export).join(ResultObject).where(ResultObject.job_id == job_id)).all()
    pending = [e for e in exports if e.state == ExportState.pending]
    if pending:
        now = utcnow()
        due = min((e.next_attempt_at for e in pending if e.next_attempt_at is not None), default=now)
        return max(0.0, (due - now).total_seconds())
    failed = [e for e in exports if e.state == ExportState.failed]
    if failed:
        error = "; ".join(sorted({e.last_error or f"export to {e.destination} failed" for e in failed}))
        queries.set_job_state(
            session, job_id, JobState.failed, f"export failed: {error}"[:2000], only_from=JobState.exporting
        )
    else:
        queries.set_job_state(session, job_id, JobState.done, only_from=JobState.exporting)
    return None


def _due(job_id: int, now: datetime) -> ColumnElement[bool]:
    return and_(
        ResultObject.job_id == job_id,
        Export.state == ExportState.pending,
        or_(Export.next_attempt_at.is_(None), Export.next_attempt_at <= now),
    )


def _send_due(ctx: WorkerContext, job_id: int, destination: str) -> bool:
    """Send the job's due exports to one destination; False if none was left (another runner holds or sent them).

    The rows are locked (``FOR UPDATE SKIP LOCKED``) from before the C-STORE until their outcome is
    committed, so two messages for the same job (a countdown and the reconciler's, a redelivery) never
    send one object twice at once. A runner that dies mid-send releases the lock with its
    connection; the rows stay pending and the reconciler sends the job again. SQLite has no row
    locks and ignores ``FOR UPDATE``; there a second runner may send in parallel, which the PACS
    absorbs (same SOP Instance UID).
    """
    settings = ctx.settings
    with ctx.factory() as session, session.begin():
        rows = session.execute(
            select(Export.id, ResultObject.path)
            .join(ResultObject)
            .where(_due(job_id, utcnow()), Export.destination == destination)
            .order_by(Export.id)
            .with_for_update(of=Export, skip_locked=True)
        ).all()
        if not rows:
            return False
        # a remote worker (INFERGATE_NODE_URL) takes the node's copy of each file, over WADO-RS
        paths = result_files(settings, ctx.node, session, job_id, [path for _, path in rows])
        results = send_files(
            Destination.parse(destination), paths, calling_ae=settings.ae_title, max_pdu=settings.max_pdu
        )
        now = utcnow()
        for (export_id, _), result in zip(rows, results, strict=True):
            export = session.get(Export, export_id)
            assert export is not None
            _apply(settings, export, result, now)
            if not result.ok:
                metrics.export_failure(destination, metrics.export_status(result.status, result.cause))
        sent = sum(result.ok for result in results)
        log.info(
            "job %d: export to %s: %d of %d delivered%s",
            job_id,
            destination,
            sent,
            len(results),
            "" if sent == len(results) else f" ({next(r.error for r in results if not r.ok)})",
        )
    return True


def export_job(ctx: WorkerContext, job_id: int) -> float | None:
    """Send the job's due exports; returns the delay before the next try, or None when settled.

    None is also returned when every due export is being sent by another runner right now: that
    runner settles the job and schedules the next try. Log lines name the job and (hashed) its study.
    """
    with log_context(job_id=job_id):
        return _export_job(ctx, job_id)


def _export_job(ctx: WorkerContext, job_id: int) -> float | None:
    with ctx.factory() as session:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.exporting:
            return None
        bind_study(study_uid_of(session, job.series_id))
        destinations = session.scalars(
            select(Export.destination).join(ResultObject).where(_due(job_id, utcnow())).distinct()
        ).all()
    began = time.perf_counter()
    held_elsewhere = [destination for destination in destinations if not _send_due(ctx, job_id, destination)]
    if destinations and len(held_elsewhere) == len(destinations):
        return None
    seconds = time.perf_counter() - began if destinations else 0.0
    with ctx.factory() as session, session.begin():
        return _settle(session, job_id, seconds)
