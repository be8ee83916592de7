"""Delivering result objects to the configured destinations, with capped exponential backoff.

One ``exports`` row per (object, destination) holds attempts, the last status and the next attempt
time, so retries survive restarts and are visible over REST. Permanent refusals (a failure status
other than out-of-resources) are not retried; transient ones (peer down, association rejected,
0xA7xx) are, up to ``export_max_attempts``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from infergate.config import Destination, Settings
from infergate.dicom.scu import StoreResult, send_files
from infergate.dicom.storage import resolve_inside
from infergate.store import queries
from infergate.store.tables import Export, ExportState, Job, JobState, ResultObject, utcnow
from workers.pipeline import WorkerContext

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


def _settle(session: Session, job_id: int) -> float | None:
    """Set the job's final state once no export is pending; else the seconds until the next attempt."""
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


def export_job(ctx: WorkerContext, job_id: int) -> float | None:
    """Send the job's due exports; returns the delay before the next try, or None when settled."""
    settings = ctx.settings
    now = utcnow()
    with ctx.factory() as session:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.exporting:
            return None
        rows = session.execute(
            select(Export.id, Export.destination, Export.next_attempt_at, ResultObject.path)
            .join(ResultObject)
            .where(ResultObject.job_id == job_id, Export.state == ExportState.pending)
        ).all()
    by_destination: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for export_id, destination, next_at, path in rows:
        if next_at is None or next_at <= now:
            by_destination[destination].append((export_id, path))
    for destination, items in by_destination.items():
        paths = [resolve_inside(settings.data_path, path) for _, path in items]
        results = send_files(
            Destination.parse(destination), paths, calling_ae=settings.ae_title, max_pdu=settings.max_pdu
        )
        with ctx.factory() as session, session.begin():
            for (export_id, _), result in zip(items, results, strict=True):
                export = session.get(Export, export_id)
                assert export is not None
                _apply(settings, export, result, utcnow())
                log.info(
                    "job %d: export to %s %s",
                    job_id,
                    destination,
                    "done" if result.ok else f"not done ({result.error})",
                )
    with ctx.factory() as session, session.begin():
        return _settle(session, job_id)
