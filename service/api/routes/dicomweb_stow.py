"""STOW-RS, the Studies Store transaction (PS3.18 10.5): ``POST /dicomweb/studies[/{study}]``.

The body is streamed to a temporary file in the data folder (never held in memory whole), checked
against ``dicomweb_max_upload_bytes`` while it arrives, split, and stored part by part in a worker
thread through the SCP's own ingest path. HTTP status codes (PS3.18 10.5.3 Table 10.5.3-1 and 8.5):

* 200 every instance stored (or already held); 202 some stored, some failed; 409 none stored. The
  body is the Store Instances Response Module in DICOM JSON either way.
* 400 a malformed body (no boundary, truncated, no parts) or malformed study UID.
* 406 the Accept header excludes ``application/dicom+json`` (the only response format).
* 413 the body exceeds ``dicomweb_max_upload_bytes`` or has more than ``dicomweb_max_instances`` parts.
* 415 the Content-Type is not ``multipart/related; type="application/dicom"``.
* 503 the data folder is full while the upload is spooled (nothing stored; try again later).
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import tempfile
from pathlib import Path
from typing import IO, Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from infergate import metrics
from infergate.config import Settings
from infergate.dicomweb.instances import check_uids
from infergate.dicomweb.multipart import MediaType, TooManyParts, parse_media_type
from infergate.dicomweb.negotiation import NotAcceptable, parse_accept, select_json
from infergate.dicomweb.stow import StoreOutcome, StorePolicy, store_multipart, store_response
from infergate.errors import InvalidInput
from service.api.deps import SettingsDep
from service.api.routes.dicomweb_wado import StudyUID
from service.api.schemas import ErrorOut
from service.api.urls import public_url
from service.scp.ae import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

#: The same SOP Classes and Transfer Syntaxes as the SCP: whatever enters the node, by either door,
#: is something the workers were built to read.
POLICY = StorePolicy(frozenset(STORAGE_SOP_CLASSES), frozenset(TRANSFER_SYNTAXES))
DICOM_JSON = "application/dicom+json"
_WRITE_BATCH = 4 * 1024 * 1024

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Every instance stored.", "content": {DICOM_JSON: {}}},
    202: {"description": "Some instances stored; FailedSOPSequence names the others.", "content": {DICOM_JSON: {}}},
    400: {"model": ErrorOut, "description": "Malformed multipart body or study UID."},
    406: {"model": ErrorOut, "description": "The Accept header excludes application/dicom+json."},
    409: {"description": "No instance stored; FailedSOPSequence gives each reason.", "content": {DICOM_JSON: {}}},
    413: {
        "model": ErrorOut,
        "description": "Body larger than dicomweb_max_upload_bytes, or more parts than dicomweb_max_instances.",
    },
    415: {"model": ErrorOut, "description": 'Content-Type is not multipart/related; type="application/dicom".'},
    503: {"model": ErrorOut, "description": "Storage full while receiving the body; nothing was stored."},
}
_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "description": 'One DICOM Part 10 file per part: multipart/related; type="application/dicom"; boundary=…',
        "content": {"multipart/related": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def get_session_factory(request: Request) -> sessionmaker[Session]:
    """The app's session factory: ingest opens its own short transactions, as the SCP does."""
    factory: sessionmaker[Session] = request.app.state.session_factory
    return factory


FactoryDep = Annotated[sessionmaker[Session], Depends(get_session_factory)]


def _check_content_type(content_type: str | None) -> str:
    """The boundary of an acceptable request, or the 400/415 that says why it is not."""
    if not content_type:
        raise HTTPException(415, 'Content-Type should be multipart/related; type="application/dicom".')
    try:
        media: MediaType = parse_media_type(content_type)
    except InvalidInput as exc:
        raise HTTPException(400, str(exc)) from exc
    if media.essence != "multipart/related" or (media.param("type") or "").lower() != "application/dicom":
        raise HTTPException(
            415,
            f'Content-Type should be multipart/related; type="application/dicom", not "{content_type[:120]}"; '
            "the node stores DICOM Part 10 files only.",
        )
    boundary = media.param("boundary")
    if not boundary:
        raise HTTPException(400, "The multipart/related Content-Type has no boundary parameter.")
    return boundary


