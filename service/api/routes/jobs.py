"""Jobs: one per (series, model)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from infergate.dicom.uids import is_valid_uid
import logging
from datetime import datetime

from infergate import submission
from infergate.errors import InvalidInput, NotFound
from infergate.jobs import JobSender
from infergate.store import queries
from infergate.store.tables import Job, JobState
from service.api.deps import CatalogDep, QueueDep, SessionDep
from service.api.schemas import (
    ExportOut,
    FindingOut,
    JobDetail,
    JobList,
    JobRequest,
    JobSummary,
    MeasurementOut,
    ResultObjectOut,
)

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])
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


def detail(job: Job) -> JobDetail:
    return JobDetail(
        **summary(job).model_dump(),
        findings=[FindingOut.model_validate(f) for f in job.findings],
        measurements=[MeasurementOut.model_validate(m) for m in job.measurements],
        result_objects=[
            ResultObjectOut(
                kind=r.kind,
                sop_class_uid=r.sop_class_uid,
                sop_instance_uid=r.sop_instance_uid,
                series_instance_uid=r.series_instance_uid,
                exports=[ExportOut.model_validate(e) for e in r.exports],
            )
            for r in job.result_objects
        ],
    )


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    state: JobState | None = None,
    model_id: Annotated[str | None, Query(max_length=64)] = None,
    study_instance_uid: Annotated[str | None, Query(max_length=64)] = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobList:
    """Jobs, newest first, filtered by state, model, study and creation time (ISO 8601)."""
    if study_instance_uid is not None and not is_valid_uid(study_instance_uid):
        raise InvalidInput('Argument "study_instance_uid" is not a valid UID.')
    for name, value in (("created_after", created_after), ("created_before", created_before)):
        if value is not None and value.tzinfo is None:
            raise InvalidInput(f'Argument "{name}" needs a time zone, e.g. 2026-01-31T12:00:00Z.')
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
def get_job(job_id: int, session: SessionDep) -> JobDetail:
    """One job with its state, error, findings, measurements and result objects."""
    job = queries.job_with_results(session, job_id)
    if job is None:
        raise NotFound(f"Job {job_id} does not exist.")
    return detail(job)


@router.post("", response_model=JobList, status_code=201)
def submit_jobs(request: JobRequest, session: SessionDep, catalog: CatalogDep, queue: QueueDep) -> JobList:
    """Run a model (or what the routing rules choose) on a study, or one series of it, that the node holds."""
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
def retry_job(job_id: int, session: SessionDep, queue: QueueDep) -> JobDetail:
    """Queue a done, failed or cancelled job again (409 for a job still in progress)."""
    with session.begin():
        submission.retry(session, job_id)
    _send(queue, [job_id])
    return get_job(job_id, session)


@router.post("/{job_id}/cancel", response_model=JobDetail)
def cancel_job(job_id: int, session: SessionDep) -> JobDetail:
    """Cancel an unfinished job (409 for a finished one); a worker running it discards its result."""
    with session.begin():
        submission.cancel(session, job_id)
    return get_job(job_id, session)


def _send(queue: JobSender, job_ids: list[int]) -> None:
    """Enqueue after commit; if the broker is down the jobs stay queued and the reconciler sends them."""
    for job_id in job_ids:
        try:
            queue.send_run(job_id)
        except Exception as exc:  # noqa: BLE001 - any broker failure; SQL holds the job
            log.warning("could not enqueue job %d (%s); the reconciler will retry", job_id, type(exc).__name__)
