"""Job previews: a PNG of the key slice with the segmentation overlay or the findings.

Workers render the preview when a job finishes and store it in the database (see
``workers/preview.py``); this route only hands the stored bytes back. The image holds no patient data,
but it is still a picture of a patient's anatomy, so it is not cached by browsers or proxies.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy import func, select

from infergate.errors import Gone, NotFound
from infergate.store.tables import Job, JobPreview, JobState, ResultObject
from service.api.deps import SessionDep
from service.api.schemas import ERROR_RESPONSES, ErrorOut, RowId

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)

#: States in which a job has run its model; before that there is nothing to preview.
_FINISHED = (JobState.exporting, JobState.done)


def missing_preview_reason(job_id: int, state: JobState | None) -> str:
    """Why job ``job_id`` in ``state`` (None: no such job) has no preview, for the 404 message."""
    if state is None:
        return f"Job {job_id} does not exist."
    if state not in _FINISHED:
        return f"Job {job_id} has no preview: it is {state.value}, and a preview is rendered when a job finishes."
    return (
        f"Job {job_id} has no preview: its model reads no image (header-only models), "
        "or no preview could be rendered for its series."
    )


@router.get(
    "/{job_id}/preview.png",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "The key slice with the result drawn on it"},
        410: {"model": ErrorOut, "description": "Removed by retention (INFERGATE_RETAIN_RESULTS_DAYS)"},
    },
)
def get_job_preview(job_id: RowId, session: SessionDep) -> Response:
    """A PNG of the job's key slice with its segmentation overlay and legend, or its findings.

    It shows only pixels, label names, finding probabilities and "slice k/N": no patient data.
    """
    preview = session.get(JobPreview, job_id)
    if preview is None:
        purged = session.scalar(select(func.max(ResultObject.purged_at)).where(ResultObject.job_id == job_id))
        if purged is not None:
            raise Gone(f"Job {job_id}'s preview and result objects were removed by retention on {purged:%Y-%m-%d}.")
        state = session.scalar(select(Job.state).where(Job.id == job_id))
        raise NotFound(missing_preview_reason(job_id, state))
    return Response(content=preview.png, media_type="image/png", headers={"Cache-Control": "no-store"})
