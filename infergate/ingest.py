"""Storing one received instance: shared by the DICOM SCP and (later) STOW-RS.

The order is what makes an acknowledgement safe: the file is fsync'd, then its row is committed,
and only then does the caller answer Success. A repeated SOP Instance UID keeps the first copy.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from infergate.dicom.storage import check_uid, instance_relpath, resolve_inside, store_new_file
from infergate.store.queries import get_or_create_series, get_or_create_study, insert_ignore
from infergate.store.tables import Instance, Series, utcnow

log = logging.getLogger(__name__)


class IngestOutcome(enum.Enum):
    stored = "stored"
    duplicate = "duplicate"


@dataclass(frozen=True)
class InstanceHeader:
    """The header values the node indexes, taken from a received dataset."""

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

    @classmethod
    def from_dataset(
        cls, ds: Dataset, *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str
    ) -> InstanceHeader:
        """Read and check the identifying values.

        The SOP Class and Instance UIDs come from the DIMSE request; the dataset must agree with
        them (PS3.4 B.2.3: a mismatch is 0xA900), and every UID must follow the UID grammar.

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
        image_type = ds.get("ImageType")
        if image_type is not None and not isinstance(image_type, str):
            image_type = "\\".join(str(v) for v in image_type)
        number = ds.get("InstanceNumber")
        return cls(
            study_instance_uid=check_uid(ds.get("StudyInstanceUID"), "study_instance_uid"),
            series_instance_uid=check_uid(ds.get("SeriesInstanceUID"), "series_instance_uid"),
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            modality=_text(ds.get("Modality"), 16),
            body_part_examined=_text(ds.get("BodyPartExamined"), 64),
            series_description=_text(ds.get("SeriesDescription"), 64),
            image_type=_text(image_type, 128),
            instance_number=int(number) if number not in (None, "") else None,
        )


def _text(value: object, limit: int) -> str | None:
    if value in (None, ""):
        return None
    return str(value)[:limit]


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
