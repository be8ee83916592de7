"""Jobs: one per (series, model)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from infergate.dicom.uids import is_valid_uid
from infergate.errors import InvalidInput, NotFound
from infergate.store import queries
from infergate.store.tables import Job, JobState
from service.api.deps import SessionDep
from service.api.schemas import (
    ExportOut,
    FindingOut,
    JobDetail,
    JobList,
    JobSummary,
    MeasurementOut,
    ResultObjectOut,
)

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])


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
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobList:
    """Jobs, newest first, filtered by state, model and study."""
    if study_instance_uid is not None and not is_valid_uid(study_instance_uid):
        raise InvalidInput('Argument "study_instance_uid" is not a valid UID.')
    jobs = queries.list_jobs(
        session, state=state, model_id=model_id, study_instance_uid=study_instance_uid, limit=limit, offset=offset
    )
    return JobList(items=[summary(job) for job in jobs], limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobDetail)
def get_job(job_id: int, session: SessionDep) -> JobDetail:
    """One job with its state, error, findings, measurements and result objects."""
    job = queries.job_with_results(session, job_id)
    if job is None:
        raise NotFound(f"Job {job_id} does not exist.")
    return detail(job)
