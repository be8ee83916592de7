"""Storing one received instance: shared by the DICOM SCP and (later) STOW-RS.

The order is what makes an acknowledgement safe: the file is fsync'd, then its row is committed,
and only then does the caller answer Success. A repeated SOP Instance UID keeps the first copy.

The rows also carry the attributes QIDO-RS searches (PS3.18 10.6), taken from the first instance
of each study and series; :func:`index_result_object` indexes the node's own SEG/SR the same way,
so that what the node holds, inputs and results, is searchable.
"""

from __future__ import annotations

import enum
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from infergate.dicom.storage import check_uid, instance_relpath, resolve_inside, store_new_file
from infergate.store.queries import get_or_create_series, get_or_create_study, insert_ignore
from infergate.store.tables import Instance, Series, SeriesState, utcnow

log = logging.getLogger(__name__)


class IngestOutcome(enum.Enum):
    stored = "stored"
    duplicate = "duplicate"


@dataclass(frozen=True)
class InstanceHeader:
    """The header values the node indexes, taken from a received dataset.

    Patient and study values are kept out of ``repr`` so that logging a header never logs PHI.
    Attributes added for searching default to None, so code that builds a header by hand keeps
    working; :meth:`from_dataset` fills them.
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part_examined: str | None
    series_description: str | None
    image_type: str | None
    instance_number: int | None
    # Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1)
    patient_name: str | None = field(default=None, repr=False)
    patient_id: str | None = field(default=None, repr=False)
    patient_birth_date: str | None = field(default=None, repr=False)
    patient_sex: str | None = field(default=None, repr=False)
    study_date: str | None = field(default=None, repr=False)
    study_time: str | None = field(default=None, repr=False)
    accession_number: str | None = field(default=None, repr=False)
    study_description: str | None = field(default=None, repr=False)
    referring_physician_name: str | None = field(default=None, repr=False)
    study_id: str | None = field(default=None, repr=False)
    # General Series module (PS3.3 C.7.3.1)
    series_number: int | None = None
    series_date: str | None = field(default=None, repr=False)
    series_time: str | None = field(default=None, repr=False)
    performed_procedure_step_start_date: str | None = field(default=None, repr=False)
    # Image Pixel and Multi-frame modules (PS3.3 C.7.6.3, C.7.6.6)
    rows: int | None = None
    columns: int | None = None
    bits_allocated: int | None = None
    number_of_frames: int | None = None

    @classmethod
    def from_dataset(
        cls, ds: Dataset, *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str
    ) -> InstanceHeader:
        """Read and check the identifying values.

        The SOP Class and Instance UIDs come from the DIMSE request; the dataset must agree with
        them (PS3.4 B.2.3: a mismatch is 0xA900), and every UID must follow the UID grammar.
        The searchable attributes are read tolerantly: a value that does not follow its VR is
        indexed as missing rather than refusing an instance the node can still store.

        Raises
        ------
        InvalidInput
            A UID is missing or malformed.
        ValueError
            The dataset's SOP Class/Instance UIDs differ from the request's.
        """
        check_uid(sop_class_uid, "sop_class_uid")
        check_uid(sop_instance_uid, "sop_instance_uid")
        check_uid(transfer_syntax_uid, "transfer_syntax_uid")
        if ds.get("SOPInstanceUID") != sop_instance_uid or ds.get("SOPClassUID") != sop_class_uid:
            raise ValueError("The dataset's SOP Class/Instance UID differs from the request's.")
        return cls(
            study_instance_uid=check_uid(ds.get("StudyInstanceUID"), "study_instance_uid"),
            series_instance_uid=check_uid(ds.get("SeriesInstanceUID"), "series_instance_uid"),
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            modality=_text(_get(ds, "Modality"), 16),
            body_part_examined=_text(_get(ds, "BodyPartExamined"), 64),
            series_description=_text(_get(ds, "SeriesDescription"), 64),
            image_type=_text(_get(ds, "ImageType"), 128),
            instance_number=_int(_get(ds, "InstanceNumber")),
            patient_name=_text(_get(ds, "PatientName"), 256),
            patient_id=_text(_get(ds, "PatientID"), 64),
            patient_birth_date=_date(_get(ds, "PatientBirthDate")),
            patient_sex=_text(_get(ds, "PatientSex"), 16),
            study_date=_date(_get(ds, "StudyDate")),
            study_time=_time(_get(ds, "StudyTime")),
            accession_number=_text(_get(ds, "AccessionNumber"), 64),
            study_description=_text(_get(ds, "StudyDescription"), 64),
            referring_physician_name=_text(_get(ds, "ReferringPhysicianName"), 256),
            study_id=_text(_get(ds, "StudyID"), 64),
            series_number=_int(_get(ds, "SeriesNumber")),
            series_date=_date(_get(ds, "SeriesDate")),
            series_time=_time(_get(ds, "SeriesTime")),
            performed_procedure_step_start_date=_date(_get(ds, "PerformedProcedureStepStartDate")),
            rows=_int(_get(ds, "Rows")),
            columns=_int(_get(ds, "Columns")),
            bits_allocated=_int(_get(ds, "BitsAllocated")),
            number_of_frames=_int(_get(ds, "NumberOfFrames")),
        )


_DA = re.compile(r"\A[0-9]{8}\Z")
_TM = re.compile(r"\A[0-9]{2}(?:[0-9]{2}(?:[0-9]{2}(?:\.[0-9]{1,6})?)?)?\Z")


def _get(ds: Dataset, keyword: str) -> object:
    """The value of ``keyword``, or None when pydicom cannot convert it to its VR (e.g. IS "abc")."""
    try:
        return ds.get(keyword)
    except (ValueError, TypeError, OverflowError):
        # Tolerant when reading: an attribute the node only indexes must not refuse the instance.
        log.debug("an element of an instance could not be read; indexed as missing")
        return None


def _text(value: object, limit: int) -> str | None:
    """A string value cut to the column's length; multiple values joined with a backslash (PS3.5 6.4)."""
    if isinstance(value, MultiValue | list | tuple):
        value = "\\".join(str(v) for v in value)
    if value is None:
        return None
    text = str(value).strip()
    return text[:limit] or None


