"""What the REST API and DICOMweb answer for what retention removed: 410 Gone, and purged_at in the JSON."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.retention import run_cleanup
from infergate.store.tables import utcnow
from service.api.app import create_app
from tests.helpers.held import HeldJob, HeldSeries, add_job, receive_series
from tests.helpers.queues import RecordingQueue

pytestmark = pytest.mark.timeout(120)

DICOM = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}


@pytest.fixture
def client(db_settings: Settings, session_factory: sessionmaker[Session]) -> Iterator[TestClient]:
    with TestClient(create_app(db_settings, session_factory, queue=RecordingQueue())) as test_client:
        yield test_client


@pytest.fixture
def held(db_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path) -> tuple[HeldSeries, HeldJob]:
    series = receive_series(session_factory, db_settings.data_path, tmp_path)
    return series, add_job(session_factory, db_settings.data_path, series)


def _purge(db_settings: Settings, factory: sessionmaker[Session]) -> None:
    before = utcnow() - timedelta(days=30)
    report = run_cleanup(factory, db_settings.data_path, inputs_before=before, results_before=before)
    assert report.series and report.jobs


def test_removed_results_and_inputs_answer_410_and_the_job_says_when(
    client: TestClient,
    db_settings: Settings,
    session_factory: sessionmaker[Session],
    held: tuple[HeldSeries, HeldJob],
) -> None:
    series, job = held
    before = client.get(f"/api/v1/jobs/{job.id}").json()
    result = before["result_objects"][0]
    assert result["purged_at"] is None and before["input_purged_at"] is None and before["preview_url"]
    assert client.get(result["retrieve_url"], headers=DICOM).status_code == 200
    qido = client.get("/dicomweb/studies", params={"StudyInstanceUID": series.study_uid})
    assert len(qido.json()) == 1

    _purge(db_settings, session_factory)

    after = client.get(f"/api/v1/jobs/{job.id}")
    assert after.status_code == 200
    body = after.json()
    result = body["result_objects"][0]
    assert result["purged_at"] is not None and body["input_purged_at"] is not None
    assert result["sop_instance_uid"] == job.sop_instance_uid and result["exports"][0]["state"] == "done"
    assert body["findings"] and body["measurements"] and body["preview_url"] is None
    for url in (result["retrieve_url"], result["metadata_url"]):
        gone = client.get(url, headers=DICOM if url == result["retrieve_url"] else {})
        assert gone.status_code == 410, gone.text
        assert "retention" in gone.json()["detail"] and "result object" in gone.json()["detail"]
    seg_series = client.get(f"/dicomweb/studies/{series.study_uid}/series/{job.series_instance_uid}", headers=DICOM)
    assert seg_series.status_code == 410
    inputs = client.get(f"/dicomweb/studies/{series.study_uid}/series/{series.series_uid}", headers=DICOM)
    assert inputs.status_code == 410 and "this series" in inputs.json()["detail"]
    study = client.get(f"/dicomweb/studies/{series.study_uid}", headers=DICOM)
    assert study.status_code == 410 and "this study" in study.json()["detail"]
    preview = client.get(f"/api/v1/jobs/{job.id}/preview.png")
    assert preview.status_code == 410 and "retention" in preview.json()["detail"]
    # QIDO-RS answers what can be retrieved: nothing of this study any more
    assert client.get("/dicomweb/studies", params={"StudyInstanceUID": series.study_uid}).json() == []
    assert client.get("/dicomweb/series", params={"StudyInstanceUID": series.study_uid}).json() == []
    results = client.get(f"/api/v1/studies/{series.study_uid}/results").json()
    assert results["series"][0]["purged_at"] is not None and results["series"][0]["num_instances"] == 0
    retried = client.post(f"/api/v1/jobs/{job.id}/retry")
    assert retried.status_code == 409 and "retention" in retried.json()["detail"]


def test_what_the_node_never_held_is_still_404(
    client: TestClient, db_settings: Settings, session_factory: sessionmaker[Session], held: tuple[HeldSeries, HeldJob]
) -> None:
    series, _ = held
    _purge(db_settings, session_factory)
    unknown = client.get(f"/dicomweb/studies/{generate_uid()}", headers=DICOM)
    assert unknown.status_code == 404
    other = client.get(f"/dicomweb/studies/{series.study_uid}/series/{generate_uid()}", headers=DICOM)
    assert other.status_code == 404
