"""Exports: sending a finished job's result objects to the PACS again (re-drive)."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request

from infergate import redrive
from infergate.logs import bind_job
from service.api.deps import QueueDep, SessionDep, SettingsDep
from service.api.routes.jobs import get_job
from service.api.schemas import ERROR_RESPONSES, JobDetail, RowId

router = APIRouter(prefix="/api/v1/jobs", tags=["exports"], responses=ERROR_RESPONSES)
log = logging.getLogger(__name__)


@router.post("/{job_id}/export", response_model=JobDetail)
def redrive_exports(
    job_id: RowId,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
    destination: Annotated[
        str | None,
        Query(
            max_length=128,
            description="Only this configured destination (AE@host:port); default every configured destination.",
        ),
    ] = None,
) -> JobDetail:
    """Send a job's result objects to the PACS again: a done job, or one whose export failed (else 409).

    Its exports start again with a fresh attempt count and the job goes back to ``exporting``; use it
    once the cause of a permanent refusal (e.g. 0xA900, an unknown AE title) is fixed.
    """
    bind_job(job_id)
    with session.begin():
        redrive.redrive(session, settings, job_id, destination=destination)
    try:
        queue.send_export(job_id)
    except Exception as exc:  # noqa: BLE001 - any broker failure; the reconciler sends overdue exports
        log.warning("could not enqueue the export of job %d (%s); the reconciler will", job_id, type(exc).__name__)
    return get_job(job_id, request, session)
