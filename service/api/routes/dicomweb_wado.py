"""WADO-RS, the Studies Retrieve transaction (PS3.18 10.4): instances, metadata, frames, bulk data.

Instances are found through the SQL index (received ones and the node's own SEG/SR alike) and read
from the data folder. Responses are negotiated from the Accept header (PS3.18 8.7):

* instances: ``multipart/related; type="application/dicom"`` with an optional ``transfer-syntax``
  (``*`` = as stored; none = Explicit VR Little Endian, PS3.18 8.7.3.4), streamed one instance at a time;
* metadata: ``application/dicom+json``, bulk values replaced by ``BulkDataURI`` s into ``…/bulkdata/…``;
* frames and bulk data: ``multipart/related; type="application/octet-stream"`` (decoded, Explicit VR
  Little Endian) or the stored compressed frames (``image/jls``, ``transfer-syntax=*``, ``*/*``…).

Status codes (PS3.18 10.4.3 and 8.5): 200; 400 for a malformed UID, frame list or bulkdata path;
404 when the node holds nothing under the UIDs (or the frame does not exist); 406 when nothing the
Accept header allows can be produced; 410 when the node held them and retention removed them
(:mod:`infergate.retention`), so that a viewer can tell "never here" from "no longer here".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Path, Request
from fastapi.responses import Response, StreamingResponse
from pydicom import dcmread

from infergate.dicomweb.frames import parse_frame_list, pixel_data_parts, read_frames
from infergate.dicomweb.instances import StoredInstance, find_instances
from infergate.dicomweb.metadata import PIXEL_DATA_TAG, bulkdata_value, instance_metadata, parse_bulkdata_path
from infergate.dicomweb.multipart import build_multipart, iter_multipart, multipart_content_type, new_boundary
from infergate.dicomweb.negotiation import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    NotAcceptable,
    parse_accept,
    select_frame_encoding,
    select_instance_syntax,
    select_json,
)
from infergate.dicomweb.transcode import encode_instance
from infergate.errors import NotFound
from service.api.deps import SessionDep, SettingsDep
from service.api.schemas import UID_PATTERN, ErrorOut
from service.api.urls import public_url

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

AcceptHeader = Annotated[str | None, Header(description="Media types per PS3.18 8.7, e.g. multipart/related.")]
# Patterns are documented, not enforced by FastAPI, so that a malformed value gets a 400 naming it
# (infergate.dicomweb checks them), as everywhere else in the API.
_UID = {"json_schema_extra": {"pattern": UID_PATTERN, "maxLength": 64}}
StudyUID = Annotated[str, Path(description="Study Instance UID", **_UID)]
SeriesUID = Annotated[str, Path(description="Series Instance UID", **_UID)]
InstanceUID = Annotated[str, Path(description="SOP Instance UID", **_UID)]
FrameList = Annotated[
    str,
    Path(
        description="1-based frame numbers separated by commas",
        json_schema_extra={"pattern": r"^[1-9][0-9]{0,8}(,[1-9][0-9]{0,8})*$"},
    ),
]
TagPath = Annotated[
    str,
    Path(
        description="Tags (8 hex digits) and item indices from a BulkDataURI, e.g. 7FE00010",
        json_schema_extra={"pattern": r"^[0-9A-Fa-f]{8}(/(0|[1-9][0-9]{0,5})/[0-9A-Fa-f]{8}){0,8}$"},
    ),
]
_INSTANCE_PATH = "/studies/{study}/series/{series}/instances/{instance}"
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "A malformed UID, frame list or bulkdata path."},
    404: {"model": ErrorOut, "description": "The node holds nothing under these UIDs."},
    406: {"model": ErrorOut, "description": "Nothing the Accept header allows can be produced."},
    410: {"model": ErrorOut, "description": "The node held these instances; its retention policy removed them."},
}
_MULTIPART_DICOM = {200: {"content": {'multipart/related; type="application/dicom"': {}}}, **_ERRORS}
_MULTIPART_OCTETS = {200: {"content": {'multipart/related; type="application/octet-stream"': {}}}, **_ERRORS}
_DICOM_JSON = {200: {"content": {"application/dicom+json": {}}}, **_ERRORS}


@contextmanager
def _negotiated() -> Iterator[None]:
    """Turn :class:`NotAcceptable` into HTTP 406 with the node's offer in the detail."""
    try:
        yield
    except NotAcceptable as exc:
        raise HTTPException(406, str(exc)) from exc


def _held(instances: list[StoredInstance]) -> list[StoredInstance]:
    """Refuse before streaming starts if an indexed file is gone, rather than break the stream."""
    for instance in instances:
        if not instance.path.is_file():
            log.error("an indexed instance file is missing from the data folder")
            raise NotFound("The node indexes this instance but its file is missing.")
    return instances


def _instances_response(instances: Sequence[StoredInstance], accept: str | None) -> StreamingResponse:
    with _negotiated():
        ranges = parse_accept(accept)
        chosen = [(i, select_instance_syntax(ranges, i.transfer_syntax_uid)) for i in _held(list(instances))]
    boundary = new_boundary()

    def parts() -> Iterator[tuple[str, bytes]]:
        for instance, syntax in chosen:
            content = encode_instance(instance.path, instance.transfer_syntax_uid, syntax)
            yield f"application/dicom; transfer-syntax={syntax}", content

    return StreamingResponse(
        iter_multipart(parts(), boundary), media_type=multipart_content_type("application/dicom", boundary)
    )


def _instance_url(request: Request, instance: StoredInstance) -> str:
    return public_url(
        request,
        "retrieve_instance",
        study=instance.study_instance_uid,
        series=instance.series_instance_uid,
        instance=instance.sop_instance_uid,
    )


