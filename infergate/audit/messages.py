"""PS3.15 A.5 audit messages: DCM codes, the message parts as validated dataclasses, and event factories.

Each dataclass refuses bad arguments where it is built (``TypeError``/``ValueError`` naming the argument)
and turns itself into the JSON form of the schema's element with ``to_json``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Any

_MAX_TEXT = 1024  # descriptions are summaries, not dumps


@dataclass(frozen=True)
class Code:
    """A coded value (``csd-code``, ``codeSystemName``, ``originalText``)."""

    value: str
    scheme: str
    meaning: str

    def to_json(self) -> dict[str, str]:
        return {"csd-code": self.value, "codeSystemName": self.scheme, "originalText": self.meaning}


class Codes:
    """The DICOM (DCM) codes the audit messages use; checked against ``pydicom.sr.codedict`` in the tests."""

    # Audit Event ID (CID 400)
    APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
    DICOM_INSTANCES_ACCESSED = Code("110103", "DCM", "DICOM Instances Accessed")
    DICOM_INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
    DICOM_STUDY_DELETED = Code("110105", "DCM", "DICOM Study Deleted")
    EXPORT = Code("110106", "DCM", "Export")
    IMPORT = Code("110107", "DCM", "Import")
    QUERY = Code("110112", "DCM", "Query")
    SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
    USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")
    # Audit Event Type Code (CID 401)
    APPLICATION_START = Code("110120", "DCM", "Application Start")
    APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
    LOGIN = Code("110122", "DCM", "Login")
    LOGOUT = Code("110123", "DCM", "Logout")
    NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
    SECURITY_CONFIGURATION = Code("110129", "DCM", "Security Configuration")
    USE_OF_RESTRICTED_FUNCTION = Code("110132", "DCM", "Use of Restricted Function")
    # Audit Active Participant Role ID Code (CID 402)
    APPLICATION = Code("110150", "DCM", "Application")
    DESTINATION_ROLE = Code("110152", "DCM", "Destination Role ID")
    SOURCE_ROLE = Code("110153", "DCM", "Source Role ID")
    # Audit Participant Object ID Type Code (CID 404)
    STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
    SOP_CLASS_UID = Code("110181", "DCM", "SOP Class UID")
    NODE_ID = Code("110182", "DCM", "Node ID")
    # Audit Source Type Code (RFC 3881 5.4.2 / PS3.15 A.5.2)
    APPLICATION_SERVER = Code("4", "DCM", "Application Server process tier in a multi-tier system")


class Action(StrEnum):
    """``EventActionCode``."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class Outcome(IntEnum):
    """``EventOutcomeIndicator``."""

    SUCCESS = 0
    MINOR_FAILURE = 4  # the action was not completed, e.g. a refused association or credential
    SERIOUS_FAILURE = 8  # the action was aborted
    MAJOR_FAILURE = 12  # the action made the application unavailable


class ObjectType(IntEnum):
    """``ParticipantObjectTypeCode`` (RFC 3881 5.5.1)."""

    PERSON = 1
    SYSTEM_OBJECT = 2
    ORGANIZATION = 3
    OTHER = 4


class ObjectRole(IntEnum):
    """``ParticipantObjectTypeCodeRole`` (RFC 3881 5.5.2), the values DICOM messages use."""

    PATIENT = 1
    LOCATION = 2
    REPORT = 3
    RESOURCE = 4
    MASTER_FILE = 5
    USER = 6
    LIST = 7
    DATA_REPOSITORY = 10
    SECURITY_RESOURCE = 13
    JOB = 20
    QUERY = 24


def _check_text(value: str | None, name: str, *, required: bool = False) -> None:
    if value is None:
        if required:
            raise TypeError(f'Argument "{name}" is required.')
        return
    if not isinstance(value, str):
        raise TypeError(f'Argument "{name}" should be a str.')
    if required and not value.strip():
        raise ValueError(f'Argument "{name}" should not be empty.')
    if len(value) > _MAX_TEXT:
        raise ValueError(f'Argument "{name}" should be at most {_MAX_TEXT} characters.')


