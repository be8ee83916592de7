"""Results of a study: every series, its routing outcome and its jobs."""

from __future__ import annotations

from fastapi import APIRouter

from infergate.dicom.uids import is_valid_uid
from infergate.errors import InvalidInput, NotFound
from infergate.store import queries
from service.api.deps import SessionDep
from service.api.routes.jobs import detail
from service.api.schemas import SeriesResults, StudyResults

router = APIRouter(prefix="/api/v1/studies", tags=["results"])


@router.get("/{study_instance_uid}/results", response_model=StudyResults)
def get_study_results(study_instance_uid: str, session: SessionDep) -> StudyResults:
    """Jobs, findings, measurements and SEG/SR UIDs of every series of a study."""
    if not is_valid_uid(study_instance_uid):
        raise InvalidInput('Argument "study_instance_uid" is not a valid UID.')
    study = queries.study_with_results(session, study_instance_uid)
    if study is None:
        raise NotFound("The node holds no study with this Study Instance UID.")
    for series in study.series:
        for job in series.jobs:
            job.series = series  # already loaded; avoids a lazy load per job
            series.study = study
    return StudyResults(
        study_instance_uid=study.study_instance_uid,
        series=[
            SeriesResults(
                series_instance_uid=series.series_instance_uid,
                modality=series.modality,
                series_description=series.series_description,
                state=series.state.value,
                routing_note=series.routing_note,
                num_instances=series.num_instances,
                jobs=[detail(job) for job in sorted(series.jobs, key=lambda j: j.id)],
            )
            for series in sorted(study.series, key=lambda s: s.id)
        ],
    )
