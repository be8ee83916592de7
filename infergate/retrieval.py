"""Studies pulled from a configured PACS before models run on them (``"source"`` in a job request).

The request becomes a ``retrievals`` row first (so a broker or worker restart loses nothing: the
reconciler re-sends it), then a worker task retrieves the study (C-MOVE to the node's SCP, or C-GET)
and creates the jobs with :func:`infergate.submission.submit`.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from infergate.config import Settings, Source
from infergate.errors import NotFound
from infergate.store.tables import Retrieval, RetrievalState, utcnow


def find_source(settings: Settings, name: str) -> Source:
    for source in settings.sources:
        if source.name == name:
            return source
    known = ", ".join(s.name for s in settings.sources) or "none configured"
    raise NotFound(f"Unknown source {name!r} (INFERGATE_SOURCES: {known}).")


def create(session: Session, settings: Settings, *, study_instance_uid: str, source: str, model_id: str | None) -> int:
    """Record a retrieval request; the caller commits, then sends it."""
    find_source(settings, source)
    retrieval = Retrieval(study_instance_uid=study_instance_uid, source=source, model_id=model_id)
    session.add(retrieval)
    session.flush()
    return retrieval.id


def claim(session: Session, retrieval_id: int, lease: timedelta) -> Retrieval | None:
    """Take a queued retrieval (or a running one whose worker went quiet for ``lease``)."""
    now = utcnow()
    result = session.execute(
        update(Retrieval)
        .where(
            Retrieval.id == retrieval_id,
            or_(
                Retrieval.state == RetrievalState.queued,
                and_(Retrieval.state == RetrievalState.running, Retrieval.updated_at < now - lease),
            ),
        )
        .values(state=RetrievalState.running, attempts=Retrieval.attempts + 1, updated_at=now, error=None)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return None
    return session.get(Retrieval, retrieval_id)


def finish(
    session: Session,
    retrieval_id: int,
    state: RetrievalState,
    *,
    error: str | None = None,
    instances: int | None = None,
    job_ids: list[int] | None = None,
) -> None:
    values: dict[str, object] = {"state": state, "error": error, "updated_at": utcnow()}
    if instances is not None:
        values["instances"] = instances
    if job_ids is not None:
        values["job_ids"] = ",".join(str(j) for j in job_ids)
    if state in (RetrievalState.done, RetrievalState.failed):
        values["finished_at"] = utcnow()
    session.execute(update(Retrieval).where(Retrieval.id == retrieval_id).values(**values))


def to_resend(session: Session, *, queued_before: timedelta, lease: timedelta) -> list[int]:
    """Retrievals whose message may be lost: queued too long, or running without progress."""
    now = utcnow()
    stmt = select(Retrieval.id).where(
        or_(
            and_(Retrieval.state == RetrievalState.queued, Retrieval.updated_at < now - queued_before),
            and_(Retrieval.state == RetrievalState.running, Retrieval.updated_at < now - lease),
        )
    )
    return list(session.scalars(stmt))
