"""The audit trail: PS3.15 A.5 field names and DCM codes, validation, and sinks safe across threads and processes."""

from __future__ import annotations

import json
import logging
import multiprocessing
import re
import socket
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydicom.sr.codedict import codes

from infergate import audit
from infergate.audit import (
    Action,
    AuditEvent,
    Auditor,
    Code,
    Codes,
    FileSink,
    MemorySink,
    Outcome,
    Participant,
    ParticipantObject,
    SyslogSink,
    open_sink,
)
from infergate.config import Settings

STUDY = "1.2.826.0.1.3680043.8.498.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def _peer(**overrides: Any) -> Participant:
    values: dict[str, Any] = {"user_id": "CT-SCANNER", "is_requestor": True, "network_access_point": "10.1.2.3"}
    values.update(overrides)
    return Participant(**values)


def _auditor(sink: audit.AuditSink | None = None) -> Auditor:
    return Auditor(sink or MemorySink(), source_id="INFERGATE", site_id="node-1", process="scp")


@pytest.mark.timeout(30)
def test_dcm_codes_are_the_standard_ones() -> None:
    """Every code in Codes has the value and meaning of pydicom's copy of the DCM coding scheme."""
    by_value = {code.value: code.meaning for code in vars(Codes).values() if isinstance(code, Code)}
    names = {
        "110100": "ApplicationActivity",
        "110103": "DICOMInstancesAccessed",
        "110104": "DICOMInstancesTransferred",
        "110105": "DICOMStudyDeleted",
        "110106": "Export",
        "110107": "Import",
        "110112": "Query",
        "110113": "SecurityAlert",
        "110114": "UserAuthentication",
        "110120": "ApplicationStart",
        "110121": "ApplicationStop",
        "110122": "Login",
        "110123": "Logout",
        "110126": "NodeAuthentication",
        "110129": "SecurityConfiguration",
        "110132": "UseOfRestrictedFunction",
        "110150": "Application",
        "110152": "DestinationRoleID",
        "110153": "SourceRoleID",
        "110180": "StudyInstanceUID",
        "110181": "SOPClassUID",
        "110182": "NodeID",
    }
    for value, name in names.items():
        reference = getattr(codes.DCM, name)
        assert (reference.value, reference.meaning) == (value, by_value[value]), name
    assert set(by_value) - set(names) == {"4"}  # the RFC 3881 audit source type


@pytest.mark.timeout(30)
def test_deletion_records_name_the_deleting_node_the_studies_and_action_d() -> None:
    """PS3.15 A.5.3.5 DICOM Study Deleted and A.5.3.2 Instances Accessed (Delete), as retention writes them."""
    sink = MemorySink()
    auditor = _auditor(sink)
    node = auditor.node(is_requestor=True)
    deleted = auditor.emit(
        audit.study_deleted(node=node, studies={STUDY: {CT: 3}}, outcome=Outcome.SUCCESS, description="retention")
    )
    partial = auditor.emit(
        audit.instances_deleted(node=node, studies={STUDY: {CT: 1}}, outcome=Outcome.SUCCESS, description="retention")
    )
    assert deleted["EventIdentification"]["EventID"]["csd-code"] == "110105"
    assert partial["EventIdentification"]["EventID"]["csd-code"] == "110103"
    for record in (deleted, partial):
        assert record["EventIdentification"]["EventActionCode"] == "D"
        (participant,) = record["ActiveParticipant"]
        assert participant["UserID"] == "INFERGATE" and participant["UserIsRequestor"] is True
        (study,) = record["ParticipantObjectIdentification"]
        assert study["ParticipantObjectID"] == STUDY
    assert deleted["ParticipantObjectIdentification"][0]["ParticipantObjectDescription"]["SOPClass"] == [
        {"UID": CT, "NumberOfInstances": 3}
    ]


