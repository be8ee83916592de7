"""Indexing received instances: the header values searched (InstanceHeader) and the rows written."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.ingest import IngestOutcome, InstanceHeader
from infergate.store.tables import Instance, Series
from tests.data.make_series import write_mr_series
from tests.helpers.ingest import ingest_file


def _header(ds: Dataset) -> InstanceHeader:
    return InstanceHeader.from_dataset(
        ds,
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
    )


def _first_slice(tmp_path: Path) -> Dataset:
    info = write_mr_series(tmp_path, slices=1, size=16, patient_id="PAT-1", patient_name="Doe^Jane")
    return dcmread(info.paths[0])


def test_searchable_attributes_are_read(tmp_path: Path) -> None:
    header = _header(_first_slice(tmp_path))
    assert (header.patient_name, header.patient_id, header.patient_birth_date, header.patient_sex) == (
        "Doe^Jane",
        "PAT-1",
        "19700101",
        "O",
    )
    assert (header.study_date, header.study_time, header.series_date, header.series_time) == (
        "20240115",
        "101500",
        "20240115",
        "101730",
    )
    assert header.accession_number == "ACC0000000" and header.study_description == "PHANTOM MR"
    assert header.referring_physician_name == "Referrer^Test" and header.study_id == "0"
    assert (header.series_number, header.rows, header.columns, header.bits_allocated) == (1, 16, 16, 16)
    assert header.number_of_frames is None and header.performed_procedure_step_start_date is None
    assert header.image_type == "ORIGINAL\\PRIMARY\\OTHER"


def test_patient_values_stay_out_of_the_repr(tmp_path: Path) -> None:
    text = repr(_header(_first_slice(tmp_path)))
    for phi in ("Doe^Jane", "PAT-1", "19700101", "ACC0000000", "Referrer"):
        assert phi not in text


def test_values_that_break_their_vr_are_indexed_as_missing(tmp_path: Path) -> None:
    ds = _first_slice(tmp_path)
    ds[0x00200013] = RawDataElement(Tag(0x00200013), "IS", 4, b"abc ", 0, True, True)  # InstanceNumber
    ds[0x00280010] = RawDataElement(Tag(0x00280010), "US", 3, b"\x01\x02\x03", 0, True, True)  # Rows
    ds.StudyDate = "2025-01-10"
    ds.StudyTime = "25"
    ds.PatientBirthDate = ""
    header = _header(ds)
    assert (header.instance_number, header.rows, header.study_date, header.study_time) == (None, None, None, None)
    assert header.patient_birth_date is None
    assert header.columns == 16  # the rest is still read


def test_acr_nema_dates_and_times_are_normalised(tmp_path: Path) -> None:
    ds = _first_slice(tmp_path)
    ds[0x00080020] = RawDataElement(Tag(0x00080020), "DA", 10, b"2025.01.10", 0, True, True)
    ds[0x00080030] = RawDataElement(Tag(0x00080030), "TM", 8, b"10:15:00", 0, True, True)
    header = _header(ds)
    assert (header.study_date, header.study_time) == ("20250110", "101500")


def _ingest_file(factory: sessionmaker[Session], settings: Settings, path: Path) -> IngestOutcome:
    return ingest_file(factory, settings.data_path, path, calling_ae="MODALITY", called_ae="NODE")


def test_instances_after_the_first_are_counted_once(
    tmp_path: Path, db_settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """The remembered series id (two statements per instance) counts like the long way."""
    info = write_mr_series(tmp_path / "in", slices=5, size=16)
    outcomes = [_ingest_file(session_factory, db_settings, path) for path in info.paths]
    outcomes.append(_ingest_file(session_factory, db_settings, info.paths[2]))  # a repeated copy
    assert outcomes == [IngestOutcome.stored] * 5 + [IngestOutcome.duplicate]
    with session_factory() as session:
        series = session.scalars(select(Series)).one()
        assert series.num_instances == 5
        assert session.scalar(select(func.count()).select_from(Instance)) == 5
        assert {row.series_id for row in session.scalars(select(Instance))} == {series.id}


def test_a_deleted_series_row_is_recreated_for_the_next_instance(
    tmp_path: Path, db_settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """A series id remembered from before its rows were deleted (retention, an operator) is not trusted."""
    info = write_mr_series(tmp_path / "in", slices=3, size=16)
    assert _ingest_file(session_factory, db_settings, info.paths[0]) is IngestOutcome.stored
    with session_factory() as session, session.begin():
        session.execute(delete(Instance))
        session.execute(delete(Series))
    assert _ingest_file(session_factory, db_settings, info.paths[1]) is IngestOutcome.stored
    assert _ingest_file(session_factory, db_settings, info.paths[2]) is IngestOutcome.stored
    with session_factory() as session:
        series = session.scalars(select(Series)).one()
        assert series.num_instances == 2
        paths = session.scalars(select(Instance.path)).all()
        assert len(paths) == 2
    for relpath in paths:
        assert (db_settings.data_path / relpath).is_file()
