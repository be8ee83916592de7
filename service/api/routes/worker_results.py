"""Results handed back by workers on other machines: ``PUT /api/v1/jobs/{job_id}/results/{kind}/{uid}``.

Only callers with the ``worker`` scope (or ``admin``) get here (``WORKERS_ONLY`` in ``app.py``); the
checks themselves are in :mod:`infergate.result_upload`. Answers: 204 stored; 400 a bad kind or UID,
or a body that is not this job's SEG/SR; 404 no such job; 409 the job is not running under that attempt;
413 a body over ``INFERGATE_DICOMWEB_MAX_UPLOAD_BYTES``; 415 a body that is not ``application/dicom``;
503 the node's data folder is full.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from infergate.config import Settings
from infergate.dicom.storage import OutOfSpace
from infergate.dicomweb.multipart import parse_media_type
from infergate.errors import InvalidInput
from infergate.logs import bind_job
from infergate.result_upload import store_result
from service.api.deps import SettingsDep
from service.api.routes.dicomweb_stow import FactoryDep
from service.api.schemas import ERROR_RESPONSES, UID_PATTERN, ErrorOut, RowId

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/jobs", tags=["workers"], responses=ERROR_RESPONSES)

# Documented, not enforced by FastAPI, so that a bad value gets a 400 naming it (as in the DICOMweb routes).
ResultKind = Annotated[str, Path(description="SEG or SR", json_schema_extra={"enum": ["SEG", "SR"]})]
ResultUID = Annotated[
    str,
    Path(description="SOP Instance UID of the result", json_schema_extra={"pattern": UID_PATTERN, "maxLength": 64}),
]
_RESPONSES: dict[int | str, dict[str, Any]] = {
    204: {"description": "Stored where the job's result row points."},
    413: {"model": ErrorOut, "description": "Body larger than dicomweb_max_upload_bytes."},
    415: {"model": ErrorOut, "description": "The body is not application/dicom."},
    503: {"model": ErrorOut, "description": "The node's data folder is full; nothing was replaced."},
}
_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "description": "The SEG or SR as one DICOM Part 10 file.",
        "content": {"application/dicom": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _store(
    factory: sessionmaker[Session],
    settings: Settings,
    job_id: int,
    kind: str,
    uid: str,
    body: bytes,
    version: str,
    attempt: int,
) -> None:
    with factory() as session:
        try:
            store_result(session, settings.data_path, job_id, kind, uid, body, model_version=version, attempt=attempt)
        except OutOfSpace as exc:
            log.error("job %d: result refused, the data folder is full", job_id)
            raise HTTPException(503, "Storage full; nothing was replaced.") from exc


@router.put(
    "/{job_id}/results/{kind}/{sop_instance_uid}",
    status_code=204,
    response_class=Response,
    responses=_RESPONSES,
    openapi_extra=_REQUEST_BODY,
)
async def store_job_result(
    job_id: RowId,
    kind: ResultKind,
    sop_instance_uid: ResultUID,
    request: Request,
    settings: SettingsDep,
    factory: FactoryDep,
    model_version: Annotated[str, Query(min_length=1, max_length=16, description="Model version the worker ran.")],
    attempt: Annotated[int, Query(ge=1, le=1_000_000, description="The job attempt the worker runs.")],
) -> Response:
    """Store a SEG or SR that a worker without the node's data folder made for a running job.

    The file lands where the job's result row will point, so that WADO-RS and the exports find it;
    unlike STOW-RS, it is not routed to models as a new input.
    """
    bind_job(job_id)
    content_type = request.headers.get("content-type") or ""
    try:
        essence = parse_media_type(content_type).essence if content_type else ""
    except InvalidInput:
        essence = ""
    if essence != "application/dicom":
        raise HTTPException(415, "Content-Type should be application/dicom: send the result as a Part 10 file.")
    body = await request.body()
    await run_in_threadpool(_store, factory, settings, job_id, kind, sop_instance_uid, body, model_version, attempt)
    return Response(status_code=204)