@pytest.mark.timeout(30)
def test_instances_transferred_record_has_the_ps315_fields_and_no_patient_data() -> None:
    sink = MemorySink()
    auditor = _auditor(sink)
    record = auditor.emit(
        audit.instances_transferred(
            source=_peer(),
            destination=auditor.node(address="10.0.0.1"),
            studies={STUDY: {CT: 120}},
            action=Action.CREATE,
            outcome=Outcome.SUCCESS,
            description="120 instances stored",
        )
    )
    assert sink.records() == [record]
    event = record["EventIdentification"]
    assert event["EventID"] == {
        "csd-code": "110104",
        "codeSystemName": "DCM",
        "originalText": "DICOM Instances Transferred",
    }
    assert event["EventActionCode"] == "C" and event["EventOutcomeIndicator"] == 0
    assert datetime.fromisoformat(event["EventDateTime"]).utcoffset() is not None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", event["EventDateTime"])
    source, destination = record["ActiveParticipant"]
    assert source == {
        "UserID": "CT-SCANNER",
        "UserIsRequestor": True,
        "NetworkAccessPointID": "10.1.2.3",
        "NetworkAccessPointTypeCode": "2",
        "RoleIDCode": [{"csd-code": "110153", "codeSystemName": "DCM", "originalText": "Source Role ID"}],
    }
    assert destination["UserID"] == "INFERGATE" and destination["UserIsRequestor"] is False
    assert destination["AlternativeUserID"].startswith("scp@")
    assert destination["RoleIDCode"][0]["csd-code"] == "110152"
    assert record["AuditSourceIdentification"] == {
        "AuditSourceID": "INFERGATE",
        "AuditEnterpriseSiteID": "node-1",
        "AuditSourceTypeCode": [Codes.APPLICATION_SERVER.to_json()],
    }
    (study,) = record["ParticipantObjectIdentification"]
    assert study["ParticipantObjectID"] == STUDY
    assert study["ParticipantObjectIDTypeCode"]["csd-code"] == "110180"
    assert (study["ParticipantObjectTypeCode"], study["ParticipantObjectTypeCodeRole"]) == (2, 3)
    assert study["ParticipantObjectDescription"]["SOPClass"] == [{"UID": CT, "NumberOfInstances": 120}]
    text = json.dumps(record)
    for forbidden in ("PatientName", "PatientID", "PatientBirthDate"):
        assert forbidden not in text


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("factory", "event_id", "type_code"),
    [
        (lambda n: audit.user_authentication(user=_peer(), node=n, outcome=Outcome.MINOR_FAILURE), "110114", "110122"),
        (
            lambda n: audit.user_authentication(user=_peer(), node=n, outcome=Outcome.SUCCESS, login=False),
            "110114",
            "110123",
        ),
        (
            lambda n: audit.security_alert(
                participants=[_peer(), n],
                event_type=Codes.NODE_AUTHENTICATION,
                outcome=Outcome.MINOR_FAILURE,
                description="TLS handshake failed",
            ),
            "110113",
            "110126",
        ),
        (lambda n: audit.application_activity(node=n, start=True), "110100", "110120"),
        (
            lambda n: audit.export(
                node=n, destination=_peer(user_id="PACS"), studies={STUDY: {CT: 1}}, outcome=Outcome.SUCCESS
            ),
            "110106",
            None,
        ),
        (
            lambda n: audit.query(requestor=_peer(user_id="viewer"), node=n, outcome=Outcome.SUCCESS, what=CT),
            "110112",
            None,
        ),
    ],
)
def test_factories_build_the_named_events(factory: Any, event_id: str, type_code: str | None) -> None:
    auditor = _auditor()
    record = auditor.emit(factory(auditor.node()))
    assert record["EventIdentification"]["EventID"]["csd-code"] == event_id
    types = [code["csd-code"] for code in record["EventIdentification"].get("EventTypeCode", [])]
    assert types == ([type_code] if type_code else [])


@pytest.mark.timeout(30)
def test_bad_arguments_are_refused_where_the_event_is_built() -> None:
    with pytest.raises(ValueError, match='"user_id"'):
        Participant(user_id=" ", is_requestor=True)
    with pytest.raises(TypeError, match='"is_requestor"'):
        Participant(user_id="A", is_requestor="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='"participants"'):
        AuditEvent(event_id=Codes.QUERY, action=Action.EXECUTE, outcome=Outcome.SUCCESS, participants=())
    with pytest.raises(TypeError, match='"action"'):
        AuditEvent(event_id=Codes.QUERY, action="E", outcome=Outcome.SUCCESS, participants=(_peer(),))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match='"outcome"'):
        AuditEvent(event_id=Codes.QUERY, action=Action.EXECUTE, outcome=0, participants=(_peer(),))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='"sop_classes"'):
        ParticipantObject(object_id=STUDY, id_type=Codes.STUDY_INSTANCE_UID, sop_classes={CT: -1})
    with pytest.raises(ValueError, match='"outcome_description"'):
        audit.user_authentication(user=_peer(), node=_peer(), outcome=Outcome.SUCCESS, description="x" * 5000)
    with pytest.raises(TypeError, match='"event"'):
        _auditor().emit({"EventID": "110114"})  # type: ignore[arg-type]


