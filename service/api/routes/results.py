"""Results of a study: every series, its routing outcome and its jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request

from infergate.errors import NotFound
from infergate.store import queries
from infergate.store.tables import SeriesState
from service.api.deps import SessionDep
from service.api.routes.jobs import detail, with_previews
from service.api.schemas import ERROR_RESPONSES, UID_PATTERN, SeriesResults, StudyResults

router = APIRouter(prefix="/api/v1/studies", tags=["results"], responses=ERROR_RESPONSES)


@router.get("/{study_instance_uid}/results", response_model=StudyResults)
def get_study_results(
    study_instance_uid: Annotated[str, Path(max_length=64, pattern=UID_PATTERN)],
    request: Request,
    session: SessionDep,
) -> StudyResults:
    """Jobs, findings, measurements and SEG/SR UIDs of every series of a study."""
    study = queries.study_with_results(session, study_instance_uid)
    if study is None:
        raise NotFound("The node holds no study with this Study Instance UID.")
    for series in study.series:
        for job in series.jobs:
            job.series = series  # already loaded; avoids a lazy load per job
            series.study = study
    previews = with_previews(session, (job.id for series in study.series for job in series.jobs))
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
                purged_at=series.purged_at if not series.num_instances else None,
                jobs=[detail(request, job, previews) for job in sorted(series.jobs, key=lambda j: j.id)],
            )
            for series in sorted(study.series, key=lambda s: s.id)
            if series.state != SeriesState.produced  # the node's own SEG/SR appear under their jobs
        ],
    )