@dataclass(frozen=True)
class Participant:
    """An ``ActiveParticipant``: a user, process or node that took part.

    ``user_id`` is an AE title, an API key name or a token subject; ``network_access_point`` an IP address
    or host name (the type code follows from it: ``2`` for an IP address, ``1`` for a name).
    """

    user_id: str
    is_requestor: bool
    network_access_point: str | None = None
    alternative_user_id: str | None = None
    user_name: str | None = None
    roles: tuple[Code, ...] = ()

    def __post_init__(self) -> None:
        _check_text(self.user_id, "user_id", required=True)
        if not isinstance(self.is_requestor, bool):
            raise TypeError('Argument "is_requestor" should be a bool.')
        _check_text(self.network_access_point, "network_access_point")
        _check_text(self.alternative_user_id, "alternative_user_id")
        _check_text(self.user_name, "user_name")
        if not all(isinstance(role, Code) for role in self.roles):
            raise TypeError('Argument "roles" should be a tuple of Code.')

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"UserID": self.user_id, "UserIsRequestor": self.is_requestor}
        if self.alternative_user_id:
            out["AlternativeUserID"] = self.alternative_user_id
        if self.user_name:
            out["UserName"] = self.user_name
        if self.network_access_point:
            out["NetworkAccessPointID"] = self.network_access_point
            out["NetworkAccessPointTypeCode"] = "2" if _is_ip(self.network_access_point) else "1"
        if self.roles:
            out["RoleIDCode"] = [role.to_json() for role in self.roles]
        return out


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class ParticipantObject:
    """A ``ParticipantObjectIdentification``: what the event was about (a study, a query, a job).

    ``sop_classes`` maps SOP Class UIDs to instance counts (the ``SOPClass`` elements of a study's
    ``ParticipantObjectDescription``); ``details`` become ``ParticipantObjectDetail`` type/value pairs.
    Never pass patient demographics here.
    """

    object_id: str
    id_type: Code
    type_code: ObjectType = ObjectType.SYSTEM_OBJECT
    role: ObjectRole | None = None
    name: str | None = None
    description: str | None = None
    sop_classes: Mapping[str, int] = field(default_factory=dict)
    details: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_text(self.object_id, "object_id", required=True)
        if not isinstance(self.id_type, Code):
            raise TypeError('Argument "id_type" should be a Code.')
        if not isinstance(self.type_code, ObjectType):
            raise TypeError('Argument "type_code" should be an ObjectType.')
        if self.role is not None and not isinstance(self.role, ObjectRole):
            raise TypeError('Argument "role" should be an ObjectRole.')
        _check_text(self.name, "name")
        _check_text(self.description, "description")
        for uid, count in self.sop_classes.items():
            if not isinstance(uid, str) or not isinstance(count, int) or count < 0:
                raise ValueError('Argument "sop_classes" should map SOP Class UIDs to counts >= 0.')

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ParticipantObjectID": self.object_id,
            "ParticipantObjectIDTypeCode": self.id_type.to_json(),
            "ParticipantObjectTypeCode": int(self.type_code),
        }
        if self.role is not None:
            out["ParticipantObjectTypeCodeRole"] = int(self.role)
        if self.name:
            out["ParticipantObjectName"] = self.name
        description: dict[str, Any] = {}
        if self.description:
            description["Description"] = self.description
        if self.sop_classes:
            description["SOPClass"] = [
                {"UID": uid, "NumberOfInstances": count} for uid, count in sorted(self.sop_classes.items())
            ]
        if description:
            out["ParticipantObjectDescription"] = description
        if self.details:
            out["ParticipantObjectDetail"] = [{"type": k, "value": v} for k, v in sorted(self.details.items())]
        return out


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class AuditEvent:
    """One audit message; :meth:`Auditor.emit` adds the ``AuditSourceIdentification``."""

    event_id: Code
    action: Action
    outcome: Outcome
    participants: tuple[Participant, ...]
    objects: tuple[ParticipantObject, ...] = ()
    event_types: tuple[Code, ...] = ()
    outcome_description: str | None = None
    time: datetime = field(default_factory=_now)

    def __post_init__(self) -> None:
        if not isinstance(self.event_id, Code):
            raise TypeError('Argument "event_id" should be a Code (see Codes).')
        if not isinstance(self.action, Action):
            raise TypeError('Argument "action" should be an Action.')
        if not isinstance(self.outcome, Outcome):
            raise TypeError('Argument "outcome" should be an Outcome.')
        if not self.participants or not all(isinstance(p, Participant) for p in self.participants):
            raise ValueError('Argument "participants" should hold at least one Participant.')
        if not all(isinstance(o, ParticipantObject) for o in self.objects):
            raise TypeError('Argument "objects" should be a tuple of ParticipantObject.')
        if not all(isinstance(c, Code) for c in self.event_types):
            raise TypeError('Argument "event_types" should be a tuple of Code.')
        _check_text(self.outcome_description, "outcome_description")
        if self.time.tzinfo is None:
            raise ValueError('Argument "time" should be timezone-aware.')

    def to_json(self, source: Mapping[str, Any]) -> dict[str, Any]:
        identification: dict[str, Any] = {
            "EventID": self.event_id.to_json(),
            "EventActionCode": self.action.value,
            "EventDateTime": self.time.astimezone(UTC).isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": int(self.outcome),
        }
        if self.event_types:
            identification["EventTypeCode"] = [code.to_json() for code in self.event_types]
        if self.outcome_description:
            identification["EventOutcomeDescription"] = self.outcome_description
        out: dict[str, Any] = {
            "EventIdentification": identification,
            "ActiveParticipant": [p.to_json() for p in self.participants],
            "AuditSourceIdentification": dict(source),
        }
        if self.objects:
            out["ParticipantObjectIdentification"] = [o.to_json() for o in self.objects]
        return out