def _append_many(path: str, writer: int, count: int) -> None:
    auditor = Auditor(FileSink(Path(path)), source_id="INFERGATE", process=f"writer{writer}")
    description = f"writer {writer} " + "x" * 1000  # long lines: interleaving would show
    for _ in range(count):
        auditor.emit(
            audit.user_authentication(
                user=_peer(), node=auditor.node(), outcome=Outcome.SUCCESS, description=description
            )
        )


@pytest.mark.timeout(60)
def test_file_sink_appends_whole_lines_from_threads_and_processes(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.log"
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_append_many, args=(str(path), n, 50)) for n in range(3)]
    threads = [threading.Thread(target=_append_many, args=(str(path), 10 + n, 50)) for n in range(3)]
    for worker in [*processes, *threads]:
        worker.start()
    for worker in [*processes, *threads]:
        worker.join(timeout=50)
    assert all(process.exitcode == 0 for process in processes)
    lines = path.read_text().splitlines()
    assert len(lines) == 300
    writers = [json.loads(line)["EventIdentification"]["EventOutcomeDescription"].split()[1] for line in lines]
    assert sorted(set(writers)) == sorted(str(n) for n in (0, 1, 2, 10, 11, 12))
    assert path.stat().st_mode & 0o777 == 0o640


@pytest.mark.timeout(30)
def test_a_failed_write_is_logged_and_counted_never_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "audit.log").mkdir()  # a folder where the file should be: every write fails
    auditor = Auditor(FileSink(tmp_path / "audit.log"), source_id="INFERGATE")
    with caplog.at_level(logging.ERROR, logger="infergate.audit"):
        record = auditor.emit(audit.application_activity(node=auditor.node(), start=True))
    assert record["EventIdentification"]["EventID"]["csd-code"] == "110100"
    assert auditor.failures == 1
    assert "could not be written (IsADirectoryError)" in caplog.text


@pytest.mark.timeout(30)
def test_syslog_sink_sends_one_authpriv_datagram_per_record() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(5)
    try:
        sink = open_sink(f"syslog://127.0.0.1:{server.getsockname()[1]}")
        assert isinstance(sink, SyslogSink)
        auditor = Auditor(sink, source_id="INFERGATE")
        auditor.emit(audit.user_authentication(user=_peer(), node=auditor.node(), outcome=Outcome.SUCCESS))
        auditor.emit(audit.user_authentication(user=_peer(), node=auditor.node(), outcome=Outcome.MINOR_FAILURE))
        datagrams = [server.recv(65536).decode() for _ in range(2)]
        auditor.close()
    finally:
        server.close()
    # <priority> = facility authpriv (10) * 8 + severity: info (6) for success, warning (4) for failures
    assert datagrams[0].startswith("<86>infergate-audit: {") and datagrams[1].startswith("<84>infergate-audit: {")
    record = json.loads(datagrams[1].split(": ", 1)[1].rstrip("\x00"))
    assert record["EventIdentification"]["EventOutcomeIndicator"] == 4


@pytest.mark.timeout(30)
def test_auditor_from_settings_defaults_to_a_file_in_the_data_folder(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var")
    auditor = Auditor.from_settings(settings, process="api")
    assert isinstance(auditor.sink, FileSink) and auditor.sink.path == settings.data_path / "audit.log"
    auditor.emit(audit.application_activity(node=auditor.node(), start=True))
    assert json.loads((settings.data_path / "audit.log").read_text())["ActiveParticipant"][0][
        "AlternativeUserID"
    ].startswith("api@")


@pytest.mark.timeout(30)
def test_audit_and_tls_settings_are_checked_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="syslog://host:port"):
        Settings(data_dir=tmp_path, audit_log="syslog://")
    with pytest.raises(ValidationError, match="INFERGATE_TLS_CA_FILE"):
        Settings(data_dir=tmp_path, tls_cert_file=tmp_path / "c.pem", tls_key_file=tmp_path / "k.pem")
    with pytest.raises(ValidationError, match="INFERGATE_TLS_KEY_FILE"):
        Settings(data_dir=tmp_path, tls_cert_file=tmp_path / "c.pem", tls_ca_file=tmp_path / "ca.pem")
    with pytest.raises(ValidationError, match="scp_allowed_networks"):
        Settings(data_dir=tmp_path, scp_allowed_networks="10.0.0.0/33")
    assert Settings(data_dir=tmp_path, scp_allowed_networks="10.1.0.0/16, 127.0.0.1").scp_allowed_networks == [
        "10.1.0.0/16",
        "127.0.0.1",
    ]
