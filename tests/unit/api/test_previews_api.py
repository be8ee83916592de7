"""GET /api/v1/jobs/{job_id}/preview.png against a real database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.store import queries
from infergate.store.session import transaction
from infergate.store.tables import JobPreview, JobState
from service.api.app import create_app
from tests.helpers.queues import RecordingQueue

STUDY = "1.2.826.0.1.3680043.8.498.500"
SERIES = "1.2.826.0.1.3680043.8.498.501"
PNG = b"\x89PNG\r\n\x1a\n not decoded by the route"


@pytest.fixture
def client(db_settings: Settings, session_factory: sessionmaker[Session]) -> Iterator[TestClient]:
    with TestClient(create_app(db_settings, session_factory, queue=RecordingQueue())) as test_client:
        yield test_client


def _job(factory: sessionmaker[Session], state: JobState, preview: bytes | None = None) -> int:
    with transaction(factory) as session:
        study_id = queries.get_or_create_study(session, STUDY)
        series_id = queries.get_or_create_series(session, study_id, SERIES, modality="CT")
        job_id = queries.create_job(session, series_id, "ct-tissue-seg", "2.0.0")
        assert job_id is not None
        queries.set_job_state(session, job_id, state, None)
        if preview is not None:
            session.add(JobPreview(job_id=job_id, png=preview, slice_index=3))
    return job_id


def test_preview_is_served_as_png_and_not_cached(client: TestClient, session_factory: sessionmaker[Session]) -> None:
    job_id = _job(session_factory, JobState.done, PNG)
    response = client.get(f"/api/v1/jobs/{job_id}/preview.png")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["cache-control"] == "no-store"
    assert response.content == PNG
    detail = client.get(f"/api/v1/jobs/{job_id}").json()
    assert detail["preview_url"] == f"http://testserver/api/v1/jobs/{job_id}/preview.png"
    results = client.get(f"/api/v1/studies/{STUDY}/results").json()
    assert results["series"][0]["jobs"][0]["preview_url"] == detail["preview_url"]


def test_job_without_preview_has_no_preview_url(client: TestClient, session_factory: sessionmaker[Session]) -> None:
    job_id = _job(session_factory, JobState.done)
    assert client.get(f"/api/v1/jobs/{job_id}").json()["preview_url"] is None


def test_unknown_job_is_404(client: TestClient) -> None:
    response = client.get("/api/v1/jobs/999999/preview.png")
    assert response.status_code == 404
    assert response.json()["detail"] == "Job 999999 does not exist."


@pytest.mark.parametrize("state", [JobState.queued, JobState.running, JobState.failed, JobState.cancelled])
def test_unfinished_job_is_404_saying_so(
    client: TestClient, session_factory: sessionmaker[Session], state: JobState
) -> None:
    job_id = _job(session_factory, state)
    response = client.get(f"/api/v1/jobs/{job_id}/preview.png")
    assert response.status_code == 404
    assert f"it is {state.value}" in response.json()["detail"]


def test_finished_job_without_preview_is_404_saying_why(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    job_id = _job(session_factory, JobState.done)
    response = client.get(f"/api/v1/jobs/{job_id}/preview.png")
    assert response.status_code == 404
    assert "reads no image" in response.json()["detail"]


def test_job_id_is_validated(client: TestClient) -> None:
    assert client.get("/api/v1/jobs/0/preview.png").status_code == 422
