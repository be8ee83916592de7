"""Submitting, retrying and cancelling jobs over REST, against a real database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.store import queries
from infergate.store.session import transaction
from infergate.store.tables import Job, JobState, Series, utcnow
from service.api.app import create_app
from tests.helpers.queues import BrokerDown, RecordingQueue

STUDY = "1.2.826.0.1.3680043.8.498.400"
SERIES = "1.2.826.0.1.3680043.8.498.401"


@pytest.fixture
def queue() -> RecordingQueue:
    return RecordingQueue()


@pytest.fixture
def client(
    db_settings: Settings, session_factory: sessionmaker[Session], queue: RecordingQueue
) -> Iterator[TestClient]:
    with TestClient(create_app(db_settings, session_factory, queue=queue)) as test_client:
        yield test_client


def _ct_series(factory: sessionmaker[Session], slices: int = 20) -> int:
    with transaction(factory) as session:
        study_id = queries.get_or_create_study(session, STUDY)
        series_id = queries.get_or_create_series(
            session, study_id, SERIES, modality="CT", image_type="ORIGINAL\\PRIMARY\\AXIAL"
        )
        series = session.get(Series, series_id)
        assert series is not None
        series.num_instances = slices
    return series_id


def test_submit_with_routing_rules_queues_and_sends(
    client: TestClient, session_factory: sessionmaker[Session], queue: RecordingQueue
) -> None:
    _ct_series(session_factory)
    response = client.post("/api/v1/jobs", json={"study_instance_uid": STUDY})
    assert response.status_code == 201, response.text
    models = sorted(job["model_id"] for job in response.json()["items"])
    assert models == ["ct-bone-classifier", "ct-tissue-seg"]
    assert sorted(queue.runs) == sorted(job["id"] for job in response.json()["items"])
    again = client.post("/api/v1/jobs", json={"study_instance_uid": STUDY})
    assert again.status_code == 409 and "retry" in again.json()["detail"]


def test_submit_one_model(client: TestClient, session_factory: sessionmaker[Session]) -> None:
    _ct_series(session_factory)
    response = client.post("/api/v1/jobs", json={"study_instance_uid": STUDY, "model_id": "ct-tissue-seg"})
    assert response.status_code == 201
    assert [job["model_id"] for job in response.json()["items"]] == ["ct-tissue-seg"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"study_instance_uid": "1.2.3.999"}, 404),
        ({"study_instance_uid": STUDY, "model_id": "no-such-model"}, 404),
        ({"study_instance_uid": "../etc"}, 422),
        ({"study_instance_uid": STUDY, "unexpected": 1}, 422),
    ],
)
def test_submit_errors(
    client: TestClient, session_factory: sessionmaker[Session], body: dict[str, object], status: int
) -> None:
    _ct_series(session_factory)
    response = client.post("/api/v1/jobs", json=body)
    assert response.status_code == status, response.text
    assert "detail" in response.json()


def test_broker_down_keeps_the_job_queued(db_settings: Settings, session_factory: sessionmaker[Session]) -> None:
    _ct_series(session_factory)
    with TestClient(create_app(db_settings, session_factory, queue=BrokerDown())) as client:
        response = client.post("/api/v1/jobs", json={"study_instance_uid": STUDY, "model_id": "ct-tissue-seg"})
    assert response.status_code == 201
    with session_factory() as session:
        job = session.get(Job, response.json()["items"][0]["id"])
        assert job is not None and job.state == JobState.queued


def test_retry_and_cancel(client: TestClient, session_factory: sessionmaker[Session], queue: RecordingQueue) -> None:
    series_id = _ct_series(session_factory)
    with transaction(session_factory) as session:
        job_id = queries.create_job(session, series_id, "ct-tissue-seg", "2.0.0")
        assert job_id is not None
    assert client.post(f"/api/v1/jobs/{job_id}/retry").status_code == 409  # still queued
    cancelled = client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 409
    retried = client.post(f"/api/v1/jobs/{job_id}/retry")
    assert retried.status_code == 200 and retried.json()["state"] == "queued" and retried.json()["attempts"] == 0
    assert queue.runs == [job_id]
    assert client.post("/api/v1/jobs/999999/retry").status_code == 404


def test_cancelled_job_is_not_claimed_by_a_worker(session_factory: sessionmaker[Session]) -> None:
    series_id = _ct_series(session_factory)
    with transaction(session_factory) as session:
        job_id = queries.create_job(session, series_id, "ct-tissue-seg", "2.0.0")
        assert job_id is not None
        queries.set_job_state(session, job_id, JobState.cancelled, "cancelled over REST")
    with transaction(session_factory) as session:
        assert not queries.claim_job(session, job_id, timedelta(minutes=5))


def test_list_filters_by_creation_time(client: TestClient, session_factory: sessionmaker[Session]) -> None:
    series_id = _ct_series(session_factory)
    with transaction(session_factory) as session:
        job_id = queries.create_job(session, series_id, "ct-tissue-seg", "2.0.0")
    now = utcnow()
    after = client.get("/api/v1/jobs", params={"created_after": (now - timedelta(minutes=5)).isoformat()})
    before = client.get("/api/v1/jobs", params={"created_before": (now - timedelta(minutes=5)).isoformat()})
    assert [j["id"] for j in after.json()["items"]] == [job_id]
    assert before.json()["items"] == []
    naive = client.get("/api/v1/jobs", params={"created_after": "2000-01-01T00:00:00"})  # read as UTC
    assert naive.status_code == 200 and [j["id"] for j in naive.json()["items"]] == [job_id]
