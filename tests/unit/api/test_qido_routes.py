"""QIDO-RS over HTTP against a migrated SQLite and PostgreSQL database (service.api.routes.dicomweb_qido).

Instances are ingested exactly as the SCP does (``InstanceHeader.from_dataset`` + ``ingest_instance``);
a SEG built with highdicom from them is indexed as the worker does (``index_result_object``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import uvicorn
from dicomweb_client import DICOMwebClient
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.dicom.seg import build_seg
from infergate.dicom.storage import replace_file, result_relpath
from infergate.dicom.uids import derived_uid
from infergate.ingest import InstanceHeader, index_result_object, ingest_instance
from infergate.store import queries
from infergate.store.session import transaction
from infergate.store.tables import Instance, Series, SeriesState, utcnow
from service.api.app import create_app
from tests.data.make_series import SeriesInfo, write_ct_series, write_mr_series
from tests.helpers.peers import LOOPBACK, free_port
from tests.unit.dicom.test_seg_sr import seg_manifest

DICOM_JSON = "application/dicom+json"


@dataclass(frozen=True)
class Node:
    """Two studies: A (one CT series of 3) and B (an MR series of 2 and a CT series of 2)."""

    client: TestClient
    factory: sessionmaker[Session]
    settings: Settings
    a: SeriesInfo
    b_mr: SeriesInfo
    b_ct: SeriesInfo


def _retag(info: SeriesInfo, **values: str) -> SeriesInfo:
    for path in info.paths:
        ds = dcmread(path)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
    return info


@pytest.fixture(scope="module")
def series_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[SeriesInfo, SeriesInfo, SeriesInfo]:
    root = tmp_path_factory.mktemp("qido")
    a = write_ct_series(root / "a", slices=3, size=16, seed=11, patient_id="PAT-A", patient_name="Phantom^Alpha")
    _retag(a, StudyDate="20250110", StudyTime="083000", AccessionNumber="ACC-A")
    b_mr = write_mr_series(root / "b_mr", slices=2, size=16, seed=12, patient_id="PAT-B", patient_name="Other^Beta")
    b_ct = write_ct_series(
        root / "b_ct", slices=2, size=16, seed=13, study_uid=b_mr.study_uid, series_number=5, patient_id="PAT-B"
    )
    for info in (b_mr, b_ct):
        _retag(info, StudyDate="20250220", StudyTime="141500", AccessionNumber="ACC-B", PatientName="Other^Beta")
    return a, b_mr, b_ct


def _ingest(settings: Settings, factory: sessionmaker[Session], info: SeriesInfo) -> None:
    for path in info.paths:
        ds = dcmread(path)
        header = InstanceHeader.from_dataset(
            ds,
            sop_class_uid=ds.SOPClassUID,
            sop_instance_uid=ds.SOPInstanceUID,
            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        )
        ingest_instance(factory, settings.data_path, header, path.read_bytes(), calling_ae="PACS", called_ae="NODE")


@pytest.fixture
def node(
    db_settings: Settings,
    session_factory: sessionmaker[Session],
    series_files: tuple[SeriesInfo, SeriesInfo, SeriesInfo],
) -> Iterator[Node]:
    for info in series_files:
        _ingest(db_settings, session_factory, info)
    with TestClient(create_app(db_settings, session_factory)) as client:
        yield Node(client, session_factory, db_settings, *series_files)


def _search(node: Node, path: str, params: Any = None, status: int = 200) -> list[dict[str, Any]]:
    response = node.client.get(f"/dicomweb{path}", params=params)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == DICOM_JSON
    body: list[dict[str, Any]] = response.json()
    return body


def _values(results: list[dict[str, Any]], tag: str) -> list[Any]:
    return [item[tag].get("Value", [None])[0] for item in results]


def _uids(results: list[dict[str, Any]], tag: str = "0020000D") -> list[str]:
    return _values(results, tag)


# Studies --------------------------------------------------------------------------------------------------------


def test_search_for_studies_returns_the_required_attributes(node: Node) -> None:
    results = _search(node, "/studies")
    assert _uids(results) == [node.a.study_uid, node.b_mr.study_uid]
    b = results[1]
    required = {
        "00080020": {"vr": "DA", "Value": ["20250220"]},
        "00080030": {"vr": "TM", "Value": ["141500"]},
        "00080050": {"vr": "SH", "Value": ["ACC-B"]},
        "00080061": {"vr": "CS", "Value": ["CT", "MR"]},
        "00080090": {"vr": "PN", "Value": [{"Alphabetic": "Referrer^Test"}]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Other^Beta"}]},
        "00100020": {"vr": "LO", "Value": ["PAT-B"]},
        "00100030": {"vr": "DA", "Value": ["19700101"]},
        "00100040": {"vr": "CS", "Value": ["O"]},
        "0020000D": {"vr": "UI", "Value": [node.b_mr.study_uid]},
        "00201206": {"vr": "IS", "Value": [2]},
        "00201208": {"vr": "IS", "Value": [4]},
    }
    assert {tag: b[tag] for tag in required} == required
    assert b["00200010"]["vr"] == "SH" and b["00200010"]["Value"]  # StudyID
    assert b["00081190"] == {"vr": "UR", "Value": [f"http://testserver/dicomweb/studies/{node.b_mr.study_uid}"]}


def test_match_patient_id_by_keyword_and_by_tag(node: Node) -> None:
    assert _uids(_search(node, "/studies", {"PatientID": "PAT-A"})) == [node.a.study_uid]
    assert _uids(_search(node, "/studies", {"00100020": "PAT-B"})) == [node.b_mr.study_uid]
    assert _search(node, "/studies", {"PatientID": "PAT-C"}) == []


@pytest.mark.parametrize(
    "params,expected",
    [
        ({"StudyDate": "20250101-20250131"}, ["a"]),
        ({"StudyDate": "20250201-"}, ["b"]),
        ({"StudyDate": "-20250301"}, ["a", "b"]),
        ({"StudyDate": "20250220"}, ["b"]),
        ({"StudyDate": "20240101-20241231"}, []),
        ({"StudyTime": "08-09"}, ["a"]),
        ({"StudyTime": "1415"}, ["b"]),
        ({"StudyDate": "20250101-20250331", "StudyTime": "1200-"}, ["b"]),
    ],
)
def test_match_date_and_time_ranges(node: Node, params: dict[str, str], expected: list[str]) -> None:
    uids = {"a": node.a.study_uid, "b": node.b_mr.study_uid}
    assert _uids(_search(node, "/studies", params)) == [uids[key] for key in expected]


def test_match_modalities_in_study(node: Node) -> None:
    assert _uids(_search(node, "/studies", {"ModalitiesInStudy": "MR"})) == [node.b_mr.study_uid]
    assert len(_search(node, "/studies", {"ModalitiesInStudy": "CT"})) == 2
    assert len(_search(node, "/studies", {"ModalitiesInStudy": "SEG,MR"})) == 1
    assert _search(node, "/studies", {"ModalitiesInStudy": "US"}) == []


def test_wildcards_fold_case_for_person_names_only(node: Node) -> None:
    assert _uids(_search(node, "/studies", {"PatientName": "phantom*"})) == [node.a.study_uid]
    assert _uids(_search(node, "/studies", {"PatientName": "*BETA"})) == [node.b_mr.study_uid]
    assert _uids(_search(node, "/studies", {"PatientName": "Ot?er^Beta"})) == [node.b_mr.study_uid]
    assert _uids(_search(node, "/studies", {"PatientName": "OTHER^BETA"})) == [node.b_mr.study_uid]
    assert len(_search(node, "/studies", {"AccessionNumber": "ACC-?"})) == 2
    assert _search(node, "/studies", {"AccessionNumber": "acc-*"}) == []  # SH matches case-sensitively
    assert _search(node, "/studies", {"AccessionNumber": "ACC%"}) == []  # SQL wildcards are literal,
    assert _search(node, "/studies", {"AccessionNumber": "AC_-*"}) == []  # even inside a QIDO pattern


def test_match_uid_lists(node: Node) -> None:
    both = f"{node.a.study_uid},{node.b_mr.study_uid}"
    assert len(_search(node, "/studies", {"StudyInstanceUID": both})) == 2
    assert len(_search(node, "/studies", [("StudyInstanceUID", node.a.study_uid)])) == 1
    assert _search(node, "/studies", {"StudyInstanceUID": "1.2.3"}) == []


def test_limit_offset_and_the_warning_for_more(node: Node) -> None:
    response = node.client.get("/dicomweb/studies", params={"limit": 1})
    assert _uids(response.json()) == [node.a.study_uid]
    assert "additional results" in response.headers["warning"]
    response = node.client.get("/dicomweb/studies", params={"limit": 1, "offset": 1})
    assert _uids(response.json()) == [node.b_mr.study_uid]
    assert "warning" not in response.headers
    assert _search(node, "/studies", {"offset": 2}) == []


def test_includefield(node: Node) -> None:
    studies = _search(node, "/studies", {"includefield": "00081030"})
    assert studies[0]["00081030"] == {"vr": "LO", "Value": ["PHANTOM CT"]}
    series = _search(node, "/series", [("includefield", "SeriesDate"), ("includefield", "BodyPartExamined")])
    assert _values(series, "00080021") == ["20240115"] * 3
    assert _values(series, "00180015") == ["CHEST", "HEAD", "CHEST"]
    everything = _search(node, "/instances", {"includefield": "all", "limit": 1})[0]
    assert everything["00100040"] == {"vr": "CS", "Value": ["O"]}
    assert everything["00080031"] == {"vr": "TM", "Value": ["101730"]}
    assert "00180015" not in _search(node, "/series")[0]  # not returned unless asked for


# Series and instances -------------------------------------------------------------------------------------------


def test_search_for_series(node: Node) -> None:
    mr = _search(node, "/series", {"Modality": "MR"})
    assert _uids(mr, "0020000E") == [node.b_mr.series_uid]
    assert mr[0]["00100020"] == {"vr": "LO", "Value": ["PAT-B"]}  # /series returns the study's attributes
    assert mr[0]["00201209"] == {"vr": "IS", "Value": [2]}
    assert mr[0]["00080061"] == {"vr": "CS", "Value": ["CT", "MR"]}
    assert mr[0]["00081190"]["Value"] == [
        f"http://testserver/dicomweb/studies/{node.b_mr.study_uid}/series/{node.b_mr.series_uid}"
    ]
    in_study = _search(node, f"/studies/{node.b_mr.study_uid}/series")
    assert _uids(in_study, "0020000E") == [node.b_mr.series_uid, node.b_ct.series_uid]
    assert "00100020" not in in_study[0]  # under /studies/{study} only series attributes
    assert _values(in_study, "0020000D") == [node.b_mr.study_uid] * 2
    assert _uids(_search(node, "/series", {"PatientID": "PAT-A"}), "0020000E") == [node.a.series_uid]
    assert _uids(_search(node, "/series", {"SeriesNumber": 5}), "0020000E") == [node.b_ct.series_uid]
    assert _uids(_search(node, f"/studies/{node.b_mr.study_uid}/series", {"Modality": "CT"}), "0020000E") == [
        node.b_ct.series_uid
    ]
    assert _search(node, "/studies/1.2.3.4/series") == []


def test_search_for_instances(node: Node) -> None:
    in_series = _search(node, f"/studies/{node.a.study_uid}/series/{node.a.series_uid}/instances")
    assert _uids(in_series, "00080018") == node.a.sop_instance_uids
    first = in_series[0]
    assert first["00080016"] == {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]}
    assert (first["00280010"], first["00280011"], first["00280100"]) == ({"vr": "US", "Value": [16]},) * 3
    assert first["00280008"] == {"vr": "IS"}
    assert _values(in_series, "00200013") == [1, 2, 3]
    assert "00100020" not in first and "00080060" not in first
    assert first["00081190"]["Value"] == [
        f"http://testserver/dicomweb/studies/{node.a.study_uid}/series/{node.a.series_uid}"
        f"/instances/{node.a.sop_instance_uids[0]}"
    ]
    in_study = _search(node, f"/studies/{node.b_mr.study_uid}/instances", {"Modality": "MR"})
    assert _uids(in_study, "00080018") == node.b_mr.sop_instance_uids
    assert in_study[0]["00080060"] == {"vr": "CS", "Value": ["MR"]}
    everywhere = _search(node, "/instances", {"PatientID": "PAT-B", "InstanceNumber": 2})
    assert _uids(everywhere, "00080018") == [node.b_mr.sop_instance_uids[1], node.b_ct.sop_instance_uids[1]]
    listed = ",".join(node.a.sop_instance_uids[:2])
    assert len(_search(node, "/instances", {"SOPInstanceUID": listed})) == 2
    page = node.client.get("/dicomweb/instances", params={"limit": 2, "offset": 6})
    assert len(page.json()) == 1 and "warning" not in page.headers


# Refusals -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,params,named",
    [
        ("/studies", {"Foo": "1"}, '"Foo"'),
        ("/studies", {"limit": "abc"}, '"limit"'),
        ("/studies", {"Modality": "CT"}, '"Modality"'),
        ("/studies", {"StudyDate": "2025"}, '"StudyDate"'),
        ("/studies", {"StudyInstanceUID": "1.02"}, '"StudyInstanceUID"'),
        ("/series", {"includefield": "Nope"}, '"includefield"'),
        ("/studies/not-a-uid/series", {}, "StudyInstanceUID in the path"),
    ],
)
def test_bad_parameters_answer_400_naming_them(node: Node, path: str, params: dict[str, str], named: str) -> None:
    response = node.client.get(f"/dicomweb{path}", params=params)
    assert response.status_code == 400
    assert named in response.json()["detail"]


def test_accept_and_fuzzymatching(node: Node) -> None:
    assert node.client.get("/dicomweb/studies", headers={"Accept": "application/dicom+xml"}).status_code == 406
    response = node.client.get("/dicomweb/studies", params={"fuzzymatching": "true"})
    assert response.status_code == 200 and "Fuzzy matching is not supported" in response.headers["warning"]


# Results the node produced ---------------------------------------------------------------------------------------


def _write_seg(node: Node, job_id: int) -> tuple[Dataset, Path, int]:
    """A SEG of series A written where the worker writes it."""
    sources = [dcmread(path) for path in node.a.paths]
    labels = np.zeros((3, 16, 16), dtype=np.int64)
    labels[1, 4:10, 4:10] = 1
    labels[2, 8:12, 8:12] = 2
    seg = build_seg(
        sources,
        labels,
        seg_manifest(),
        series_instance_uid=derived_uid("qido-test", "seg", "series"),
        sop_instance_uid=derived_uid("qido-test", "seg", "instance"),
        series_number=9001,
    )
    buffer = BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    relpath = result_relpath(job_id, "SEG", seg.SOPInstanceUID)
    replace_file(node.settings.data_path, relpath, buffer.getvalue())
    return seg, relpath, len(buffer.getvalue())


def test_indexed_results_are_searchable_and_never_routed(node: Node) -> None:
    seg, relpath, size = _write_seg(node, job_id=7)
    header = InstanceHeader.from_dataset(
        seg,
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        transfer_syntax_uid=seg.file_meta.TransferSyntaxUID,
    )
    for _ in range(2):  # a rerun replaces the file and must not add a row
        with transaction(node.factory) as session:
            index_result_object(session, header, relpath, size)

    found = _search(node, "/series", {"Modality": "SEG"})
    assert _uids(found, "0020000E") == [seg.SeriesInstanceUID]
    assert _values(found, "0020000D") == [node.a.study_uid]
    assert found[0]["00100020"] == {"vr": "LO", "Value": ["PAT-A"]}
    assert found[0]["00201209"] == {"vr": "IS", "Value": [1]}
    instances = _search(node, f"/studies/{node.a.study_uid}/series/{seg.SeriesInstanceUID}/instances")
    assert _uids(instances, "00080018") == [seg.SOPInstanceUID]
    assert instances[0]["00080016"] == {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.66.4"]}
    assert instances[0]["00280008"]["Value"][0] >= 1
    study = _search(node, "/studies", {"PatientID": "PAT-A"})[0]
    assert study["00080061"] == {"vr": "CS", "Value": ["CT", "SEG"]}
    assert study["00201206"] == {"vr": "IS", "Value": [2]}

    with node.factory() as session:
        row = session.scalar(select(Series).where(Series.series_instance_uid == seg.SeriesInstanceUID))
        assert row is not None and row.state == SeriesState.produced and row.num_instances == 1
        assert session.scalar(select(func.count(Instance.id)).where(Instance.series_id == row.id)) == 1
        instance = session.scalar(select(Instance).where(Instance.series_id == row.id))
        assert instance is not None and (instance.path, instance.size) == (relpath.as_posix(), size)
        # the watcher only looks at receiving series: a produced one is never routed to a model
        assert row.id not in queries.quiet_series_ids(session, utcnow() + timedelta(days=1))


def test_a_rerun_with_a_new_file_updates_the_row(node: Node) -> None:
    seg, relpath, size = _write_seg(node, job_id=7)
    header = InstanceHeader.from_dataset(
        seg,
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        transfer_syntax_uid=seg.file_meta.TransferSyntaxUID,
    )
    with transaction(node.factory) as session:
        index_result_object(session, header, relpath, size)
    moved = result_relpath(8, "SEG", seg.SOPInstanceUID)
    with transaction(node.factory) as session:
        index_result_object(session, header, moved, size + 10)
    with node.factory() as session:
        rows = session.scalars(select(Instance).where(Instance.sop_instance_uid == seg.SOPInstanceUID)).all()
        assert [(r.path, r.size) for r in rows] == [(moved.as_posix(), size + 10)]
        series = session.scalar(select(Series).where(Series.series_instance_uid == seg.SeriesInstanceUID))
        assert series is not None and series.num_instances == 1


# A real client over HTTP --------------------------------------------------------------------------------------------


@contextmanager
def _serve(app: FastAPI) -> Iterator[str]:
    """The app under uvicorn on a free loopback port, in a thread; yields the DICOMweb base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="qido-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://{LOOPBACK}:{port}/dicomweb"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def test_dicomweb_client_searches_the_node(node: Node) -> None:
    with _serve(create_app(node.settings, node.factory)) as url:
        client = DICOMwebClient(url=url)

        studies = client.search_for_studies(search_filters={"PatientID": "PAT-B"})
        assert [Dataset.from_json(s).StudyInstanceUID for s in studies] == [node.b_mr.study_uid]
        b = Dataset.from_json(studies[0])
        assert (b.PatientName, b.ModalitiesInStudy, b.NumberOfStudyRelatedInstances) == ("Other^Beta", ["CT", "MR"], 4)
        # RetrieveURL is built from the Host header, and dicomweb-client sends the host without the port
        assert b.RetrieveURL.endswith(f"/dicomweb/studies/{node.b_mr.study_uid}")
        dated = client.search_for_studies(search_filters={"StudyDate": "20250101-20250131"}, fuzzymatching=False)
        assert [Dataset.from_json(s).PatientID for s in dated] == ["PAT-A"]
        named = client.search_for_studies(search_filters={"PatientName": "phantom*"}, fields=["StudyDescription"])
        assert [Dataset.from_json(s).StudyDescription for s in named] == ["PHANTOM CT"]
        paged = client.search_for_studies(limit=1, get_remaining=True)
        assert [Dataset.from_json(s).StudyInstanceUID for s in paged] == [node.a.study_uid, node.b_mr.study_uid]
        assert client.search_for_studies(search_filters={"PatientID": "nobody"}) == []

        mr = client.search_for_series(study_instance_uid=node.b_mr.study_uid, search_filters={"Modality": "MR"})
        assert [Dataset.from_json(s).SeriesInstanceUID for s in mr] == [node.b_mr.series_uid]
        ct = client.search_for_series(search_filters={"Modality": "CT"})
        assert [Dataset.from_json(s).SeriesInstanceUID for s in ct] == [node.a.series_uid, node.b_ct.series_uid]

        instances = client.search_for_instances(
            study_instance_uid=node.a.study_uid, series_instance_uid=node.a.series_uid
        )
        parsed = [Dataset.from_json(i) for i in instances]
        assert [ds.SOPInstanceUID for ds in parsed] == node.a.sop_instance_uids
        assert {(ds.Rows, ds.Columns, ds.BitsAllocated) for ds in parsed} == {(16, 16, 16)}
        assert len(client.search_for_instances(study_instance_uid=node.b_mr.study_uid)) == 4
        listed = client.search_for_instances(search_filters={"SOPInstanceUID": node.b_ct.sop_instance_uids})
        assert [Dataset.from_json(i).SOPInstanceUID for i in listed] == node.b_ct.sop_instance_uids

        with pytest.raises(requests.HTTPError) as refused:
            client.search_for_studies(search_filters={"NoSuchAttribute": "x"})
        assert refused.value.response.status_code == 400
