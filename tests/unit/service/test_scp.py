"""The SCP against real peers on loopback: pynetdicom as SCU, dcmtk echoscu/storescu."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.dicom.receive import StoreContext
from infergate.errors import InvalidInput
from infergate.ingest import InstanceHeader
from infergate.store.tables import Instance, Series
from service.scp.ae import start_server
from tests.data.make_series import write_ct_series
from tests.helpers.peers import free_port, run_echoscu, run_storescu


@pytest.fixture
def scp(db_settings: Settings, session_factory: sessionmaker[Session]) -> Iterator[Settings]:
    settings = db_settings.model_copy(update={"scp_port": free_port(), "allowed_calling_aes": []})
    server = start_server(settings, StoreContext(factory=session_factory, data_root=settings.data_path))
    yield settings
    server.shutdown()


def _send(settings: Settings, ds: Dataset, calling: str = "TESTSCU") -> int:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", settings.scp_port, ae_title=settings.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status)
    finally:
        assoc.release()


def test_echoscu_answers(scp: Settings) -> None:
    result = run_echoscu(scp.scp_port, scp.ae_title)
    assert result.returncode == 0, result.stderr


def test_storescu_series_is_stored_durably_and_indexed(
    scp: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    info = write_ct_series(tmp_path / "ct", slices=12, size=64)
    result = run_storescu(info.folder, port=scp.scp_port, aec=scp.ae_title)
    assert result.returncode == 0, result.stderr
    with session_factory() as session:
        series = session.scalar(select(Series))
        assert series is not None
        assert series.num_instances == 12 and series.modality == "CT" and series.calling_ae == "STORESCU"
        paths = session.scalars(select(Instance.path)).all()
    assert len(paths) == 12
    for source in info.paths:
        sop = dcmread(source, stop_before_pixels=True).SOPInstanceUID
        stored = scp.data_path / "instances" / info.study_uid / info.series_uid / f"{sop}.dcm"
        assert dcmread(stored).SOPInstanceUID == sop
        # the dataset bytes are kept as sent (the sender's file meta may differ from ours)
        assert dcmread(stored).PixelData == dcmread(source).PixelData


def test_duplicate_keeps_first_copy_and_answers_success(
    scp: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    info = write_ct_series(tmp_path / "ct", slices=1, size=32)
    ds = dcmread(info.paths[0])
    assert _send(scp, ds) == 0x0000
    stored = scp.data_path / "instances" / info.study_uid / info.series_uid / f"{ds.SOPInstanceUID}.dcm"
    first = stored.read_bytes()
    ds.SeriesDescription = "CHANGED"
    assert _send(scp, ds) == 0x0000
    assert stored.read_bytes() == first
    with session_factory() as session:
        assert session.scalar(select(func.count(Instance.id))) == 1
        assert session.scalar(select(Series.num_instances)) == 1


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize("bad_uid", ["1.2.3/../../../etc", "..", "1.2.03.4", "1." + "2" * 70])
def test_hostile_study_uid_is_refused_and_never_reaches_a_path(
    scp: Settings, session_factory: sessionmaker[Session], tmp_path: Path, bad_uid: str
) -> None:
    info = write_ct_series(tmp_path / "ct", slices=1, size=32)
    ds = dcmread(info.paths[0])
    ds.StudyInstanceUID = bad_uid
    enforce = _config.ENFORCE_UID_CONFORMANCE
    _config.ENFORCE_UID_CONFORMANCE = False
    try:
        status = _send(scp, ds)
    finally:
        _config.ENFORCE_UID_CONFORMANCE = enforce
    assert status == 0xC210
    with session_factory() as session:
        assert session.scalar(select(func.count(Instance.id))) == 0
    assert not (scp.data_path / "instances").exists() or not any((scp.data_path / "instances").rglob("*.dcm"))
    assert not (tmp_path / "etc").exists()


def test_header_refuses_dataset_that_differs_from_the_request(tmp_path: Path) -> None:
    """PS3.4 B.2.3: the handler maps this ValueError to 0xA900."""
    info = write_ct_series(tmp_path / "ct", slices=1, size=32)
    ds = dcmread(info.paths[0])
    with pytest.raises(ValueError, match="differs from the request"):
        InstanceHeader.from_dataset(
            ds, sop_class_uid=ds.SOPClassUID, sop_instance_uid="1.2.3.4", transfer_syntax_uid="1.2.840.10008.1.2.1"
        )
    with pytest.raises(InvalidInput, match="sop_instance_uid"):
        InstanceHeader.from_dataset(
            ds, sop_class_uid=ds.SOPClassUID, sop_instance_uid="1..2", transfer_syntax_uid="1.2.840.10008.1.2.1"
        )


def test_calling_ae_allow_list(db_settings: Settings, session_factory: sessionmaker[Session]) -> None:
    settings = db_settings.model_copy(update={"scp_port": free_port(), "allowed_calling_aes": ["MODALITY1"]})
    server = start_server(settings, StoreContext(factory=session_factory, data_root=settings.data_path))
    try:
        for calling, expected in (("MODALITY1", True), ("INTRUDER", False)):
            ae = AE(ae_title=calling)
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", settings.scp_port, ae_title=settings.ae_title)
            assert assoc.is_established is expected
            if assoc.is_established:
                assoc.release()
    finally:
        server.shutdown()


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80"])
def test_compressed_series_is_stored_as_received(
    scp: Settings, session_factory: sessionmaker[Session], tmp_path: Path, syntax: str
) -> None:
    """RLE, JPEG 2000 lossless and JPEG-LS lossless from storescu are kept in their transfer syntax."""
    info = write_ct_series(tmp_path / "ct", slices=3, size=64, transfer_syntax=syntax)
    result = run_storescu(info.folder, port=scp.scp_port, aec=scp.ae_title)
    assert result.returncode == 0, result.stderr
    with session_factory() as session:
        assert set(session.scalars(select(Instance.transfer_syntax_uid))) == {syntax}
        paths = session.scalars(select(Instance.path)).all()
    for relpath in paths:
        stored = dcmread(scp.data_path / relpath)
        assert stored.file_meta.TransferSyntaxUID == syntax
        assert stored.pixel_array.shape == (64, 64)
