"""QIDO-RS: search for the studies, series and instances the node holds (PS3.18 10.6).

Inputs the node received and the SEG/SR it produced are searched alike. Parsing and matching
rules live in :mod:`infergate.dicomweb.qido`; the SQL in :mod:`infergate.store.queries`. The
routes are named after the Standard's transactions, as dicomweb-client names its methods; each
resource gets its own function so that every operation id stays unique.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request, Response
from sqlalchemy.orm import Session

from infergate.dicomweb import qido
from infergate.dicomweb.negotiation import NotAcceptable, parse_accept, select_json
from infergate.dicomweb.qido import Level
from infergate.store import queries
from infergate.store.tables import Study
from service.api.deps import SessionDep
from service.api.schemas import UID_PATTERN, ErrorOut
from service.api.urls import public_base

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

_INCLUDABLE = ["all", *(a.keyword for a in qido.ATTRIBUTES), *(a.tag for a in qido.ATTRIBUTES)]
_QUERY_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": qido.MAX_OFFSET},
        "description": f"Most matches to return (PS3.18 8.3.4.4); the node returns at most {qido.MAX_RESULTS}, "
        "with a Warning header when more remain.",
    },
    {
        "name": "offset",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 0, "maximum": qido.MAX_OFFSET},
        "description": "Matches to skip.",
    },
    {
        "name": "includefield",
        "in": "query",
        "required": False,
        "schema": {"type": "array", "items": {"type": "string", "enum": _INCLUDABLE}},
        "style": "form",
        "explode": True,
        "description": "Attributes to return besides the defaults, by keyword or tag, or `all`; values may also "
        "be comma-separated. Any DICOM keyword is accepted; those the node holds no value of are not returned.",
    },
    {
        "name": "fuzzymatching",
        "in": "query",
        "required": False,
        "schema": {"type": "boolean", "default": False},
        "description": "Accepted; the node matches literally and says so in a Warning header.",
    },
]
_DOC: dict[str, Any] = {
    "response_class": Response,
    "responses": {
        200: {
            "description": "The matches as DICOM JSON (PS3.18 F.2); an empty array when nothing matches.",
            "content": {qido.MEDIA_TYPE: {"schema": {"type": "array", "items": {"type": "object"}}}},
        },
        400: {
            "model": ErrorOut,
            "description": "A query parameter is unknown, unsupported or malformed; the detail names it. "
            "Attributes match by keyword or tag (`PatientID=...`, `00100020=...`), with `*`/`?` wildcards for "
            "strings, `from-to` ranges for dates and times, and comma-separated UIDs.",
        },
        406: {"model": ErrorOut, "description": "The Accept header allows no DICOM JSON."},
    },
    "openapi_extra": {"parameters": _QUERY_PARAMETERS},
}


# The pattern is documented, not enforced by FastAPI, so that a malformed UID gets the same 400 naming
# it as every other malformed query key (infergate.dicomweb.qido.parse_query checks it).
_UID = {"json_schema_extra": {"pattern": UID_PATTERN, "maxLength": 64}}
StudyUID = Annotated[str, Path(description="Study Instance UID", **_UID)]
SeriesUID = Annotated[str, Path(description="Series Instance UID", **_UID)]


_SEARCHES: dict[Level, Callable[..., list[Any]]] = {
    Level.study: queries.search_studies,
    Level.series: queries.search_series,
    Level.instance: queries.search_instances,
}


_COUNTED = frozenset({"ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"})


def _rows(level: Level, match: Any) -> tuple[Study, dict[Level, object], str]:
    """The study of a match, the row of each level, and the path of its WADO-RS resource."""
    if level == Level.study:
        return match, {Level.study: match}, f"/studies/{match.study_instance_uid}"
    if level == Level.series:
        study = match.study
        path = f"/studies/{study.study_instance_uid}/series/{match.series_instance_uid}"
        return study, {Level.study: study, Level.series: match}, path
    series = match.series
    study = series.study
    path = f"/studies/{study.study_instance_uid}/series/{series.series_instance_uid}/instances/{match.sop_instance_uid}"
    return study, {Level.study: study, Level.series: series, Level.instance: match}, path


def _study_values(session: Session, query: qido.Query, studies: list[Study]) -> dict[int, dict[str, Any]]:
    """The computed study attributes (modalities, counts) of each study, when the answer returns any."""
    if not _COUNTED & {attribute.keyword for attribute in query.returned}:
        return {}
    counts = queries.study_counts(session, sorted({study.id for study in studies}))
    return {
        study_id: {
            "ModalitiesInStudy": list(each.modalities),
            "NumberOfStudyRelatedSeries": each.num_series,
            "NumberOfStudyRelatedInstances": each.num_instances,
        }
        for study_id, each in counts.items()
    }


def _search(
    request: Request,
    session: Session,
    level: Level,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> Response:
    """Run one QIDO-RS search and answer DICOM JSON, with a Warning header when more matches remain."""
    try:
        # the same negotiation as WADO-RS metadata: application/dicom+json, or application/json if only that
        media_type = select_json(parse_accept(request.headers.get("accept")))
    except NotAcceptable as exc:
        raise HTTPException(status_code=406, detail=str(exc)) from exc
    query = qido.parse_query(
        request.query_params.multi_items(),
        level,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
    )
    search = _SEARCHES[level]
    # One row more than the page tells whether more matches remain.
    matches: list[Any] = search(session, query.criteria, limit=query.limit + 1, offset=query.offset)
    more = len(matches) > query.limit
    found = [_rows(level, match) for match in matches[: query.limit]]
    computed = _study_values(session, query, [study for study, _, _ in found])
    base = public_base(request) + router.prefix
    body = [qido.render(query, rows, computed.get(study.id, {}), base + path) for study, rows, path in found]
    warnings = []
    if more:
        warnings.append('299 infergate "There are additional results that can be requested"')
    if query.fuzzymatching:
        warnings.append('299 infergate "Fuzzy matching is not supported; only literal matching was performed"')
    headers = {"Warning": ", ".join(warnings)} if warnings else {}
    return Response(content=json.dumps(body), media_type=media_type, headers=headers)


@router.get("/studies", **_DOC)
def search_for_studies(request: Request, session: SessionDep) -> Response:
    """Search for studies (PS3.18 10.6, Study resource)."""
    return _search(request, session, Level.study)


@router.get("/series", **_DOC)
def search_for_series(request: Request, session: SessionDep) -> Response:
    """Search for series of any study; study attributes may be matched and are returned."""
    return _search(request, session, Level.series)


@router.get("/studies/{study}/series", **_DOC)
def search_for_series_in_study(study: StudyUID, request: Request, session: SessionDep) -> Response:
    """Search for the series of one study."""
    return _search(request, session, Level.series, study)


@router.get("/instances", **_DOC)
def search_for_instances(request: Request, session: SessionDep) -> Response:
    """Search for instances of any study; study and series attributes may be matched and are returned."""
    return _search(request, session, Level.instance)


@router.get("/studies/{study}/instances", **_DOC)
def search_for_instances_in_study(study: StudyUID, request: Request, session: SessionDep) -> Response:
    """Search for the instances of one study; series attributes may be matched and are returned."""
    return _search(request, session, Level.instance, study)


@router.get("/studies/{study}/series/{series}/instances", **_DOC)
def search_for_instances_in_series(
    study: StudyUID, series: SeriesUID, request: Request, session: SessionDep
) -> Response:
    """Search for the instances of one series."""
    return _search(request, session, Level.instance, study, series)
