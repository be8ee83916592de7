"""The audit trail: security-relevant events as DICOM audit messages (PS3.15 A.5), one JSON object a line.

Every process that accepts, refuses, stores or sends data records what happened through one :class:`Auditor`,
built at its entry point with :meth:`Auditor.from_settings` and passed down like ``Settings``::

    auditor = Auditor.from_settings(settings, process="api")
    auditor.emit(
        user_authentication(
            user=Participant(user_id="viewer", is_requestor=True, network_access_point="10.0.0.7"),
            node=auditor.node(),
            outcome=Outcome.MINOR_FAILURE,
            description="invalid API key",
        )
    )

An event is built with one of the small factories of :mod:`infergate.audit.messages` (:func:`user_authentication`,
:func:`instances_transferred`, :func:`export`, :func:`query`, :func:`security_alert`,
:func:`application_activity`, :func:`study_deleted`, :func:`instances_deleted`) or directly with
:class:`AuditEvent`; either validates its arguments
(highdicom style: a ``TypeError``/``ValueError`` naming the argument), so a malformed record fails where it
is built, not in the log reader.

Record layout
-------------
Each line is the JSON form of a PS3.15 A.5.1 ``AuditMessage`` (RFC 3881): the element and attribute names
are the schema's (``EventIdentification``, ``ActiveParticipant``, ``AuditSourceIdentification``,
``ParticipantObjectIdentification``; ``EventID``, ``EventActionCode``, ``EventDateTime``,
``EventOutcomeIndicator``, ``UserID``, ``UserIsRequestor``, ``NetworkAccessPointID``, ``RoleIDCode``, …) and
coded values are ``{"csd-code", "codeSystemName", "originalText"}``, so a converter to the XML form is a
mechanical walk.

What never goes in
------------------
No patient name, patient ID, birth date or other demographics: PS3.15's DICOM Instances Transferred
message asks for the Patient as a participant object, and that participant is deliberately left out (the
node's logs and audit trail hold no patient identifiers). Study Instance UIDs, SOP Class UIDs and counts,
AE titles, user names of API callers and network addresses are recorded.

Sinks (:mod:`infergate.audit.sinks`)
------------------------------------
``INFERGATE_AUDIT_LOG`` is a file path (default ``<data_dir>/audit.log``) or ``syslog://host:port`` (UDP)
or ``syslog:///dev/log`` (local socket). The file sink opens the file with ``O_APPEND`` and writes each
record with a single ``write()``, so concurrent threads and processes append whole lines; it re-opens the
file on every record, so log rotation by renaming needs no signal. Syslog records use the ``authpriv``
facility (severity ``info`` for success, ``warning`` for failures).

A record that cannot be written is reported on the process log at ERROR and counted in
:attr:`Auditor.failures`; it never makes the audited operation fail (a C-STORE that was stored durably
stays stored).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Sequence
from typing import Any

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
    application_activity,
    export,
    instances_deleted,
    instances_transferred,
    query,
    security_alert,
    study_deleted,
    study_object,
    user_authentication,
)
from infergate.audit.sinks import AuditSink, FileSink, MemorySink, SyslogSink, open_sink
from infergate.config import Settings

log = logging.getLogger(__name__)

__all__ = [
    "Action",
    "AuditEvent",
    "AuditSink",
    "Auditor",
    "Code",
    "Codes",
    "FileSink",
    "MemorySink",
    "ObjectRole",
    "ObjectType",
    "Outcome",
    "Participant",
    "ParticipantObject",
    "SyslogSink",
    "application_activity",
    "export",
    "instances_deleted",
    "instances_transferred",
    "open_sink",
    "query",
    "security_alert",
    "study_deleted",
    "study_object",
    "user_authentication",
]


class Auditor:
    """Writes :class:`AuditEvent` records to a sink, with this node as ``AuditSourceIdentification``.

    Thread-safe; one per process, built at the entry point and passed down.
    """

    def __init__(self, sink: AuditSink, *, source_id: str, site_id: str | None = None, process: str = "") -> None:
        self.sink = sink
        if not isinstance(source_id, str) or not source_id.strip():
            raise ValueError('Argument "source_id" should be a non-empty str (the AE title).')
        self.source_id = source_id
        self.process = process
        self.failures = 0
        self._source: dict[str, Any] = {
            "AuditSourceID": self.source_id,
            "AuditSourceTypeCode": [Codes.APPLICATION_SERVER.to_json()],
        }
        if site_id:
            self._source["AuditEnterpriseSiteID"] = site_id
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, process: str) -> Auditor:
        """The auditor of one process (``scp``, ``api``, ``worker``), writing to ``INFERGATE_AUDIT_LOG``."""
        return cls(
            open_sink(settings.audit_log or settings.data_path / "audit.log"),
            source_id=settings.ae_title,
            site_id=socket.gethostname(),
            process=process,
        )

    def node(
        self, *, is_requestor: bool = False, roles: Sequence[Code] = (), address: str | None = None
    ) -> Participant:
        """This process as an active participant: the AE title, with ``process@pid`` as alternative ID."""
        return Participant(
            user_id=self.source_id,
            is_requestor=is_requestor,
            alternative_user_id=f"{self.process or 'infergate'}@{os.getpid()}",
            network_access_point=address,
            roles=tuple(roles),
        )

    def emit(self, event: AuditEvent) -> dict[str, Any]:
        """Write one record and return it (as written, a dict); a write failure is logged, never raised."""
        if not isinstance(event, AuditEvent):
            raise TypeError('Argument "event" should be an AuditEvent.')
        record = event.to_json(self._source)
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=True)
        try:
            self.sink.write(line, event.outcome)
        except OSError as exc:
            with self._lock:
                self.failures += 1
            log.error("audit record %s could not be written (%s)", event.event_id.meaning, type(exc).__name__)
        return record

    def close(self) -> None:
        self.sink.close()