# Event factories -----------------------------------------------------------------------------------------


def study_object(study_uid: str, sop_classes: Mapping[str, int] | None = None) -> ParticipantObject:
    """A study as participant object (ID type 110180), with its SOP Classes and instance counts."""
    return ParticipantObject(
        object_id=study_uid,
        id_type=Codes.STUDY_INSTANCE_UID,
        type_code=ObjectType.SYSTEM_OBJECT,
        role=ObjectRole.REPORT,
        sop_classes=dict(sop_classes or {}),
    )


def user_authentication(
    *,
    user: Participant,
    node: Participant,
    outcome: Outcome,
    login: bool = True,
    description: str | None = None,
) -> AuditEvent:
    """110114 User Authentication with type Login (or Logout): an association, an API credential.

    ``user`` is whoever authenticated (a calling AE, an API key name, a token subject), ``node`` this process.
    """
    return AuditEvent(
        event_id=Codes.USER_AUTHENTICATION,
        action=Action.EXECUTE,
        outcome=outcome,
        participants=(user, node),
        event_types=(Codes.LOGIN if login else Codes.LOGOUT,),
        outcome_description=description,
    )


def instances_transferred(
    *,
    source: Participant,
    destination: Participant,
    studies: Mapping[str, Mapping[str, int]],
    action: Action,
    outcome: Outcome,
    description: str | None = None,
) -> AuditEvent:
    """110104 DICOM Instances Transferred: ``studies`` maps Study Instance UIDs to {SOP Class UID: count}.

    The receiver records ``Action.CREATE``, the sender ``Action.READ``. ``source`` and ``destination`` get
    the Source/Destination role codes added.
    """
    return AuditEvent(
        event_id=Codes.DICOM_INSTANCES_TRANSFERRED,
        action=action,
        outcome=outcome,
        participants=(_with_role(source, Codes.SOURCE_ROLE), _with_role(destination, Codes.DESTINATION_ROLE)),
        objects=tuple(study_object(uid, classes) for uid, classes in studies.items()),
        outcome_description=description,
    )


