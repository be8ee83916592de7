"""Re-driving exports over REST (``POST /api/v1/jobs/{id}/export``), against a real database."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.store import queries
from infergate.store.session import transaction
from infergate.store.tables import Export, ExportState, Job, JobState, ResultObject, utcnow
from service.api.app import create_app
from tests.helpers.queues import BrokerDown, RecordingQueue

pytestmark = pytest.mark.timeout(60)

STUDY = "1.2.826.0.1.3680043.8.498.500"
SERIES = "1.2.826.0.1.3680043.8.498.501"
PACS_A = "PACSA@127.0.0.1:11112"
PACS_B = "PACSB@127.0.0.1:11113"


@pytest.fixture
def queue() -> RecordingQueue:
    return RecordingQueue()


@pytest.fixture
def settings(db_settings: Settings) -> Settings:
    return Settings(**{**db_settings.model_dump(), "pacs": f"{PACS_A},{PACS_B}"})


@pytest.fixture
def client(settings: Settings, session_factory: sessionmaker[Session], queue: RecordingQueue) -> Iterator[TestClient]:
    with TestClient(create_app(settings, session_factory, queue=queue)) as test_client:
        yield test_client


def _job(
    factory: sessionmaker[Session],
    state: JobState,
    exports: dict[str, ExportState] | None = None,
    *,
    objects: int = 2,
    model_id: str = "ct-tissue-seg",
) -> int:
    """A job in ``state`` with ``objects`` result objects, each with an export row per destination."""
    with transaction(factory) as session:
        study_id = queries.get_or_create_study(session, STUDY)
        series_id = queries.get_or_create_series(session, study_id, SERIES, modality="CT")
        job_id = queries.create_job(session, series_id, model_id, "1")
        assert job_id is not None
        job = session.get(Job, job_id)
        assert job is not None
        job.state = state
        job.error = "export failed: 0xA900" if state == JobState.failed else None
        for n in range(objects):
            result = ResultObject(
                job_id=job_id,
                kind="SEG",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{job_id}.{n + 1}",
                series_instance_uid=f"1.2.826.0.1.3680043.8.498.{job_id}",
                path=f"results/{job_id}/{n}.dcm",
            )
            session.add(result)
            session.flush()
            for destination, export_state in (exports or {}).items():
                done = export_state == ExportState.done
                session.add(
                    Export(
                        result_object_id=result.id,
                        destination=destination,
                        state=export_state,
                        attempts=1,
                        last_status=0x0000 if done else 0xA900,
                        last_error=None if done else f"{destination}: status 0xA900",
                        delivered_at=utcnow() if done else None,
                    )
                )
    return job_id


def _exports(factory: sessionmaker[Session], job_id: int) -> dict[str, list[Export]]:
    with factory() as session:
        rows = session.scalars(select(Export).join(ResultObject).where(ResultObject.job_id == job_id)).all()
    by_destination: dict[str, list[Export]] = {}
    for row in rows:
        by_destination.setdefault(row.destination, []).append(row)
    return by_destination


def test_failed_export_is_sent_again(
    client: TestClient, session_factory: sessionmaker[Session], queue: RecordingQueue
) -> None:
    job_id = _job(session_factory, JobState.failed, {PACS_A: ExportState.failed, PACS_B: ExportState.done})
    response = client.post(f"/api/v1/jobs/{job_id}/export")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["state"] == "exporting" and body["error"] is None and body["finished_at"] is None
    exports = [e for r in body["result_objects"] for e in r["exports"]]
    assert len(exports) == 4
    assert all(
        e["state"] == "pending" and e["attempts"] == 0 and e["last_status"] is None and e["delivered_at"] is None
        for e in exports
    )
    assert queue.exports == [job_id]
    again = client.post(f"/api/v1/jobs/{job_id}/export")  # now exporting: in progress
    assert again.status_code == 409 and "exporting" in again.json()["detail"]


def test_one_destination_only(client: TestClient, session_factory: sessionmaker[Session]) -> None:
    job_id = _job(session_factory, JobState.failed, {PACS_A: ExportState.failed, PACS_B: ExportState.failed})
    response = client.post(f"/api/v1/jobs/{job_id}/export", params={"destination": f" {PACS_B} "})
    assert response.status_code == 200, response.text
    exports = _exports(session_factory, job_id)
    assert {e.state for e in exports[PACS_B]} == {ExportState.pending}
    assert {e.state for e in exports[PACS_A]} == {ExportState.failed}  # left as it was
    assert {e.last_status for e in exports[PACS_A]} == {0xA900}


def test_rows_are_made_for_destinations_the_job_has_none_for(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    job_id = _job(session_factory, JobState.done)  # finished before any PACS was configured
    assert client.post(f"/api/v1/jobs/{job_id}/export").status_code == 200
    exports = _exports(session_factory, job_id)
    assert sorted(exports) == [PACS_A, PACS_B]
    assert all(len(rows) == 2 and {e.state for e in rows} == {ExportState.pending} for rows in exports.values())


@pytest.mark.parametrize("state", [JobState.queued, JobState.running, JobState.exporting, JobState.cancelled])
def test_unfinished_or_cancelled_jobs_conflict(
    client: TestClient, session_factory: sessionmaker[Session], queue: RecordingQueue, state: JobState
) -> None:
    job_id = _job(session_factory, state, {PACS_A: ExportState.pending})
    response = client.post(f"/api/v1/jobs/{job_id}/export")
    assert response.status_code == 409 and state.value in response.json()["detail"]
    assert queue.exports == []
    assert {e.state for e in _exports(session_factory, job_id)[PACS_A]} == {ExportState.pending}


def test_conflicts_without_something_to_export(client: TestClient, session_factory: sessionmaker[Session]) -> None:
    no_objects = _job(session_factory, JobState.done, objects=0, model_id="ct-bone-classifier")
    response = client.post(f"/api/v1/jobs/{no_objects}/export")
    assert response.status_code == 409 and "no result objects" in response.json()["detail"]
    # failed before the export (its objects are from an earlier run): exporting them would mark it done
    failed_model = _job(session_factory, JobState.failed, {PACS_A: ExportState.done})
    response = client.post(f"/api/v1/jobs/{failed_model}/export")
    assert response.status_code == 409 and "retry the job" in response.json()["detail"]


def test_destination_must_be_configured(client: TestClient, session_factory: sessionmaker[Session]) -> None:
    job_id = _job(session_factory, JobState.failed, {PACS_A: ExportState.failed})
    unknown = client.post(f"/api/v1/jobs/{job_id}/export", params={"destination": "OTHER@10.0.0.9:104"})
    assert unknown.status_code == 404 and "configured" in unknown.json()["detail"]
    malformed = client.post(f"/api/v1/jobs/{job_id}/export", params={"destination": "not-a-destination"})
    assert malformed.status_code == 400 and "destination" in malformed.json()["detail"]
    assert client.post("/api/v1/jobs/999999/export").status_code == 404
    assert {e.state for e in _exports(session_factory, job_id)[PACS_A]} == {ExportState.failed}


def test_no_configured_destination_conflicts(db_settings: Settings, session_factory: sessionmaker[Session]) -> None:
    job_id = _job(session_factory, JobState.failed, {PACS_A: ExportState.failed})
    with TestClient(create_app(db_settings, session_factory, queue=RecordingQueue())) as client:
        response = client.post(f"/api/v1/jobs/{job_id}/export")
    assert response.status_code == 409 and "INFERGATE_PACS" in response.json()["detail"]


def test_broker_down_leaves_the_export_to_the_reconciler(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    job_id = _job(session_factory, JobState.failed, {PACS_A: ExportState.failed})
    with TestClient(create_app(settings, session_factory, queue=BrokerDown())) as client:
        response = client.post(f"/api/v1/jobs/{job_id}/export", params={"destination": PACS_A})
    assert response.status_code == 200 and response.json()["state"] == "exporting"
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == JobState.exporting
        # what the reconciler re-sends once INFERGATE_REQUEUE_AFTER_SECONDS have passed
        assert queries.exports_overdue(session, utcnow() + timedelta(seconds=1)) == [job_id]


def test_needs_the_submit_scope(db_settings: Settings, session_factory: sessionmaker[Session]) -> None:
    keys = {name: secrets.token_urlsafe(32) for name in ("viewer", "sender")}
    entries = ",".join(
        f"{name}:{hashlib.sha256(key.encode()).hexdigest()}:{'read' if name == 'viewer' else 'submit'}"
        for name, key in keys.items()
    )
    secured = Settings(**{**db_settings.model_dump(), "pacs": PACS_A, "api_host": "0.0.0.0", "api_keys": entries})
    job_id = _job(session_factory, JobState.failed, {PACS_A: ExportState.failed})
    with TestClient(create_app(secured, session_factory, queue=RecordingQueue())) as client:
        assert client.post(f"/api/v1/jobs/{job_id}/export").status_code == 401
        assert client.post(f"/api/v1/jobs/{job_id}/export", headers={"X-API-Key": keys["viewer"]}).status_code == 403
        accepted = client.post(f"/api/v1/jobs/{job_id}/export", headers={"X-API-Key": keys["sender"]})
        assert accepted.status_code == 200, accepted.text
