"""A remote worker's SEG/SR handed back (``PUT /api/v1/jobs/{id}/results/{kind}/{uid}``), against a real database.

The route must store exactly what the job will record, where its row will point, and refuse anything
else with a 4xx that says why: another job, a job not running (or under another attempt), a kind or
UID that could name another path, a body that is not DICOM or not this job's object, and callers
without the ``worker`` scope.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian, SegmentationStorage
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.dicom.uids import result_uids
from infergate.store import queries
from infergate.store.migrate import upgrade
from infergate.store.session import make_engine, make_session_factory, transaction
from infergate.store.tables import Job, JobState
from service.api.app import create_app
from tests.helpers.queues import RecordingQueue

pytestmark = pytest.mark.timeout(60)

STUDY = "1.2.826.0.1.3680043.8.498.700"
SERIES = "1.2.826.0.1.3680043.8.498.701"
MODEL, VERSION = "ct-tissue-seg", "1.0.0"
KEYS = {name: secrets.token_urlsafe(24) for name in ("worker", "reader", "sender", "operator")}
SCOPES = {"worker": "worker", "reader": "read", "sender": "submit", "operator": "admin"}


def _headers(name: str, content_type: str = "application/dicom") -> dict[str, str]:
    return {"X-API-Key": KEYS[name], "Content-Type": content_type}


def _part10(kind: str, *, series: str = SERIES, study: str = STUDY, sop: str | None = None, size: int = 0) -> bytes:
    """A minimal Part 10 object with the UIDs a job on ``series`` derives for ``kind`` (unless overridden)."""
    series_uid, instance_uid = result_uids(series, MODEL, VERSION, kind)
    ds = Dataset()
    ds.SOPClassUID = SegmentationStorage if kind == "SEG" else Comprehensive3DSRStorage
    ds.SOPInstanceUID = sop or instance_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyInstanceUID = study
    ds.Modality = kind
    if kind == "SEG":  # two binary 8 x 8 frames (PS3.3 C.8.20.2)
        ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = 8, 8, 2, 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = b"\x0f" * 16
    if size:
        ds.EncapsulatedDocument = b"\0" * size  # bulk, so that the body passes the JSON routes' 1 MiB limit
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _name(kind: str) -> str:
    """The request path's ``{kind}/{sop_instance_uid}`` for the job's result of ``kind``."""
    return f"{kind}/{result_uids(SERIES, MODEL, VERSION, kind)[1]}"


def _file(kind: str) -> str:
    return f"{kind}-{result_uids(SERIES, MODEL, VERSION, kind)[1]}.dcm"


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    keys = ",".join(f"{n}:{hashlib.sha256(k.encode()).hexdigest()}:{SCOPES[n]}" for n, k in KEYS.items())
    return make_settings(api_keys=keys)


@pytest.fixture
def factory(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings)
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def client(settings: Settings, factory: sessionmaker[Session]) -> Iterator[TestClient]:
    with TestClient(create_app(settings, factory, queue=RecordingQueue())) as test_client:
        yield test_client


@pytest.fixture
def job_id(factory: sessionmaker[Session]) -> int:
    """A ct-tissue-seg job on SERIES, running its first attempt."""
    with transaction(factory) as session:
        study_id = queries.get_or_create_study(session, STUDY)
        series_id = queries.get_or_create_series(session, study_id, SERIES, modality="CT")
        new = queries.create_job(session, series_id, MODEL, VERSION)
        assert new is not None
        job = session.get(Job, new)
        assert job is not None
        job.state, job.attempts = JobState.running, 1
    return new


def _put(client: TestClient, job: int, name: str, body: bytes, key: str = "worker", **params: str) -> tuple[int, str]:
    query = {"model_version": VERSION, "attempt": "1", **params}
    response = client.put(f"/api/v1/jobs/{job}/results/{name}", content=body, headers=_headers(key), params=query)
    detail = response.json().get("detail", "") if response.content else ""
    return response.status_code, str(detail)


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.dcm")}


@pytest.mark.parametrize("kind", ["SEG", "SR"])
def test_a_worker_result_is_stored_where_the_job_row_will_point(
    client: TestClient, settings: Settings, job_id: int, kind: str
) -> None:
    body = _part10(kind, size=2 * 1024 * 1024)  # more than the JSON routes' 1 MiB: a SEG may be large
    assert _put(client, job_id, _name(kind), body) == (204, "")
    stored = settings.data_path / "results" / str(job_id) / _file(kind)
    assert stored.read_bytes() == body
    # a rerun yields the same UIDs, so the same name: replaced, not refused
    again = _part10(kind)
    assert _put(client, job_id, _name(kind), again) == (204, "")
    assert stored.read_bytes() == again


def test_admin_may_hand_a_result_back_too(client: TestClient, job_id: int) -> None:
    assert _put(client, job_id, _name("SR"), _part10("SR"), key="operator")[0] == 204


@pytest.mark.parametrize(
    ("key", "status", "message"),
    [("reader", 403, 'needs the "worker" scope'), ("sender", 403, 'needs the "worker" scope')],
)
def test_callers_without_the_worker_scope_are_refused(
    client: TestClient, settings: Settings, job_id: int, key: str, status: int, message: str
) -> None:
    code, detail = _put(client, job_id, _name("SEG"), _part10("SEG"), key=key)
    assert (code, message in detail) == (status, True)
    anonymous = client.put(f"/api/v1/jobs/{job_id}/results/{_name('SEG')}", content=_part10("SEG"))
    assert anonymous.status_code == 401 and anonymous.json()["detail"] == "Authentication is required."
    assert _files(settings.data_path) == set()


def test_the_worker_scope_reads_but_does_not_send_studies(client: TestClient, job_id: int) -> None:
    reads = client.get("/api/v1/jobs", headers={"X-API-Key": KEYS["worker"]})
    assert reads.status_code == 200
    stow = client.post(
        "/dicomweb/studies",
        content=b"--x\r\n\r\n--x--",
        headers=_headers("worker", 'multipart/related; type="application/dicom"; boundary=x'),
    )
    assert stow.status_code == 403 and 'needs the "submit" scope' in stow.json()["detail"]
    retry = client.post(f"/api/v1/jobs/{job_id}/retry", headers={"X-API-Key": KEYS["worker"]})
    assert retry.status_code == 403


def test_a_job_that_does_not_exist_or_does_not_run_is_refused(
    client: TestClient, settings: Settings, factory: sessionmaker[Session], job_id: int
) -> None:
    assert _put(client, job_id + 1, _name("SEG"), _part10("SEG")) == (404, f"Job {job_id + 1} does not exist.")
    status, detail = _put(client, job_id, _name("SEG"), _part10("SEG"), attempt="2")
    assert status == 409 and "runs attempt 1, not 2" in detail
    with transaction(factory) as session:
        queries.set_job_state(session, job_id, JobState.done)
    status, detail = _put(client, job_id, _name("SEG"), _part10("SEG"))
    assert status == 409 and "is done, not running" in detail
    assert _files(settings.data_path) == set()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("SEG/..%2F..%2Fescaped", None),
        ("SEG/..", None),  # the client already resolves the dot segment: another path
        ("SEG/%2E%2E", 'Argument "sop_instance_uid" is not a valid UID.'),
        ("SEG/1.2.3%00", 'Argument "sop_instance_uid" is not a valid UID.'),
        ("SEG/1.02.3", 'Argument "sop_instance_uid" is not a valid UID.'),  # a leading zero breaks the grammar
        ("SEG/" + "1." * 40 + "1", 'Argument "sop_instance_uid" is not a valid UID.'),  # longer than 64
        ("..%2F..%2Fescaped/1.2.3", None),
        ("PR/1.2.3", 'Argument "kind" should be SEG or SR.'),
        ("..%2FSEG/1.2.3", None),
    ],
)
def test_a_kind_or_uid_that_names_no_result_is_refused(
    client: TestClient, settings: Settings, job_id: int, name: str, message: str | None
) -> None:
    status, detail = _put(client, job_id, name, _part10("SEG"))
    assert 400 <= status < 500 and detail, (status, detail)
    if message is not None:  # else a slash made it another path: no route (404)
        assert (status, detail) == (400, message)
    assert _files(settings.data_path.parent) == set()  # nothing written, inside the data folder or beside it


def test_a_body_that_is_not_this_jobs_object_is_refused(client: TestClient, settings: Settings, job_id: int) -> None:
    seg = _name("SEG")
    assert _put(client, job_id, seg, b"") == (
        400,
        "The request body is empty; send the result as a DICOM Part 10 file.",
    )
    status, detail = _put(client, job_id, seg, b"not DICOM at all " * 20)
    assert status == 400 and "not a readable DICOM Part 10 file" in detail
    status, detail = _put(client, job_id, seg, _part10("SEG")[:-6])  # truncated in its Pixel Data
    assert status == 400 and "Pixel Data holds 10 bytes, fewer than the 16 its frames need" in detail
    status, detail = _put(client, job_id, seg, _part10("SR"))  # an SR under a SEG's name
    assert status == 400 and "should have SOP Class UID 1.2.840.10008.5.1.4.1.1.66.4" in detail
    forged = "1.2.826.0.1.3680043.8.498.799"
    status, detail = _put(client, job_id, f"SEG/{forged}", _part10("SEG", sop=forged))
    assert status == 400 and "SOPInstanceUID does not match the UID derived from the job" in detail
    status, detail = _put(client, job_id, seg, _part10("SEG"), model_version="9.9")
    assert status == 400 and "does not match the UID derived from the job and model version" in detail
    status, detail = _put(client, job_id, seg, _part10("SEG", study="1.2.826.0.1.3680043.8.498.798"))
    assert status == 400 and "StudyInstanceUID does not match the job's study" in detail
    other = "1.2.826.0.1.3680043.8.498.797"
    status, detail = _put(client, job_id, seg, _part10("SEG", series=other))  # another series' result
    assert status == 400 and "does not match" in detail
    response = client.put(
        f"/api/v1/jobs/{job_id}/results/{seg}",
        content=_part10("SEG"),
        headers=_headers("worker", "text/plain"),
        params={"model_version": VERSION, "attempt": "1"},
    )
    assert response.status_code == 415 and "application/dicom" in response.json()["detail"]
    assert _files(settings.data_path) == set()
