"""Jobs: one per (series, model)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from infergate import retrieval, submission
from infergate.errors import NotFound
from infergate.jobs import JobSender
from infergate.logs import bind_job, bind_study
from infergate.store import queries
from infergate.store.tables import Job, JobPreview, JobState, Retrieval
from service.api.deps import CatalogDep, QueueDep, SessionDep, SettingsDep
from service.api.schemas import (
    ERROR_RESPONSES,
    UID_PATTERN,
    ExportOut,
    FindingOut,
    JobDetail,
    JobList,
    JobRequest,
    JobSummary,
    MeasurementOut,
    ResultObjectOut,
    RetrievalOut,
    RowId,
)
from service.api.urls import public_url

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)
log = logging.getLogger(__name__)


def summary(job: Job) -> JobSummary:
    return JobSummary(
        id=job.id,
        model_id=job.model_id,
        model_version=job.model_version,
        state=job.state,
        attempts=job.attempts,
        error=job.error,
        study_instance_uid=job.series.study.study_instance_uid,
        series_instance_uid=job.series.series_instance_uid,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def with_previews(session: Session, job_ids: Iterable[int]) -> set[int]:
    """Which of ``job_ids`` have a rendered preview (one query, not one per job)."""
    ids = list(job_ids)
    if not ids:
        return set()
    return set(session.scalars(select(JobPreview.job_id).where(JobPreview.job_id.in_(ids))))


def detail(request: Request, job: Job, previews: set[int]) -> JobDetail:
    study = job.series.study.study_instance_uid
    objects = []
    for r in job.result_objects:
        uids = {"study": study, "series": r.series_instance_uid, "instance": r.sop_instance_uid}
        objects.append(
            ResultObjectOut(
                kind=r.kind,
                sop_class_uid=r.sop_class_uid,
                sop_instance_uid=r.sop_instance_uid,
                series_instance_uid=r.series_instance_uid,
                study_instance_uid=study,
                retrieve_url=public_url(request, "retrieve_instance", **uids),
                metadata_url=public_url(request, "retrieve_instance_metadata", **uids),
                purged_at=r.purged_at,
                exports=[ExportOut.model_validate(e) for e in r.exports],
            )
        )
    return JobDetail(
        **summary(job).model_dump(),
        findings=[FindingOut.model_validate(f) for f in job.findings],
        measurements=[MeasurementOut.model_validate(m) for m in job.measurements],
        result_objects=objects,
        preview_url=public_url(request, "get_job_preview", job_id=str(job.id)) if job.id in previews else None,
        timings=job.timings,
        input_purged_at=job.series.purged_at if not job.series.num_instances else None,
    )


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    state: JobState | None = None,
    model_id: Annotated[str | None, Query(max_length=64)] = None,
    study_instance_uid: Annotated[str | None, Query(max_length=64, pattern=UID_PATTERN)] = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> JobList:
    """Jobs, newest first, filtered by state, model, study and creation time (ISO 8601; UTC if no zone)."""
    created_after, created_before = _utc(created_after), _utc(created_before)
    jobs = queries.list_jobs(
        session,
        state=state,
        model_id=model_id,
        study_instance_uid=study_instance_uid,
        created_after=created_after,
        created_before=created_before,
        limit=limit,
        offset=offset,
    )
    return JobList(items=[summary(job) for job in jobs], limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobDetail)
def get_job(job_id: RowId, request: Request, session: SessionDep) -> JobDetail:
    """One job with its state, error, findings, measurements and result objects."""
    bind_job(job_id)  # this request's log lines name the job, and its study hashed (infergate.logs)
    job = queries.job_with_results(session, job_id)
    if job is None:
        raise NotFound(f"Job {job_id} does not exist.")
    bind_study(job.series.study.study_instance_uid)
    return detail(request, job, with_previews(session, [job.id]))


@router.post(
    "",
    response_model=JobList | RetrievalOut,
    status_code=201,
    responses={202: {"model": RetrievalOut, "description": "The study is being pulled from the source"}},
)
def submit_jobs(
    request: JobRequest,
    response: Response,
    session: SessionDep,
    catalog: CatalogDep,
    queue: QueueDep,
    settings: SettingsDep,
) -> JobList | RetrievalOut:
    """Run a model (or what the routing rules choose) on a study the node holds, or first pull it from a source."""
    if request.source is not None:
        if request.model_id is not None and request.model_id not in catalog.packages:
            raise NotFound(f"Model {request.model_id!r} is not installed.")
        with session.begin():
            retrieval_id = retrieval.create(
                session,
                settings,
                study_instance_uid=request.study_instance_uid,
                source=request.source,
                model_id=request.model_id,
            )
        try:
            queue.send_retrieve(retrieval_id)
        except Exception as exc:  # noqa: BLE001 - the reconciler re-sends what stays queued
            log.warning("could not enqueue retrieval %d (%s)", retrieval_id, type(exc).__name__)
        response.status_code = 202
        return RetrievalOut.model_validate(session.get(Retrieval, retrieval_id))
    with session.begin():
        job_ids = submission.submit(
            session,
            catalog,
            study_instance_uid=request.study_instance_uid,
            series_instance_uid=request.series_instance_uid,
            model_id=request.model_id,
        )
    _send(queue, job_ids)
    jobs = [queries.job_with_results(session, job_id) for job_id in job_ids]
    return JobList(items=[summary(job) for job in jobs if job is not None], limit=len(job_ids), offset=0)


@router.post("/{job_id}/retry", response_model=JobDetail)
def retry_job(job_id: RowId, request: Request, session: SessionDep, queue: QueueDep) -> JobDetail:
    """Queue a done, failed or cancelled job again (409 for a job still in progress)."""
    bind_job(job_id)
    with session.begin():
        submission.retry(session, job_id)
    _send(queue, [job_id])
    return get_job(job_id, request, session)


@router.post("/{job_id}/cancel", response_model=JobDetail)
def cancel_job(job_id: RowId, request: Request, session: SessionDep) -> JobDetail:
    """Cancel an unfinished job (409 for a finished one); a worker running it discards its result."""
    bind_job(job_id)
    with session.begin():
        submission.cancel(session, job_id)
    return get_job(job_id, request, session)


def _utc(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def _send(queue: JobSender, job_ids: list[int]) -> None:
    """Enqueue after commit; if the broker is down the jobs stay queued and the reconciler sends them."""
    for job_id in job_ids:
        try:
            queue.send_run(job_id)
        except Exception as exc:  # noqa: BLE001 - any broker failure; SQL holds the job
            log.warning("could not enqueue job %d (%s); the reconciler will retry", job_id, type(exc).__name__)