def export(
    *,
    node: Participant,
    destination: Participant,
    studies: Mapping[str, Mapping[str, int]],
    outcome: Outcome,
    description: str | None = None,
) -> AuditEvent:
    """110106 Export: results sent from this node to a destination (a PACS, a folder)."""
    return AuditEvent(
        event_id=Codes.EXPORT,
        action=Action.READ,
        outcome=outcome,
        participants=(_with_role(node, Codes.SOURCE_ROLE), _with_role(destination, Codes.DESTINATION_ROLE)),
        objects=tuple(study_object(uid, classes) for uid, classes in studies.items()),
        outcome_description=description,
    )


def study_deleted(
    *,
    node: Participant,
    studies: Mapping[str, Mapping[str, int]],
    outcome: Outcome,
    description: str | None = None,
) -> AuditEvent:
    """110105 DICOM Study Deleted (PS3.15 A.5.3.5): every instance of each study was removed from the node.

    ``node`` is the process that deleted (the requestor); ``studies`` maps Study Instance UIDs to
    {SOP Class UID: instances removed}.
    """
    return AuditEvent(
        event_id=Codes.DICOM_STUDY_DELETED,
        action=Action.DELETE,
        outcome=outcome,
        participants=(node,),
        objects=tuple(study_object(uid, classes) for uid, classes in studies.items()),
        outcome_description=description,
    )


def instances_deleted(
    *,
    node: Participant,
    studies: Mapping[str, Mapping[str, int]],
    outcome: Outcome,
    description: str | None = None,
) -> AuditEvent:
    """110103 DICOM Instances Accessed with action Delete (PS3.15 A.5.3.2): some instances of each study
    were removed and others are still held (else :func:`study_deleted`)."""
    return AuditEvent(
        event_id=Codes.DICOM_INSTANCES_ACCESSED,
        action=Action.DELETE,
        outcome=outcome,
        participants=(node,),
        objects=tuple(study_object(uid, classes) for uid, classes in studies.items()),
        outcome_description=description,
    )


def query(
    *,
    requestor: Participant,
    node: Participant,
    outcome: Outcome,
    what: str,
    id_type: Code = Codes.SOP_CLASS_UID,
    description: str | None = None,
) -> AuditEvent:
    """110112 Query: ``what`` is the C-FIND SOP Class UID, or with another ``id_type`` the query's resource
    (e.g. a QIDO-RS path); never the query keys, which may name a patient."""
    return AuditEvent(
        event_id=Codes.QUERY,
        action=Action.EXECUTE,
        outcome=outcome,
        participants=(requestor, node),
        objects=(
            ParticipantObject(
                object_id=what, id_type=id_type, type_code=ObjectType.SYSTEM_OBJECT, role=ObjectRole.QUERY
            ),
        ),
        outcome_description=description,
    )


def security_alert(
    *,
    participants: Iterable[Participant],
    event_type: Code,
    outcome: Outcome,
    description: str,
    objects: Iterable[ParticipantObject] = (),
) -> AuditEvent:
    """110113 Security Alert (e.g. type 110126 Node Authentication for a failed TLS handshake)."""
    return AuditEvent(
        event_id=Codes.SECURITY_ALERT,
        action=Action.EXECUTE,
        outcome=outcome,
        participants=tuple(participants),
        objects=tuple(objects),
        event_types=(event_type,),
        outcome_description=description,
    )


def application_activity(*, node: Participant, start: bool, outcome: Outcome = Outcome.SUCCESS) -> AuditEvent:
    """110100 Application Activity, type Application Start or Stop."""
    return AuditEvent(
        event_id=Codes.APPLICATION_ACTIVITY,
        action=Action.EXECUTE,
        outcome=outcome,
        participants=(_with_role(node, Codes.APPLICATION),),
        event_types=(Codes.APPLICATION_START if start else Codes.APPLICATION_STOP,),
    )


def _with_role(participant: Participant, role: Code) -> Participant:
    if role in participant.roles:
        return participant
    return Participant(
        user_id=participant.user_id,
        is_requestor=participant.is_requestor,
        network_access_point=participant.network_access_point,
        alternative_user_id=participant.alternative_user_id,
        user_name=participant.user_name,
        roles=(*participant.roles, role),
    )
