"""Query functions over the results store.

They take a :class:`~sqlalchemy.orm.Session` and never commit: the caller owns the transaction.
Inserts that may race between processes use the dialect's ``ON CONFLICT DO NOTHING`` so that two
associations storing into the same new series never fail each other.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, inspect, literal, or_, select, true, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased, contains_eager, selectinload

from infergate.dicomweb.qido import INTEGER_VRS, Criterion, Level, has_wildcard, wildcard_to_glob, wildcard_to_like
from infergate.store.tables import (
    Base,
    Export,
    ExportState,
    Finding,
    Instance,
    Job,
    JobState,
    ResultObject,
    Series,
    SeriesState,
    Study,
    utcnow,
)


def insert_ignore(session: Session, table: type[Base], values: dict[str, Any], conflict_columns: list[str]) -> bool:
    """Insert a row unless one with the same ``conflict_columns`` exists; True if inserted."""
    dialect = session.get_bind().dialect.name
    module: Any = postgresql if dialect == "postgresql" else sqlite
    # RETURNING tells whether a row was inserted; rowcount cannot: psycopg reports -1 for an
    # INSERT ... ON CONFLICT DO NOTHING RETURNING that SQLAlchemy emits implicitly.
    stmt = (
        module.insert(table)
        .values(**values)
        .on_conflict_do_nothing(index_elements=conflict_columns)
        .returning(*inspect(table).primary_key)
    )
    return session.execute(stmt).first() is not None


def get_or_create_study(session: Session, study_instance_uid: str, **attributes: Any) -> int:
    """The study's id; a new study takes its attributes from the first instance received."""
    insert_ignore(
        session,
        Study,
        {"study_instance_uid": study_instance_uid, "created_at": utcnow(), **attributes},
        ["study_instance_uid"],
    )
    study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == study_instance_uid))
    assert study_id is not None
    return study_id


def get_or_create_series(session: Session, study_id: int, series_instance_uid: str, **attributes: Any) -> int:
    """The series' id; a new series takes its attributes from the first instance received."""
    now = utcnow()
    insert_ignore(
        session,
        Series,
        {
            "study_id": study_id,
            "series_instance_uid": series_instance_uid,
            "state": SeriesState.receiving.value,
            "num_instances": 0,
            "first_received_at": now,
            "last_received_at": now,
            **attributes,
        },
        ["series_instance_uid"],
    )
    series_id = session.scalar(select(Series.id).where(Series.series_instance_uid == series_instance_uid))
    assert series_id is not None
    return series_id


def quiet_series_ids(session: Session, cutoff: datetime) -> list[int]:
    """Series still receiving whose last instance arrived before ``cutoff``."""
    stmt = select(Series.id).where(Series.state == SeriesState.receiving, Series.last_received_at < cutoff)
    return list(session.scalars(stmt.order_by(Series.last_received_at)))


def oldest_receiving_at(session: Session) -> datetime | None:
    """When the least recently fed series still receiving got its last instance (None if none)."""
    return session.scalar(select(func.min(Series.last_received_at)).where(Series.state == SeriesState.receiving))


