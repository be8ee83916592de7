"""REST access in the audit trail (service.api.access_audit), through the real app and its file sink."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.dicomweb.multipart import build_multipart, multipart_content_type
from service.api.app import create_app
from tests.data.make_series import write_ct_series
from tests.helpers.queues import RecordingQueue

KEY = secrets.token_urlsafe(24)


@pytest.fixture
def client(db_settings: Settings, session_factory: sessionmaker[Session]) -> Iterator[TestClient]:
    entry = f"ris:{hashlib.sha256(KEY.encode()).hexdigest()}:read submit"
    settings = Settings.model_validate({**db_settings.model_dump(), "api_keys": entry})
    with TestClient(create_app(settings, session_factory, queue=RecordingQueue())) as test_client:
        test_client.headers["X-API-Key"] = KEY
        yield test_client


def _records(settings_dir: Path) -> list[dict[str, Any]]:
    path = settings_dir / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _last(client: TestClient) -> dict[str, Any]:
    settings: Settings = client.app.state.settings  # type: ignore[attr-defined]
    records = _records(settings.data_path)
    assert records, "nothing was audited"
    return records[-1]


def _event(record: dict[str, Any]) -> tuple[str, str, int]:
    ident = record["EventIdentification"]
    return ident["EventID"]["csd-code"], ident["EventActionCode"], ident["EventOutcomeIndicator"]


def test_a_refused_credential_is_a_failed_login(client: TestClient) -> None:
    response = client.get("/api/v1/jobs", headers={"X-API-Key": KEY + "x"})
    assert response.status_code == 401
    record = _last(client)
    assert _event(record) == ("110114", "E", 4)
    assert record["EventIdentification"]["EventTypeCode"][0]["csd-code"] == "110122"
    requestor = record["ActiveParticipant"][0]
    assert requestor["UserID"] == "unauthenticated" and requestor["UserIsRequestor"] is True
    assert requestor["NetworkAccessPointID"] == "testclient"
    assert KEY not in json.dumps(record)


def test_stow_qido_and_wado_are_recorded_without_query_values(client: TestClient, tmp_path: Path) -> None:
    info = write_ct_series(tmp_path / "ct", slices=2, size=16, seed=41)
    body, boundary = build_multipart([("application/dicom", p.read_bytes()) for p in sorted(info.folder.glob("*.dcm"))])
    stored = client.post(
        "/dicomweb/studies",
        content=body,
        headers={"Content-Type": multipart_content_type("application/dicom", boundary)},
    )
    assert stored.status_code == 200
    record = _last(client)
    assert _event(record) == ("110104", "C", 0)
    (study,) = record["ParticipantObjectIdentification"]
    assert study["ParticipantObjectID"] == info.study_uid
    assert study["ParticipantObjectDescription"]["SOPClass"][0]["NumberOfInstances"] == 2
    assert record["ActiveParticipant"][0]["UserID"] == "ris"

    assert client.get("/dicomweb/studies", params={"PatientName": "Phantom*"}).status_code == 200
    record = _last(client)
    assert _event(record) == ("110112", "E", 0)
    assert record["ParticipantObjectIdentification"][0]["ParticipantObjectID"] == "/dicomweb/studies"
    assert "Phantom" not in json.dumps(record), "query keys may name a patient: never audited"

    assert client.get(f"/dicomweb/studies/{info.study_uid}/metadata").status_code == 200
    record = _last(client)
    assert _event(record) == ("110104", "R", 0)
    assert record["ParticipantObjectIdentification"][0]["ParticipantObjectID"] == info.study_uid


def test_job_calls_are_recorded_and_health_is_not(client: TestClient) -> None:
    response = client.post("/api/v1/jobs", json={"study_instance_uid": "1.2.3.4"})
    assert response.status_code == 404
    record = _last(client)
    assert _event(record) == ("110103", "R", 4)
    assert record["ParticipantObjectIdentification"][0]["ParticipantObjectID"] == "/api/v1/jobs"
    before = len(_records(client.app.state.settings.data_path))  # type: ignore[attr-defined]
    assert client.get("/health").status_code == 200
    assert len(_records(client.app.state.settings.data_path)) == before  # type: ignore[attr-defined]


def test_a_hostile_path_is_answered_and_still_audited(client: TestClient) -> None:
    response = client.get("/dicomweb/studies/1.2%00../metadata")
    assert response.status_code in (400, 404, 422)
    assert _last(client)["EventIdentification"]["EventOutcomeIndicator"] == 4
