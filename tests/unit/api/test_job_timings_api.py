"""The stage timings a worker records are part of the job JSON (null until a worker recorded them)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.store import queries
from infergate.store.session import transaction
from infergate.store.tables import Job
from service.api.app import create_app
from tests.helpers.queues import RecordingQueue

STUDY = "1.2.826.0.1.3680043.8.498.410"
SERIES = "1.2.826.0.1.3680043.8.498.411"


@pytest.fixture
def client(db_settings: Settings, session_factory: sessionmaker[Session]) -> Iterator[TestClient]:
    with TestClient(create_app(db_settings, session_factory, queue=RecordingQueue())) as test_client:
        yield test_client


def test_job_detail_shows_the_recorded_timings(client: TestClient, session_factory: sessionmaker[Session]) -> None:
    with transaction(session_factory) as session:
        study_id = queries.get_or_create_study(session, STUDY)
        series_id = queries.get_or_create_series(session, study_id, SERIES, modality="CT")
        job_id = queries.create_job(session, series_id, "ct-tissue-seg", "1")
    assert job_id is not None
    assert client.get(f"/api/v1/jobs/{job_id}").json()["timings"] is None

    timings = {"queue_wait": 0.01, "load": 0.5, "onnx": 2.25, "record": 0.02, "export": 0.1}
    with transaction(session_factory) as session:
        session.execute(update(Job).where(Job.id == job_id).values(timings=timings))
    response = client.get(f"/api/v1/jobs/{job_id}")
    assert response.status_code == 200
    assert response.json()["timings"] == timings