def _int(value: object) -> int | None:
    """An IS/US value as an int; None when missing, multi-valued or not a whole number."""
    if value is None or value == "" or isinstance(value, MultiValue | list | tuple | bytes):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() and abs(number) < 2**31 else None


def _date(value: object) -> str | None:
    """A DA value as ``YYYYMMDD`` (the ACR-NEMA form ``YYYY.MM.DD`` is accepted); None otherwise."""
    text = (_text(value, 16) or "").replace(".", "")
    return text if _DA.match(text) else None


def _time(value: object) -> str | None:
    """A TM value as ``HH[MM[SS[.F{1,6}]]]`` (the ACR-NEMA form ``HH:MM:SS`` is accepted); None otherwise."""
    text = (_text(value, 16) or "").replace(":", "")
    return text if _TM.match(text) else None


def ingest_instance(
    factory: sessionmaker[Session],
    data_root: Path,
    header: InstanceHeader,
    encoded: bytes | list[bytes],
    *,
    calling_ae: str | None,
    called_ae: str | None,
) -> IngestOutcome:
    """Durably store one Part 10 file and index it.

    Parameters
    ----------
    encoded:
        The complete Part 10 file (preamble, meta, dataset), possibly in chunks.

    Returns
    -------
    IngestOutcome
        ``duplicate`` when the SOP Instance UID is already stored (the first copy is kept).

    Raises
    ------
    infergate.dicom.storage.OutOfSpace, sqlalchemy.exc.OperationalError
        Storage or database unavailable; nothing was indexed and no file of ours is left behind.
    """
    with factory() as session:
        exists = session.scalar(select(Instance.id).where(Instance.sop_instance_uid == header.sop_instance_uid))
    if exists is not None:
        return IngestOutcome.duplicate

    relpath = instance_relpath(header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
    written = store_new_file(data_root, relpath, encoded)
    if not written:
        # A file without a row was never acknowledged (crash between fsync and commit, or a
        # concurrent store of the same UID): keep it and let the insert decide who was first.
        log.info("instance file existed without a row; indexing the existing copy")
    try:
        with factory() as session, session.begin():
            inserted = _index(session, header, relpath, encoded, calling_ae=calling_ae, called_ae=called_ae)
    except BaseException:
        if written:
            resolve_inside(data_root, relpath).unlink(missing_ok=True)
        raise
    return IngestOutcome.stored if inserted else IngestOutcome.duplicate


def _index(
    session: Session,
    header: InstanceHeader,
    relpath: Path,
    encoded: bytes | list[bytes],
    *,
    calling_ae: str | None,
    called_ae: str | None,
) -> bool:
    study_id = get_or_create_study(session, header.study_instance_uid)
    series_id = get_or_create_series(
        session,
        study_id,
        header.series_instance_uid,
        modality=header.modality,
        body_part_examined=header.body_part_examined,
        series_description=header.series_description,
        image_type=header.image_type,
        calling_ae=calling_ae,
        called_ae=called_ae,
    )
    size = len(encoded) if isinstance(encoded, bytes) else sum(len(c) for c in encoded)
    inserted = insert_ignore(
        session,
        Instance,
        {
            "series_id": series_id,
            "sop_instance_uid": header.sop_instance_uid,
            "sop_class_uid": header.sop_class_uid,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "instance_number": header.instance_number,
            "path": relpath.as_posix(),
            "size": size,
            "received_at": utcnow(),
        },
        conflict_columns=["sop_instance_uid"],
    )
    if inserted:
        session.execute(
            update(Series)
            .where(Series.id == series_id)
            .values(num_instances=Series.num_instances + 1, last_received_at=utcnow())
        )
    return inserted
