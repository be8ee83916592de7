"""REST access in the audit trail (PS3.15 A.5): one record per API request, none holding query values.

Which DICOM audit message a request becomes:

* 401/403: 110114 User Authentication (Login), failed, naming the caller where it is known;
* QIDO-RS searches: 110112 Query, the object being the resource searched (its path), never the
  query keys, which may name a patient;
* WADO-RS retrieves: 110104 DICOM Instances Transferred from this node to the caller, the object
  being the study in the path;
* STOW-RS: 110104 DICOM Instances Transferred from the caller to this node, with the studies and
  SOP Class counts the route stored (``request.state.audit_studies``);
* other API calls (jobs, results, models): 110112 Query for a GET, 110103 DICOM Instances Accessed
  for a change (submit, retry, cancel, re-export), the object being the resource's path.

``/health`` is not recorded: probes would drown the trail.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from infergate.audit import Auditor
from infergate.audit.messages import (
    Action,
    AuditEvent,
    Code,
    Codes,
    ObjectRole,
    ObjectType,
    Outcome,
    Participant,
    ParticipantObject,
    instances_transferred,
    query,
    user_authentication,
)

log = logging.getLogger(__name__)

#: RFC 3881 ParticipantObjectIDTypeCode 12: a URI (here the request's path, without the query).
URI = Code("12", "RFC-3881", "URI")
_QIDO = re.compile(
    r"^/dicomweb/(studies|series|instances|studies/[^/]+/(series|instances)|studies/[^/]+/series/[^/]+/instances)/?$"
)
_STUDY_IN_PATH = re.compile(r"^/dicomweb/studies/([0-9.]{1,64})(/|$)")
_UNRECORDED = ("/health", "/docs", "/openapi.json", "/redoc")


def _outcome(status: int) -> Outcome:
    if status < 400:
        return Outcome.SUCCESS
    return Outcome.MINOR_FAILURE if status < 500 else Outcome.SERIOUS_FAILURE


def access_event(
    *,
    method: str,
    path: str,
    status: int,
    requestor: Participant,
    node: Participant,
    stored_studies: Mapping[str, Mapping[str, int]] | None = None,
) -> AuditEvent | None:
    """The audit message of one answered request, or None for paths that are not recorded."""
    if path in _UNRECORDED or not path.startswith(("/dicomweb", "/api/")):
        return None
    outcome = _outcome(status)
    description = f"{method} {path} -> {status}"
    if status in (401, 403):
        return user_authentication(user=requestor, node=node, outcome=Outcome.MINOR_FAILURE, description=description)
    if path.startswith("/dicomweb"):
        if method == "POST":
            return instances_transferred(
                source=requestor,
                destination=node,
                studies=stored_studies or {},
                action=Action.CREATE,
                outcome=outcome,
                description=description,
            )
        if _QIDO.match(path):
            return query(
                requestor=requestor, node=node, outcome=outcome, what=path, id_type=URI, description=description
            )
        study = _STUDY_IN_PATH.match(path)
        return instances_transferred(
            source=node,
            destination=requestor,
            studies={study.group(1): {}} if study else {},
            action=Action.READ,
            outcome=outcome,
            description=description,
        )
    if method in ("GET", "HEAD"):
        return _query(requestor, node, outcome, path, description)
    return AuditEvent(
        event_id=Codes.DICOM_INSTANCES_ACCESSED,
        action=Action.READ,
        outcome=outcome,
        participants=(requestor, node),
        objects=(
            ParticipantObject(object_id=path, id_type=URI, type_code=ObjectType.SYSTEM_OBJECT, role=ObjectRole.JOB),
        ),
        outcome_description=description,
    )


def _query(requestor: Participant, node: Participant, outcome: Outcome, path: str, description: str) -> AuditEvent:
    return query(requestor=requestor, node=node, outcome=outcome, what=path, id_type=URI, description=description)


class AccessAudit:
    """ASGI middleware writing :func:`access_event` for every answered request."""

    def __init__(self, app: ASGIApp, auditor: Auditor) -> None:
        self.app = app
        self.auditor = auditor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            try:
                self._record(scope, status)
            except Exception as exc:  # noqa: BLE001 - a hostile path must not turn into a 500
                log.error("REST access could not be audited (%s)", type(exc).__name__)

    def _record(self, scope: Scope, status: int) -> None:
        state: dict[str, Any] = scope.get("state") or {}
        principal = state.get("principal")
        client = scope.get("client")
        requestor = Participant(
            user_id=getattr(principal, "subject", None) or "unauthenticated",
            is_requestor=True,
            network_access_point=client[0] if client else None,
        )
        event = access_event(
            method=scope["method"],
            path=scope["path"],
            status=status,
            requestor=requestor,
            node=self.auditor.node(),
            stored_studies=state.get("audit_studies"),
        )
        if event is not None:
            self.auditor.emit(event)
