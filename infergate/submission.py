"""Jobs asked for over REST: run models on a held study, retry, cancel.

Plain functions over a session (the caller commits, then enqueues the returned job ids, so that a
broker outage never loses a job: the reconciler sends what stays queued).
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from infergate.catalog import Catalog
from infergate.completion import facts_of
from infergate.errors import Conflict, InvalidInput, NotFound
from infergate.store import queries
from infergate.store.tables import Instance, Job, JobState, Series, SeriesState, Study, utcnow

#: States a job can be retried from, and states it can be cancelled from.
RETRYABLE = (JobState.failed, JobState.done, JobState.cancelled)
CANCELLABLE = (JobState.queued, JobState.running, JobState.exporting)


def submit(
    session: Session,
    catalog: Catalog,
    *,
    study_instance_uid: str,
    series_instance_uid: str | None = None,
    model_id: str | None = None,
) -> list[int]:
    """Create jobs for a study the node holds: ``model_id`` on every series, or what the rules route.

    Returns
    -------
    list[int]
        New job ids (a (series, model) pair that already has a job is left alone: use retry).

    Raises
    ------
    NotFound
        The study/series is not held, or the model is not installed.
    Conflict
        Every requested (series, model) pair already has a job, or retention removed the instances.
    """
    if model_id is not None and model_id not in catalog.packages:
        raise NotFound(f"Model {model_id!r} is not installed.")
    stmt = select(Series).join(Study).where(Study.study_instance_uid == study_instance_uid)
    stmt = stmt.where(Series.state != SeriesState.produced)
    if series_instance_uid is not None:
        stmt = stmt.where(Series.series_instance_uid == series_instance_uid)
    # Locked, so that retention (which locks a series before removing its instances) either sees
    # the new jobs or has finished, and then the series is skipped here: nothing to run on.
    series_list = [s for s in session.scalars(stmt.with_for_update(of=Series)).all() if not _emptied(session, s)]
    if not series_list:
        if session.scalar(stmt.where(Series.purged_at.is_not(None)).limit(1)) is not None:
            raise Conflict("The instances of this study or series were removed by retention; send it again first.")
        raise NotFound("The node holds no such study or series.")
    job_ids: list[int] = []
    wanted = 0
    for series in series_list:
        if model_id is not None:
            models = [model_id]
        else:
            models, _ = catalog.rules.route(facts_of(series, queries.top_findings(session, series.id)))
            models = [m for m in models if m in catalog.packages]
        wanted += len(models)
        for model in models:
            job_id = queries.create_job(session, series.id, model, catalog.packages[model].manifest.version)
            if job_id is not None:
                job_ids.append(job_id)
        if models and series.state in (SeriesState.receiving, SeriesState.unmatched):
            # asked for explicitly: the series is complete enough for the caller
            series.state, series.completed_at = SeriesState.routed, utcnow()
            series.routing_note = "submitted over REST"
    if not job_ids:
        if wanted:
            raise Conflict("Every requested series already has a job for this model; retry it instead.")
        raise InvalidInput("No routing rule matches the study's series; name a model.")
    return job_ids


def _emptied(session: Session, series: Series) -> bool:
    """Whether retention removed the series' instances (and none arrived since)."""
    if series.purged_at is None:
        return False
    return session.scalar(select(Instance.id).where(Instance.series_id == series.id).limit(1)) is None


def _job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise NotFound(f"Job {job_id} does not exist.")
    return job


def retry(session: Session, job_id: int) -> None:
    """Queue a finished, failed or cancelled job again, with a fresh attempt count."""
    job = _job(session, job_id)
    if job.state not in RETRYABLE:
        allowed = ", ".join(state.value for state in RETRYABLE)
        raise Conflict(f"Job {job_id} is {job.state.value}; only {allowed} jobs can be retried.")
    # Read after the job's lock: retention locks the job too, so it has either finished or not begun.
    if _emptied(session, job.series):
        raise Conflict(f"Job {job_id} cannot run again: retention removed its input series; send the series again.")
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(state=JobState.queued, attempts=0, error=None, queued_at=now, lease_until=None, finished_at=None)
    )


def cancel(session: Session, job_id: int) -> None:
    """Cancel a job that has not finished; a worker still running it discards its result."""
    job = _job(session, job_id)
    if job.state not in CANCELLABLE:
        raise Conflict(f"Job {job_id} is {job.state.value}; only unfinished jobs can be cancelled.")
    queries.set_job_state(session, job_id, JobState.cancelled, "cancelled over REST")