async def _spool(request: Request, limit: int, folder: Path) -> IO[bytes]:
    """Copy the body into an anonymous file in ``folder``, refusing it once it passes ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, "Content-Length is not a number.")
        if int(declared) > limit:
            raise HTTPException(413, f"The request body exceeds {limit} bytes; send fewer instances per request.")
    await run_in_threadpool(folder.mkdir, parents=True, exist_ok=True)
    spool = tempfile.TemporaryFile(dir=folder)
    try:
        size, pending = 0, bytearray()
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"The request body exceeds {limit} bytes; send fewer instances per request.")
            pending += chunk
            if len(pending) >= _WRITE_BATCH:
                await run_in_threadpool(spool.write, bytes(pending))
                pending.clear()
        await run_in_threadpool(spool.write, bytes(pending))
        await run_in_threadpool(spool.flush)
    except OSError as exc:
        spool.close()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.error("STOW-RS refused: the data folder is full")
            raise HTTPException(503, "Storage full; nothing was stored.") from exc
        raise
    except BaseException:
        spool.close()
        raise
    return spool


def _store(
    spool: IO[bytes], boundary: str, settings: Settings, factory: sessionmaker[Session], study: str | None
) -> list[StoreOutcome]:
    """Blocking part of the transaction (a worker thread): split the spooled body and store each part."""
    with spool:
        if spool.seek(0, 2) == 0:
            raise InvalidInput("The request body is empty.")
        with mmap.mmap(spool.fileno(), 0, access=mmap.ACCESS_READ) as body:
            return store_multipart(
                factory,
                settings.data_path,
                body,
                boundary,
                policy=POLICY,
                study_instance_uid=study,
                max_parts=settings.dicomweb_max_instances,
            )


def stored_by_study(stored: list[StoreOutcome]) -> dict[str, dict[str, int]]:
    """{Study Instance UID: {SOP Class UID: count}} of what a request stored, for the audit trail."""
    studies: dict[str, dict[str, int]] = {}
    for outcome in stored:
        classes = studies.setdefault(outcome.study_instance_uid, {})
        classes[outcome.sop_class_uid] = classes.get(outcome.sop_class_uid, 0) + 1
    return studies


async def _store_instances(
    request: Request, settings: Settings, factory: sessionmaker[Session], accept: str | None, study: str | None
) -> Response:
    if study is not None:
        check_uids(study_instance_uid=study)
    try:
        select_json(parse_accept(accept))
    except NotAcceptable as exc:
        raise HTTPException(406, str(exc)) from exc
    boundary = _check_content_type(request.headers.get("content-type"))
    spool = await _spool(request, settings.dicomweb_max_upload_bytes, settings.data_path / "tmp")
    try:
        outcomes = await run_in_threadpool(_store, spool, boundary, settings, factory, study)
    except TooManyParts as exc:
        raise HTTPException(413, str(exc)) from exc

    stored = [o for o in outcomes if o.stored]
    for outcome in stored:
        metrics.instance_received(metrics.STOW_RS, outcome.sop_class_uid)
    request.state.audit_studies = stored_by_study(stored)
    studies = {o.study_instance_uid for o in stored} | ({study} if study else set())
    retrieve_url = public_url(request, "retrieve_study", study=studies.pop()) if len(studies) == 1 else ""
    response = store_response(
        outcomes,
        retrieve_url=retrieve_url,
        instance_url=lambda o: public_url(
            request,
            "retrieve_instance",
            study=o.study_instance_uid,
            series=o.series_instance_uid,
            instance=o.sop_instance_uid,
        ),
    )
    status = 200 if len(stored) == len(outcomes) else 409 if not stored else 202
    log.info("STOW-RS: %d of %d instance(s) stored", len(stored), len(outcomes))
    return Response(json.dumps(response.to_json_dict()), status_code=status, media_type=DICOM_JSON)


@router.post("/studies", responses=_RESPONSES, openapi_extra=_REQUEST_BODY, response_class=Response)
async def store_instances(
    request: Request,
    settings: SettingsDep,
    factory: FactoryDep,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    """Store DICOM Part 10 instances of any studies (PS3.18 10.5).

    Each instance is fsync'd and committed before the response, then enters the same
    completion and routing path as one received by C-STORE.
    """
    return await _store_instances(request, settings, factory, accept, None)


@router.post("/studies/{study}", responses=_RESPONSES, openapi_extra=_REQUEST_BODY, response_class=Response)
async def store_instances_in_study(
    study: StudyUID,
    request: Request,
    settings: SettingsDep,
    factory: FactoryDep,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    """Store DICOM Part 10 instances of one study; an instance of another study fails with 0xA900."""
    return await _store_instances(request, settings, factory, accept, study)
