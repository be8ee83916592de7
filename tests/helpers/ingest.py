"""Storing test files the way the SCP does: header read by ``InstanceHeader``, then ``ingest_instance``."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from sqlalchemy.orm import Session, sessionmaker

from infergate.ingest import IngestOutcome, InstanceHeader, ingest_instance


def header_of(path: Path) -> InstanceHeader:
    """The header the SCP would index for the Part 10 file at ``path``."""
    ds = dcmread(path)
    return InstanceHeader.from_dataset(
        ds,
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
    )


def ingest_file(
    factory: sessionmaker[Session],
    data_root: Path,
    path: Path,
    *,
    calling_ae: str | None = "TEST",
    called_ae: str | None = "INFERGATE",
) -> IngestOutcome:
    """Store and index one file as if it had arrived by C-STORE."""
    return ingest_instance(
        factory, data_root, header_of(path), path.read_bytes(), calling_ae=calling_ae, called_ae=called_ae
    )
