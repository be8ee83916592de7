"""The REST API against a real database (service.api)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from infergate import __version__
from infergate.config import Settings
from infergate.manifest import load_all
from infergate.store import queries
from infergate.store.session import transaction
from infergate.store.tables import (
    Export,
    ExportState,
    Finding,
    JobState,
    Measurement,
    ResultObject,
    Series,
    SeriesState,
    utcnow,
)
from service.api.app import create_app

STUDY = "1.2.826.0.1.3680043.8.498.300"
SERIES = "1.2.826.0.1.3680043.8.498.301"
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.310"
SEG_UID = "2.25.1001"
SR_UID = "2.25.1002"


@pytest.fixture
def client(db_settings: Settings, session_factory: sessionmaker[Session]) -> Iterator[TestClient]:
    with TestClient(create_app(db_settings, session_factory)) as test_client:
        yield test_client


def _job_with_results(factory: sessionmaker[Session]) -> int:
    """A finished job of a routed series, with a finding, a measurement, SEG and SR and their exports."""
    with transaction(factory) as session:
        study_id = queries.get_or_create_study(session, STUDY)
        series_id = queries.get_or_create_series(
            session, study_id, SERIES, modality="CT", series_description="Chest"
        )
        series = session.get(Series, series_id)
        assert series is not None
        series.num_instances, series.state, series.routing_note = 20, SeriesState.routed, "matched CT volume"
        job_id = queries.create_job(session, series_id, "ct-tissue-seg", "1.0.0")
        assert job_id is not None
        queries.claim_job(session, job_id, timedelta(minutes=15))
        queries.set_job_state(session, job_id, JobState.done)
        session.add(
            Finding(
                job_id=job_id,
                name="Bone",
                code_value="272673000",
                code_scheme="SCT",
                code_meaning="Bone",
                probability=0.875,
                positive=True,
            )
        )
        session.add(
            Measurement(
                job_id=job_id, segment_number=2, segment_label="Bone", name="volume", value=12.5, unit="mL"
            )
        )
        seg = ResultObject(
            job_id=job_id,
            kind="SEG",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
            sop_instance_uid=SEG_UID,
            series_instance_uid="2.25.2001",
            path=f"results/{job_id}/SEG-{SEG_UID}.dcm",
        )
        seg.exports.append(
            Export(
                destination="ORTHANC@127.0.0.1:4242",
                state=ExportState.done,
                attempts=1,
                last_status=0,
                delivered_at=utcnow(),
            )
        )
        sr = ResultObject(
            job_id=job_id,
            kind="SR",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
            sop_instance_uid=SR_UID,
            series_instance_uid="2.25.2002",
            path=f"results/{job_id}/SR-{SR_UID}.dcm",
        )
        sr.exports.append(
            Export(
                destination="ORTHANC@127.0.0.1:4242",
                state=ExportState.failed,
                attempts=8,
                last_status=0xA700,
                last_error="out of resources",
            )
        )
        session.add_all([seg, sr])
    return job_id


def _queued_job(factory: sessionmaker[Session], study_uid: str, series_uid: str, model_id: str) -> int:
    with transaction(factory) as session:
        study_id = queries.get_or_create_study(session, study_uid)
        series_id = queries.get_or_create_series(session, study_id, series_uid, modality="CT")
        job_id = queries.create_job(session, series_id, model_id, None)
    assert job_id is not None
    return job_id


def test_health(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "version": __version__}


def test_no_jobs(client: TestClient) -> None:
    response = client.get("/api/v1/jobs")
    assert response.status_code == 200
    assert response.json() == {"items": [], "limit": 100, "offset": 0}


def test_job_list_and_detail(client: TestClient, session_factory: sessionmaker[Session]) -> None:
    job_id = _job_with_results(session_factory)

    items = client.get("/api/v1/jobs").json()["items"]
    assert len(items) == 1
    summary = items[0]
    assert summary["id"] == job_id
    assert summary["model_id"] == "ct-tissue-seg" and summary["model_version"] == "1.0.0"
    assert summary["state"] == "done" and summary["attempts"] == 1 and summary["error"] is None
    assert (summary["study_instance_uid"], summary["series_instance_uid"]) == (STUDY, SERIES)
    assert "findings" not in summary
    for name in ("created_at", "started_at", "finished_at"):
        assert datetime.fromisoformat(summary[name]).utcoffset() == timedelta(0), f"{name} should be UTC"

    response = client.get(f"/api/v1/jobs/{job_id}")
    assert response.status_code == 200
    detail = response.json()
    assert {k: detail[k] for k in summary} == summary
    assert detail["findings"] == [
        {
            "name": "Bone",
            "code_value": "272673000",
            "code_scheme": "SCT",
            "code_meaning": "Bone",
            "probability": 0.875,
            "positive": True,
        }
    ]
    assert detail["measurements"] == [
        {"segment_number": 2, "segment_label": "Bone", "name": "volume", "value": 12.5, "unit": "mL"}
    ]
    objects = {o["kind"]: o for o in detail["result_objects"]}
    assert objects["SEG"]["sop_instance_uid"] == SEG_UID and objects["SR"]["sop_instance_uid"] == SR_UID
    assert "path" not in objects["SEG"], "storage paths stay inside the node"
    seg_url = f"http://testserver/dicomweb/studies/{STUDY}/series/2.25.2001/instances/{SEG_UID}"
    assert objects["SEG"]["study_instance_uid"] == STUDY
    assert objects["SEG"]["retrieve_url"] == seg_url and objects["SEG"]["metadata_url"] == seg_url + "/metadata"
    (seg_export,) = objects["SEG"]["exports"]
    assert seg_export["destination"] == "ORTHANC@127.0.0.1:4242"
    assert seg_export["state"] == "done" and seg_export["delivered_at"] is not None
    (sr_export,) = objects["SR"]["exports"]
    assert (sr_export["state"], sr_export["attempts"], sr_export["last_status"], sr_export["last_error"]) == (
        "failed",
        8,
        0xA700,
        "out of resources",
    )


def test_unknown_job_is_404(client: TestClient) -> None:
    response = client.get("/api/v1/jobs/999")
    assert response.status_code == 404
    assert response.json() == {"detail": "Job 999 does not exist."}


def test_job_id_must_be_an_integer(client: TestClient) -> None:
    assert client.get("/api/v1/jobs/abc").status_code == 422


def test_job_filters(client: TestClient, session_factory: sessionmaker[Session]) -> None:
    done = _job_with_results(session_factory)
    queued_seg = _queued_job(session_factory, OTHER_STUDY, OTHER_STUDY + ".1", "ct-tissue-seg")
    queued_cls = _queued_job(session_factory, OTHER_STUDY, OTHER_STUDY + ".1", "ct-bone-classifier")

    def ids(**params: str | int) -> list[int]:
        response = client.get("/api/v1/jobs", params=params)
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    assert ids() == [queued_cls, queued_seg, done]
    assert ids(state="done") == [done]
    assert ids(state="queued") == [queued_cls, queued_seg]
    assert ids(state="failed") == []
    assert ids(model_id="ct-tissue-seg") == [queued_seg, done]
    assert ids(study_instance_uid=STUDY) == [done]
    assert ids(study_instance_uid=OTHER_STUDY, model_id="ct-bone-classifier") == [queued_cls]
    assert ids(study_instance_uid="1.2.3.4") == []
    assert ids(limit=1) == [queued_cls]
    assert ids(limit=2, offset=1) == [queued_seg, done]


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"state": "sleeping"}, 422),
        ({"limit": 0}, 422),
        ({"limit": 1001}, 422),
        ({"offset": -1}, 422),
        ({"study_instance_uid": "abc"}, 422),
        ({"study_instance_uid": "1..2"}, 422),
    ],
)
def test_bad_job_filters(client: TestClient, params: dict[str, str | int], status: int) -> None:
    response = client.get("/api/v1/jobs", params=params)
    assert response.status_code == status
    assert response.json()["detail"]


def test_study_results(client: TestClient, session_factory: sessionmaker[Session]) -> None:
    job_id = _job_with_results(session_factory)
    response = client.get(f"/api/v1/studies/{STUDY}/results")
    assert response.status_code == 200
    body = response.json()
    assert body["study_instance_uid"] == STUDY
    (series,) = body["series"]
    assert series["series_instance_uid"] == SERIES
    assert (series["modality"], series["series_description"], series["num_instances"]) == ("CT", "Chest", 20)
    assert (series["state"], series["routing_note"]) == ("routed", "matched CT volume")
    (job,) = series["jobs"]
    assert job == client.get(f"/api/v1/jobs/{job_id}").json()


def test_unknown_study_is_404(client: TestClient) -> None:
    response = client.get("/api/v1/studies/1.2.3.4/results")
    assert response.status_code == 404
    assert response.json()["detail"]


@pytest.mark.parametrize("uid", ["abc", "1..2", "1.02", "1.2.", "1." + "2" * 64, "1.2%20"])
def test_malformed_study_uid_is_refused_by_the_schema(client: TestClient, uid: str) -> None:
    """The UID grammar is part of the OpenAPI document, so FastAPI answers 422 naming the parameter."""
    response = client.get(f"/api/v1/studies/{uid}/results")
    assert response.status_code == 422
    assert "study_instance_uid" in str(response.json()["detail"])


def test_models(client: TestClient, db_settings: Settings) -> None:
    response = client.get("/api/v1/models")
    assert response.status_code == 200
    models = {m["id"]: m for m in response.json()}
    installed = load_all(db_settings.models_dir, verify_hash=False)
    assert set(models) == set(installed)
    for model_id, package in installed.items():
        manifest = package.manifest
        out = models[model_id]
        assert (out["version"], out["task"], out["sha256"]) == (
            manifest.version,
            manifest.task,
            manifest.sha256,
        )
        assert out["modalities"] == manifest.accepts.modalities
        assert [s["value"] for s in out["labels"]] == [label.value for label in manifest.labels]
        assert [c["index"] for c in out["classes"]] == [c.index for c in manifest.classes]


def test_models_empty_folder(
    make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    empty = tmp_path / "no-models"
    empty.mkdir()
    with TestClient(create_app(make_settings(models_dir=empty), session_factory)) as test_client:
        assert test_client.get("/api/v1/models").json() == []


def test_result_links_use_the_public_base_url(
    db_settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """Behind a proxy the links name the address clients reach, not the Host the proxy sent."""
    job_id = _job_with_results(session_factory)
    settings = db_settings.model_copy(update={"public_base_url": "https://ai.example.org:8443/infergate"})
    with TestClient(create_app(settings, session_factory)) as client:
        detail = client.get(f"/api/v1/jobs/{job_id}").json()
        results = client.get(f"/api/v1/studies/{STUDY}/results").json()
    urls = {o["kind"]: o["retrieve_url"] for o in detail["result_objects"]}
    assert urls["SR"] == f"https://ai.example.org:8443/infergate/dicomweb/studies/{STUDY}/series/2.25.2002/instances/{SR_UID}"
    assert results["series"][0]["jobs"][0]["result_objects"][0]["retrieve_url"].startswith("https://ai.example.org:8443/")


def test_cors_only_for_named_origins(db_settings: Settings, session_factory: sessionmaker[Session]) -> None:
    settings = db_settings.model_copy(update={"cors_origins": ["http://viewer.example.org:3000"]})
    with TestClient(create_app(settings, session_factory)) as client:
        preflight = client.options(
            "/dicomweb/studies",
            headers={
                "Origin": "http://viewer.example.org:3000",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://viewer.example.org:3000"
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        response = client.get("/dicomweb/studies", headers={"Origin": "http://viewer.example.org:3000"})
        assert response.headers["access-control-allow-origin"] == "http://viewer.example.org:3000"
        assert "warning" in response.headers["access-control-expose-headers"].lower()
        other = client.get("/dicomweb/studies", headers={"Origin": "http://elsewhere.example.org"})
        assert "access-control-allow-origin" not in other.headers
    with TestClient(create_app(db_settings, session_factory)) as client:
        response = client.get("/dicomweb/studies", headers={"Origin": "http://viewer.example.org:3000"})
        assert "access-control-allow-origin" not in response.headers, "no CORS unless configured"