def claim_series(session: Session, series_id: int, cutoff: datetime, state: SeriesState, note: str) -> bool:
    """Move a quiet series out of ``receiving`` exactly once, even with several watchers."""
    result = session.execute(
        update(Series)
        .where(Series.id == series_id, Series.state == SeriesState.receiving, Series.last_received_at < cutoff)
        .values(state=state, completed_at=utcnow(), routing_note=note)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def create_job(session: Session, series_id: int, model_id: str, model_version: str | None) -> int | None:
    """Insert a queued job for (series, model); None if it already exists."""
    now = utcnow()
    inserted = insert_ignore(
        session,
        Job,
        {
            "series_id": series_id,
            "model_id": model_id,
            "model_version": model_version,
            "state": JobState.queued.value,
            "attempts": 0,
            "created_at": now,
            "queued_at": now,
            "updated_at": now,
        },
        ["series_id", "model_id"],
    )
    if not inserted:
        return None
    return session.scalar(select(Job.id).where(Job.series_id == series_id, Job.model_id == model_id))


def claim_job(session: Session, job_id: int, lease: timedelta) -> bool:
    """Take a job for running: only a queued job, or a running one whose lease expired.

    This SQL lease is what keeps two workers from running a job at once when a message is
    delivered twice (redelivery after a broker restart, or the reconciler's re-send).
    """
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            or_(Job.state == JobState.queued, and_(Job.state == JobState.running, Job.lease_until < now)),
        )
        .values(
            state=JobState.running,
            attempts=Job.attempts + 1,
            started_at=now,
            lease_until=now + lease,
            error=None,
            updated_at=now,
        )
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def renew_lease(session: Session, job_id: int, attempt: int, lease: timedelta) -> bool:
    """Extend the lease of attempt ``attempt`` of a running job; False if that attempt no longer holds it."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.running, Job.attempts == attempt)
        .values(lease_until=utcnow() + lease)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def set_job_state(
    session: Session, job_id: int, state: JobState, error: str | None = None, *, only_from: JobState | None = None
) -> bool:
    """Move a job to ``state``; with ``only_from``, only if it is still in that state (True if moved).

    Workers pass ``only_from=running`` so that a job cancelled while it ran stays cancelled.
    """
    now = utcnow()
    values: dict[str, Any] = {"state": state, "error": error, "updated_at": now}
    if state in (JobState.done, JobState.failed, JobState.cancelled):
        values["finished_at"] = now
        values["lease_until"] = None
    if state == JobState.queued:
        values["queued_at"] = now
        values["lease_until"] = None
    stmt = update(Job).where(Job.id == job_id)
    if only_from is not None:
        stmt = stmt.where(Job.state == only_from)
    result = session.execute(stmt.values(**values))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def jobs_to_resend(session: Session, queued_before: datetime, now: datetime) -> tuple[list[int], list[int]]:
    """Jobs whose message may be lost: (queued too long, running with an expired lease)."""
    stale_queued = select(Job.id).where(Job.state == JobState.queued, Job.queued_at < queued_before)
    expired = select(Job.id).where(Job.state == JobState.running, Job.lease_until < now)
    return list(session.scalars(stale_queued)), list(session.scalars(expired))


def queued_jobs(session: Session, job_ids: Collection[int]) -> list[int]:
    """Those of ``job_ids`` that are still queued."""
    if not job_ids:
        return []
    return list(session.scalars(select(Job.id).where(Job.id.in_(list(job_ids)), Job.state == JobState.queued)))


def exports_overdue(session: Session, before: datetime) -> list[int]:
    """Ids of exporting jobs with a pending export whose next attempt is long overdue."""
    stmt = (
        select(Job.id)
        .join(ResultObject, ResultObject.job_id == Job.id)
        .join(Export, Export.result_object_id == ResultObject.id)
        .where(
            Job.state == JobState.exporting,
            Export.state == ExportState.pending,
            or_(Export.next_attempt_at.is_(None), Export.next_attempt_at < before),
            Job.updated_at < before,
        )
        .distinct()
    )
    return list(session.scalars(stmt))


def job_with_results(session: Session, job_id: int) -> Job | None:
    stmt = (
        select(Job)
        .where(Job.id == job_id)
        .options(
            selectinload(Job.series).selectinload(Series.study),
            selectinload(Job.findings),
            selectinload(Job.measurements),
            selectinload(Job.result_objects).selectinload(ResultObject.exports),
        )
    )
    return session.scalar(stmt)


def list_jobs(
    session: Session,
    *,
    state: JobState | None = None,
    model_id: str | None = None,
    study_instance_uid: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> Sequence[Job]:
    stmt = select(Job).options(selectinload(Job.series).selectinload(Series.study))
    if state is not None:
        stmt = stmt.where(Job.state == state)
    if model_id is not None:
        stmt = stmt.where(Job.model_id == model_id)
    if created_after is not None:
        stmt = stmt.where(Job.created_at >= created_after)
    if created_before is not None:
        stmt = stmt.where(Job.created_at < created_before)
    if study_instance_uid is not None:
        stmt = stmt.join(Series, Series.id == Job.series_id).join(Study, Study.id == Series.study_id)
        stmt = stmt.where(Study.study_instance_uid == study_instance_uid)
    return session.scalars(stmt.order_by(Job.id.desc()).limit(limit).offset(offset)).all()


def study_with_results(session: Session, study_instance_uid: str) -> Study | None:
    stmt = (
        select(Study)
        .where(Study.study_instance_uid == study_instance_uid)
        .options(
            selectinload(Study.series).selectinload(Series.jobs).selectinload(Job.findings),
            selectinload(Study.series).selectinload(Series.jobs).selectinload(Job.measurements),
            selectinload(Study.series)
            .selectinload(Series.jobs)
            .selectinload(Job.result_objects)
            .selectinload(ResultObject.exports),
        )
    )
    return session.scalar(stmt)


def top_findings(session: Session, series_id: int) -> dict[str, str]:
    """The most probable class of every finished classification job of a series (model id -> name)."""
    rows = session.execute(
        select(Job.model_id, Finding.name, Finding.probability)
        .join(Finding, Finding.job_id == Job.id)
        .where(Job.series_id == series_id, Job.state.in_([JobState.exporting, JobState.done]))
    ).all()
    best: dict[str, tuple[float, str]] = {}
    for model_id, name, probability in rows:
        if model_id not in best or probability > best[model_id][0]:
            best[model_id] = (probability, name)
    return {model_id: name for model_id, (_, name) in best.items()}


# QIDO-RS searches (PS3.18 10.6) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyCounts:
    """What a study answer computes over its series (PS3.18 Table 10.6.3-3)."""

    modalities: tuple[str, ...]
    num_series: int
    num_instances: int


_LEVEL_TABLES: dict[Level, type[Base]] = {Level.study: Study, Level.series: Series, Level.instance: Instance}


def _string_match(dialect: str, column: Any, value: str, *, fold_case: bool) -> ColumnElement[bool]:
    """Single value or wildcard matching of one string (PS3.4 C.2.2.2.1, C.2.2.2.4).

    PN matches case-insensitively (``lower`` on both sides, so both use the database's idea of
    case); other VRs case-sensitively, which SQLite's LIKE is not, hence GLOB there.
    """
    if fold_case:
        if has_wildcard(value):
            return func.lower(column).like(func.lower(literal(wildcard_to_like(value))), escape="\\")
        return func.lower(column) == func.lower(literal(value))
    if not has_wildcard(value):
        return column == value
    if dialect == "sqlite":
        return column.op("GLOB")(wildcard_to_glob(value))
    return column.like(wildcard_to_like(value), escape="\\")


def _match(dialect: str, column: Any, criterion: Criterion) -> ColumnElement[bool]:
    if criterion.is_range:
        # Bytewise order ("C" collation on PostgreSQL) is the order of DA/TM text.
        text = column.collate("C") if dialect == "postgresql" else column
        bounds = [text >= criterion.low] if criterion.low is not None else []
        bounds += [text <= criterion.high] if criterion.high is not None else []
        return and_(true(), *bounds)
    if criterion.attribute.vr in INTEGER_VRS:
        return column.in_([int(v) for v in criterion.values])
    fold_case = criterion.attribute.vr == "PN"
    return or_(*(_string_match(dialect, column, v, fold_case=fold_case) for v in criterion.values))


def _condition(dialect: str, criterion: Criterion) -> ColumnElement[bool]:
    attribute = criterion.attribute
    if attribute.keyword == "ModalitiesInStudy":
        # A study matches when any of its series does; an alias keeps the subquery from
        # correlating with the Series of a series- or instance-level search.
        other = aliased(Series)
        return exists().where(other.study_id == Study.id, _match(dialect, other.modality, criterion))
    assert attribute.column is not None
    column: InstrumentedAttribute[Any] = getattr(_LEVEL_TABLES[attribute.level], attribute.column)
    return _match(dialect, column, criterion)


def _conditions(session: Session, criteria: Sequence[Criterion]) -> list[ColumnElement[bool]]:
    dialect = session.get_bind().dialect.name
    return [_condition(dialect, criterion) for criterion in criteria]


def _study_held() -> ColumnElement[bool]:
    """The study still has an instance: a study whose every series retention emptied is not returned.

    Its rows stay while jobs refer to them (the record of what was analysed), but QIDO-RS answers
    what can be retrieved (PS3.18 10.6), and WADO-RS answers 410 Gone for it.
    """
    held = aliased(Series)
    return exists().where(held.study_id == Study.id, held.num_instances > 0)


def search_studies(session: Session, criteria: Sequence[Criterion], *, limit: int, offset: int) -> list[Study]:
    """Studies matching every criterion, oldest row first (a stable order for paging, PS3.18 8.3.4.4.1)."""
    stmt = select(Study).where(_study_held(), *_conditions(session, criteria))
    return list(session.scalars(stmt.order_by(Study.id).limit(limit).offset(offset)))


def study_counts(session: Session, study_ids: Sequence[int]) -> dict[int, StudyCounts]:
    """Modalities and numbers of series and instances of each study, in one grouped query."""
    rows = session.execute(
        select(Series.study_id, Series.modality, func.count(Series.id), func.sum(Series.num_instances))
        .where(Series.study_id.in_(study_ids), Series.num_instances > 0)
        .group_by(Series.study_id, Series.modality)
    ).all()
    modalities: dict[int, set[str]] = {study_id: set() for study_id in study_ids}
    series: dict[int, int] = dict.fromkeys(study_ids, 0)
    instances: dict[int, int] = dict.fromkeys(study_ids, 0)
    for study_id, modality, num_series, num_instances in rows:
        if modality:
            modalities[study_id].add(modality)
        series[study_id] += num_series
        instances[study_id] += int(num_instances or 0)
    return {
        study_id: StudyCounts(tuple(sorted(modalities[study_id])), series[study_id], instances[study_id])
        for study_id in study_ids
    }


def search_series(session: Session, criteria: Sequence[Criterion], *, limit: int, offset: int) -> list[Series]:
    """Series matching every criterion (series or study keys), each with its study loaded."""
    stmt = (
        select(Series)
        .join(Study, Series.study_id == Study.id)
        .options(contains_eager(Series.study))
        .where(Series.num_instances > 0, *_conditions(session, criteria))  # emptied by retention: not held
        .order_by(Series.id)
        .limit(limit)
        .offset(offset)
    )
    return list(session.scalars(stmt))


def search_instances(session: Session, criteria: Sequence[Criterion], *, limit: int, offset: int) -> list[Instance]:
    """Instances matching every criterion (instance, series or study keys), with series and study loaded."""
    stmt = (
        select(Instance)
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .options(contains_eager(Instance.series).contains_eager(Series.study))
        .where(*_conditions(session, criteria))
        .order_by(Instance.id)
        .limit(limit)
        .offset(offset)
    )
    return list(session.scalars(stmt))
