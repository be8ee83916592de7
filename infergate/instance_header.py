"""The header values the node indexes from a received instance, read tolerantly.

Shared by the SCP, STOW-RS and the indexing of the node's own results (:mod:`infergate.ingest`):
one place decides which attributes are kept and how values that break their VR are treated (as
missing: an attribute the node only indexes must not refuse the instance).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException
from pydicom.multival import MultiValue

from infergate.dicom.storage import check_uid

log = logging.getLogger(__name__)


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


# DA and TM as PS3.5 Table 6.2-1 defines them (TM seconds up to 60 for a leap second)
_DA = re.compile(r"\A[0-9]{4}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])\Z")
_TM = re.compile(r"\A(?:[01][0-9]|2[0-3])(?:[0-5][0-9](?:(?:[0-5][0-9]|60)(?:\.[0-9]{1,6})?)?)?\Z")


def _get(ds: Dataset, keyword: str) -> object:
    """The value of ``keyword``, or None when pydicom cannot convert it to its VR (e.g. IS "abc")."""
    try:
        return ds.get(keyword)
    except (ValueError, TypeError, OverflowError, BytesLengthException):
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