def _metadata_response(request: Request, instances: Sequence[StoredInstance], accept: str | None) -> Response:
    """A JSON array with one DICOM JSON object per instance (PS3.18 10.4.1.1.2), streamed."""
    with _negotiated():
        media_type = select_json(parse_accept(accept))
    held = _held(list(instances))

    def body() -> Iterator[bytes]:
        yield b"["
        for index, instance in enumerate(held):
            metadata = instance_metadata(
                instance.path,
                bulkdata_url=_instance_url(request, instance) + "/bulkdata",
                transfer_syntax_uid=instance.transfer_syntax_uid,
            )
            yield (b"," if index else b"") + json.dumps(metadata).encode()
        yield b"]"

    return StreamingResponse(body(), media_type=media_type)


@router.get("/studies/{study}", responses=_MULTIPART_DICOM, response_class=StreamingResponse)
def retrieve_study(
    study: StudyUID, session: SessionDep, settings: SettingsDep, accept: AcceptHeader = None
) -> Response:
    """Every instance of a study, one Part 10 file per part."""
    return _instances_response(find_instances(session, settings.data_path, study), accept)


@router.get("/studies/{study}/series/{series}", responses=_MULTIPART_DICOM, response_class=StreamingResponse)
def retrieve_series(
    study: StudyUID, series: SeriesUID, session: SessionDep, settings: SettingsDep, accept: AcceptHeader = None
) -> Response:
    """Every instance of a series, one Part 10 file per part."""
    return _instances_response(find_instances(session, settings.data_path, study, series), accept)


@router.get(_INSTANCE_PATH, responses=_MULTIPART_DICOM, response_class=StreamingResponse)
def retrieve_instance(
    study: StudyUID,
    series: SeriesUID,
    instance: InstanceUID,
    session: SessionDep,
    settings: SettingsDep,
    accept: AcceptHeader = None,
) -> Response:
    """One instance as a single-part multipart/related body (PS3.18 10.4.1.1.1)."""
    return _instances_response(find_instances(session, settings.data_path, study, series, instance), accept)


@router.get("/studies/{study}/metadata", responses=_DICOM_JSON, response_class=StreamingResponse)
def retrieve_study_metadata(
    study: StudyUID, request: Request, session: SessionDep, settings: SettingsDep, accept: AcceptHeader = None
) -> Response:
    """DICOM JSON of every instance of a study, bulk data as BulkDataURIs."""
    return _metadata_response(request, find_instances(session, settings.data_path, study), accept)


@router.get("/studies/{study}/series/{series}/metadata", responses=_DICOM_JSON, response_class=StreamingResponse)
def retrieve_series_metadata(
    study: StudyUID,
    series: SeriesUID,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    accept: AcceptHeader = None,
) -> Response:
    """DICOM JSON of every instance of a series, bulk data as BulkDataURIs."""
    return _metadata_response(request, find_instances(session, settings.data_path, study, series), accept)


@router.get(_INSTANCE_PATH + "/metadata", responses=_DICOM_JSON, response_class=StreamingResponse)
def retrieve_instance_metadata(
    study: StudyUID,
    series: SeriesUID,
    instance: InstanceUID,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    accept: AcceptHeader = None,
) -> Response:
    """DICOM JSON of one instance (an array of one object), bulk data as BulkDataURIs."""
    found = find_instances(session, settings.data_path, study, series, instance)
    return _metadata_response(request, found, accept)


@router.get(_INSTANCE_PATH + "/frames/{frame_list}", responses=_MULTIPART_OCTETS, response_class=Response)
def retrieve_instance_frames(
    study: StudyUID,
    series: SeriesUID,
    instance: InstanceUID,
    frame_list: FrameList,
    session: SessionDep,
    settings: SettingsDep,
    accept: AcceptHeader = None,
) -> Response:
    """Frames (1-based, comma-separated) of an instance, one per part (PS3.18 10.4.1.1.4)."""
    numbers = parse_frame_list(frame_list)
    (found,) = _held(find_instances(session, settings.data_path, study, series, instance))
    with _negotiated():
        encoding = select_frame_encoding(parse_accept(accept), found.transfer_syntax_uid)
    frames = read_frames(dcmread(found.path), numbers, encoding, found.transfer_syntax_uid)
    body, boundary = build_multipart((encoding.content_type, frame) for frame in frames)
    return Response(body, media_type=multipart_content_type(encoding.media_type, boundary))


@router.get(_INSTANCE_PATH + "/bulkdata/{tag_path:path}", responses=_MULTIPART_OCTETS, response_class=Response)
def retrieve_bulkdata(
    study: StudyUID,
    series: SeriesUID,
    instance: InstanceUID,
    tag_path: TagPath,
    session: SessionDep,
    settings: SettingsDep,
    accept: AcceptHeader = None,
) -> Response:
    """A bulk data value named by a metadata ``BulkDataURI`` (PS3.18 10.4.1.1.5).

    Pixel Data comes as one part of native bytes (decoded if stored compressed) or, when the
    client accepts the stored compression, one part per compressed frame.
    """
    steps = parse_bulkdata_path(tag_path)
    (found,) = _held(find_instances(session, settings.data_path, study, series, instance))
    stored = found.transfer_syntax_uid
    with _negotiated():
        encoding = select_frame_encoding(
            parse_accept(accept), stored if steps == [PIXEL_DATA_TAG] else EXPLICIT_VR_LITTLE_ENDIAN
        )
    ds = dcmread(found.path)
    parts = pixel_data_parts(ds, encoding, stored) if steps == [PIXEL_DATA_TAG] else [bulkdata_value(ds, steps)]
    body, boundary = build_multipart((encoding.content_type, part) for part in parts)
    return Response(body, media_type=multipart_content_type(encoding.media_type, boundary))
