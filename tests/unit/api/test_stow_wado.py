"""STOW-RS and WADO-RS over HTTP against SQLite and PostgreSQL (service.api.routes.dicomweb_stow/_wado).

Instances come from ``tests/data/make_series.py``: a small uncompressed CT series and an RLE one.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.dicom.storage import instance_relpath
from infergate.dicomweb.multipart import build_multipart, multipart_content_type, parse_multipart
from infergate.store import queries
from infergate.store.tables import Instance, Series, SeriesState, utcnow
from service.api.app import create_app
from tests.data.make_series import SeriesInfo, write_ct_series

EXPLICIT = "1.2.840.10008.1.2.1"
RLE = "1.2.840.10008.1.2.5"
DICOM_JSON = "application/dicom+json"
ACCEPT_DICOM = 'multipart/related; type="application/dicom"'
ACCEPT_OCTETS = f'multipart/related; type="application/octet-stream"; transfer-syntax={EXPLICIT}'
# Store Instances Response Module tags (PS3.18 Table I.1-1)
RETRIEVE_URL, FAILED, REFERENCED, REASON, SOP_UID = "00081190", "00081198", "00081199", "00081197", "00081155"


@pytest.fixture
def client(db_settings: Settings, session_factory: sessionmaker[Session]) -> Iterator[TestClient]:
    with TestClient(create_app(db_settings, session_factory)) as test_client:
        yield test_client


@pytest.fixture
def ct(tmp_path: Path) -> SeriesInfo:
    return write_ct_series(tmp_path / "ct", slices=3, size=16, seed=11)


@pytest.fixture
def rle(tmp_path: Path) -> SeriesInfo:
    return write_ct_series(tmp_path / "rle", slices=2, size=16, seed=12, transfer_syntax=RLE)


def _part10(ds: Dataset) -> bytes:
    """The dataset as read, meta included as it is (no syncing of the meta UIDs with the dataset)."""
    out = BytesIO()
    dcmwrite(out, ds)
    return out.getvalue()


def _stow(client: TestClient, files: list[bytes], url: str = "/dicomweb/studies", **headers: str) -> Any:
    """POST ``files`` as one multipart/related; type="application/dicom" body, with extra headers."""
    body, boundary = build_multipart([("application/dicom", f) for f in files])
    content_type = multipart_content_type("application/dicom", boundary)
    return client.post(url, content=body, headers={"Content-Type": content_type, **headers})


def _reasons(body: dict[str, Any]) -> list[int]:
    return [item[REASON]["Value"][0] for item in body.get(FAILED, {}).get("Value", [])]


def _stored_uids(body: dict[str, Any]) -> list[str]:
    return [item[SOP_UID]["Value"][0] for item in body.get(REFERENCED, {}).get("Value", [])]


def _instance_url(info: SeriesInfo, index: int = 0) -> str:
    return f"/dicomweb/studies/{info.study_uid}/series/{info.series_uid}/instances/{info.sop_instance_uids[index]}"


def _parts(response: Any) -> list[tuple[str, bytes]]:
    return [
        (m.essence + f";{m.param('transfer-syntax')}", c)
        for m, c in parse_multipart(response.content, response.headers["content-type"])
    ]


# STOW-RS ----------------------------------------------------------------------------------------------------


def test_store_indexes_like_the_scp(
    client: TestClient, ct: SeriesInfo, db_settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    response = _stow(client, [p.read_bytes() for p in ct.paths])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == DICOM_JSON
    body = response.json()
    assert body[RETRIEVE_URL]["Value"] == [f"http://testserver/dicomweb/studies/{ct.study_uid}"]
    assert _stored_uids(body) == ct.sop_instance_uids and FAILED not in body
    first = body[REFERENCED]["Value"][0]
    assert first[RETRIEVE_URL]["Value"] == ["http://testserver" + _instance_url(ct)]
    with session_factory() as session:
        series = session.scalars(select(Series).where(Series.series_instance_uid == ct.series_uid)).one()
        assert (series.num_instances, series.state, series.calling_ae) == (3, SeriesState.receiving, None)
        # the watcher finds it after the quiet period: the same completion path as a C-STORE
        assert series.id in queries.quiet_series_ids(session, utcnow() + timedelta(seconds=60))
    for uid in ct.sop_instance_uids:
        assert (db_settings.data_path / instance_relpath(ct.study_uid, ct.series_uid, uid)).is_file()

    again = _stow(client, [ct.paths[0].read_bytes()])
    assert again.status_code == 200 and _stored_uids(again.json()) == ct.sop_instance_uids[:1], "duplicate = success"
    with session_factory() as session:
        assert session.scalar(select(func.count(Instance.id))) == 3


def test_partial_failure_is_202_with_reasons(
    client: TestClient, ct: SeriesInfo, db_settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    mismatched = dcmread(ct.paths[1])
    mismatched.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    hostile = dcmread(ct.paths[2])
    hostile.StudyInstanceUID = "../../../etc"
    other_class = dcmread(ct.paths[2])
    other_class.SOPClassUID = other_class.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.2"
    other_syntax = dcmread(ct.paths[2])
    other_syntax.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.2"  # Explicit VR Big Endian: retired
    no_meta_class = dcmread(ct.paths[2])
    del no_meta_class.file_meta.MediaStorageSOPClassUID
    big_endian = BytesIO()
    dcmwrite(big_endian, other_syntax, implicit_vr=False, little_endian=False, force_encoding=True)
    files = [
        ct.paths[0].read_bytes(),
        b"not DICOM at all",
        _part10(mismatched),
        _part10(hostile),
        _part10(other_class),
        big_endian.getvalue(),
        _part10(no_meta_class),
    ]
    response = _stow(client, files)
    assert response.status_code == 202, response.text
    body = response.json()
    assert _stored_uids(body) == ct.sop_instance_uids[:1]
    assert _reasons(body) == [0xC000, 0xA900, 0xC000, 0x0122, 0xC122, 0xC000]
    failed = body[FAILED]["Value"]
    assert failed[0]["00081150"] == {"vr": "UI"}, "an unreadable part has no UIDs to report"
    assert failed[1][SOP_UID]["Value"] == ["1.2.3.4"]
    with session_factory() as session:
        assert session.scalar(select(func.count(Instance.id))) == 1
    stored_studies = [p.name for p in (db_settings.data_path / "instances").iterdir()]
    assert stored_studies == [ct.study_uid], "a hostile UID never names a path"


def test_all_failed_is_409(client: TestClient) -> None:
    response = _stow(client, [b"junk", b"more junk"])
    assert response.status_code == 409
    assert _reasons(response.json()) == [0xC000, 0xC000] and REFERENCED not in response.json()


def test_study_scoped_store_refuses_other_studies(client: TestClient, ct: SeriesInfo) -> None:
    response = _stow(client, [ct.paths[0].read_bytes()], url="/dicomweb/studies/1.2.826.0.1.3680043.8.498.9")
    assert response.status_code == 409 and _reasons(response.json()) == [0xA900]
    ok = _stow(client, [ct.paths[0].read_bytes()], url=f"/dicomweb/studies/{ct.study_uid}")
    assert ok.status_code == 200, ok.text
    assert _stow(client, [], url="/dicomweb/studies/1..2").status_code == 400


def test_preamble_is_zeroed(client: TestClient, ct: SeriesInfo) -> None:
    data = bytearray(ct.paths[0].read_bytes())
    data[:4] = b"MZ\x90\x00"
    assert _stow(client, [bytes(data)]).status_code == 200
    ((_, stored),) = _parts(client.get(_instance_url(ct), headers={"Accept": ACCEPT_DICOM}))
    assert stored[:128] == bytes(128) and stored[128:] == bytes(data[128:])


@pytest.mark.parametrize(
    "content_type",
    [
        "application/dicom",
        'multipart/related; type="application/dicom+json"; boundary=b',
        "multipart/related; boundary=b",
        "multipart/form-data; boundary=b",
        None,
    ],
)
def test_unsupported_media_type_is_415(client: TestClient, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/dicomweb/studies", content=b"--b\r\n\r\nx\r\n--b--", headers=headers)
    assert response.status_code == 415, response.text
    assert "application/dicom" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"--b\r\n\r\nx\r\n--b--", 'multipart/related; type="application/dicom"'),  # no boundary
        (
            b"--b\r\nContent-Type: application/dicom\r\n\r\ntruncated",
            'multipart/related; type="application/dicom"; boundary=b',
        ),
        (b"", 'multipart/related; type="application/dicom"; boundary=b'),
        (b"--b--\r\n", 'multipart/related; type="application/dicom"; boundary=b'),
        (b"x", 'multipart/related; type="application/dicom"; boundary="unterminated'),
    ],
)
def test_malformed_body_is_400(client: TestClient, body: bytes, content_type: str) -> None:
    response = client.post("/dicomweb/studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 400, response.text
    assert response.json()["detail"]


def test_limits_are_413(db_settings: Settings, session_factory: sessionmaker[Session], ct: SeriesInfo) -> None:
    files = [p.read_bytes() for p in ct.paths]
    small = db_settings.model_copy(
        update={"dicomweb_max_upload_bytes": sum(map(len, files)) + 1000, "dicomweb_max_instances": 2}
    )
    with TestClient(create_app(small, session_factory)) as client:
        too_many = _stow(client, files[:3])
        assert too_many.status_code == 413 and "more than 2 parts" in too_many.json()["detail"]
        too_big = _stow(client, files[:2] + [files[2] + files[2]])
        assert too_big.status_code == 413, "declared Content-Length over the limit"
        body, boundary = build_multipart([("application/dicom", f + f) for f in files[:2]])
        chunked = client.post(
            "/dicomweb/studies",
            content=iter([body[:1000], body[1000:]]),  # no Content-Length: counted while it arrives
            headers={"Content-Type": multipart_content_type("application/dicom", boundary)},
        )
        assert chunked.status_code == 413
    with session_factory() as session:
        assert session.scalar(select(func.count(Instance.id))) == 0, "nothing stored from a refused request"


def test_store_not_acceptable(client: TestClient, ct: SeriesInfo) -> None:
    response = _stow(client, [ct.paths[0].read_bytes()], Accept="application/dicom+xml")
    assert response.status_code == 406


# WADO-RS ----------------------------------------------------------------------------------------------------


@pytest.fixture
def held(client: TestClient, ct: SeriesInfo, rle: SeriesInfo) -> tuple[SeriesInfo, SeriesInfo]:
    response = _stow(client, [p.read_bytes() for p in ct.paths + rle.paths])
    assert response.status_code == 200, response.text
    return ct, rle


def test_retrieve_instance_round_trip(client: TestClient, held: tuple[SeriesInfo, SeriesInfo]) -> None:
    ct, _ = held
    for accept in (ACCEPT_DICOM, f"{ACCEPT_DICOM}; transfer-syntax=*", "*/*", None):
        response = client.get(_instance_url(ct, 1), headers={"Accept": accept} if accept else {})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith(f"{ACCEPT_DICOM}; boundary=")
        assert _parts(response) == [(f"application/dicom;{EXPLICIT}", ct.paths[1].read_bytes())]


def test_retrieve_series_and_study(client: TestClient, held: tuple[SeriesInfo, SeriesInfo]) -> None:
    ct, rle = held
    series = _parts(client.get(f"/dicomweb/studies/{ct.study_uid}/series/{ct.series_uid}"))
    assert [content for _, content in series] == [p.read_bytes() for p in ct.paths], "instance order"
    study = client.get(f"/dicomweb/studies/{rle.study_uid}", headers={"Accept": f"{ACCEPT_DICOM}; transfer-syntax=*"})
    assert [content for _, content in _parts(study)] == [p.read_bytes() for p in rle.paths], "as stored"


def test_compressed_instance_is_decoded_by_default(client: TestClient, held: tuple[SeriesInfo, SeriesInfo]) -> None:
    _, rle = held
    ((kind, content),) = _parts(client.get(_instance_url(rle), headers={"Accept": ACCEPT_DICOM}))
    assert kind == f"application/dicom;{EXPLICIT}"
    decoded, original = dcmread(BytesIO(content)), dcmread(rle.paths[0])
    assert decoded.file_meta.TransferSyntaxUID == EXPLICIT and decoded.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(decoded.pixel_array, original.pixel_array)
    not_offered = client.get(
        _instance_url(rle), headers={"Accept": f"{ACCEPT_DICOM}; transfer-syntax=1.2.840.10008.1.2.4.80"}
    )
    assert not_offered.status_code == 406 and RLE in not_offered.json()["detail"]


def test_metadata(client: TestClient, held: tuple[SeriesInfo, SeriesInfo]) -> None:
    ct, rle = held
    response = client.get(_instance_url(ct) + "/metadata")
    assert response.status_code == 200 and response.headers["content-type"] == DICOM_JSON
    (meta,) = response.json()
    assert meta["00080018"]["Value"] == [ct.sop_instance_uids[0]]
    assert meta["00100010"]["Value"] == [{"Alphabetic": "Phantom^CT"}]
    assert meta["00083002"]["Value"] == [EXPLICIT], "Available Transfer Syntax UID"
    pixel = meta["7FE00010"]
    assert set(pixel) == {"vr", "BulkDataURI"} and pixel["vr"] == "OW"
    assert pixel["BulkDataURI"] == "http://testserver" + _instance_url(ct) + "/bulkdata/7FE00010"
    bulk = client.get(pixel["BulkDataURI"], headers={"Accept": ACCEPT_OCTETS})
    assert _parts(bulk) == [(f"application/octet-stream;{EXPLICIT}", dcmread(ct.paths[0]).PixelData)]
    assert list(meta) == sorted(meta)

    series = client.get(f"/dicomweb/studies/{ct.study_uid}/series/{ct.series_uid}/metadata").json()
    assert [m["00080018"]["Value"][0] for m in series] == ct.sop_instance_uids
    study = client.get(f"/dicomweb/studies/{rle.study_uid}/metadata", headers={"Accept": "application/json"})
    assert study.headers["content-type"] == "application/json" and len(study.json()) == 2
    assert study.json()[0]["7FE00010"]["vr"] == "OB"
    xml = client.get(_instance_url(ct) + "/metadata", headers={"Accept": "application/dicom+xml"})
    assert xml.status_code == 406


def test_frames_uncompressed(client: TestClient, tmp_path: Path) -> None:
    ct = write_ct_series(tmp_path / "one", slices=1, size=16, seed=13)
    ds = dcmread(ct.paths[0])
    ds.NumberOfFrames = 3
    ds.PixelData = b"".join(bytes([k]) * 512 for k in (1, 2, 3))
    assert _stow(client, [_part10(ds)]).status_code == 200
    response = client.get(_instance_url(ct) + "/frames/3,1", headers={"Accept": ACCEPT_OCTETS})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith('multipart/related; type="application/octet-stream"')
    assert _parts(response) == [
        (f"application/octet-stream;{EXPLICIT}", bytes([3]) * 512),
        (f"application/octet-stream;{EXPLICIT}", bytes([1]) * 512),
    ]
    assert client.get(_instance_url(ct) + "/frames/4").status_code == 404
    for bad in ("0", "1,,2", "a", "-1"):
        assert client.get(_instance_url(ct) + f"/frames/{bad}").status_code == 400


@pytest.mark.parametrize(
    ("syntax", "media_type", "other"),
    [
        (RLE, "image/dicom-rle", "image/jls"),
        ("1.2.840.10008.1.2.4.80", "image/jls", "image/jp2"),  # JPEG-LS lossless
        ("1.2.840.10008.1.2.4.90", "image/jp2", "image/dicom-rle"),  # JPEG 2000 lossless
    ],
)
def test_frames_compressed(client: TestClient, tmp_path: Path, syntax: str, media_type: str, other: str) -> None:
    info = write_ct_series(tmp_path / "series", slices=2, size=64, seed=14, transfer_syntax=syntax)
    assert _stow(client, [p.read_bytes() for p in info.paths]).status_code == 200
    ds = dcmread(info.paths[1])
    url = _instance_url(info, 1) + "/frames/1"
    decoded = client.get(url, headers={"Accept": ACCEPT_OCTETS})
    assert _parts(decoded) == [(f"application/octet-stream;{EXPLICIT}", ds.pixel_array.astype("<u2").tobytes())]
    stored = get_frame(ds.PixelData, 0, number_of_frames=1)
    for accept in (
        f'multipart/related; type="{media_type}"',
        'multipart/related; type="application/octet-stream"; transfer-syntax=*',
        "*/*",
    ):
        response = client.get(url, headers={"Accept": accept})
        ((kind, content),) = _parts(response)
        assert content == stored and kind.endswith(f";{syntax}"), accept
    refused = client.get(url, headers={"Accept": f'multipart/related; type="{other}"'})
    assert refused.status_code == 406 and media_type in refused.json()["detail"]
    bulk = client.get(_instance_url(info, 1) + "/bulkdata/7FE00010", headers={"Accept": ACCEPT_OCTETS})
    assert _parts(bulk) == _parts(decoded), "single-frame Pixel Data decoded = its one frame"


@pytest.mark.parametrize(
    "path",
    [
        "/dicomweb/studies/1.2.3",
        "/dicomweb/studies/1.2.3/metadata",
        "/dicomweb/studies/{study}/series/1.2.3",
        "/dicomweb/studies/{study}/series/{series}/instances/1.2.3",
        "/dicomweb/studies/{study}/series/{series}/instances/1.2.3/frames/1",
        "/dicomweb/studies/{study}/series/{series}/instances/{instance}/bulkdata/00091001",
    ],
)
def test_not_held_is_404(client: TestClient, held: tuple[SeriesInfo, SeriesInfo], path: str) -> None:
    ct, _ = held
    response = client.get(path.format(study=ct.study_uid, series=ct.series_uid, instance=ct.sop_instance_uids[0]))
    assert response.status_code == 404
    assert response.json()["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/dicomweb/studies/1..2",
        "/dicomweb/studies/1.2/series/abc/metadata",
        "/dicomweb/studies/1.2/series/1.3/instances/1.4/bulkdata/7FE0",
    ],
)
def test_malformed_is_400(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 400
