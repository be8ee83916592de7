"""What the node holds, built the way the node builds it: received series and a job's results.

Series are stored through :func:`infergate.ingest.ingest_instance` (Part 10 files fsync'd under
``instances/``, rows committed) and results through ``replace_file`` and ``index_result_object``,
as the worker does, so that retention tests remove real files and real rows.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from infergate.dicom.storage import replace_file, result_relpath
from infergate.ingest import index_result_object, ingest_instance
from infergate.instance_header import InstanceHeader
from infergate.store import queries
from infergate.store.session import transaction
from infergate.store.tables import (
    Export,
    ExportState,
    Finding,
    Job,
    JobPreview,
    JobState,
    Measurement,
    ResultObject,
    Series,
    SeriesState,
    Study,
    utcnow,
)
from tests.data.make_series import write_mr_series
from tests.helpers.ingest import header_of

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
PACS = "PACS@127.0.0.1:11112"


@dataclass(frozen=True)
class HeldSeries:
    id: int
    study_uid: str
    series_uid: str
    paths: list[Path]
    """Absolute paths of the stored Part 10 files."""
    source: Path
    """One of the generated files, to build results from."""


def receive_series(
    factory: sessionmaker[Session],
    root: Path,
    work: Path,
    *,
    state: SeriesState = SeriesState.routed,
    days_ago: float = 40.0,
    slices: int = 3,
    study_uid: str | None = None,
) -> HeldSeries:
    """Store a small MR series as the SCP would, then age it and move it to ``state``."""
    info = write_mr_series(
        work / generate_uid(), slices=slices, size=16, study_uid=study_uid or generate_uid(), series_uid=generate_uid()
    )
    for path in info.paths:
        ingest_instance(factory, root, header_of(path), path.read_bytes(), calling_ae="MODALITY", called_ae="INFERGATE")
    with transaction(factory) as session:
        series_id = session.scalar(select(Series.id).where(Series.series_instance_uid == info.series_uid))
        assert series_id is not None
        session.execute(
            update(Series)
            .where(Series.id == series_id)
            .values(state=state, last_received_at=utcnow() - timedelta(days=days_ago))
        )
    stored = [root / "instances" / info.study_uid / info.series_uid / f"{uid}.dcm" for uid in info.sop_instance_uids]
    assert all(path.is_file() for path in stored)
    return HeldSeries(series_id, info.study_uid, info.series_uid, stored, info.paths[0])


@dataclass(frozen=True)
class HeldJob:
    id: int
    result_path: Path
    """Absolute path of the SEG file."""
    sop_instance_uid: str
    series_instance_uid: str


def add_job(
    factory: sessionmaker[Session],
    root: Path,
    series: HeldSeries,
    *,
    state: JobState = JobState.done,
    export: ExportState | None = ExportState.done,
    finished_days_ago: float = 40.0,
    model_id: str = "ct-tissue-seg",
) -> HeldJob:
    """A job of ``series`` with one SEG written and indexed as the worker does, a finding, a
    measurement, a preview and (unless ``export`` is None) an export row to :data:`PACS`."""
    with transaction(factory) as session:
        job_id = queries.create_job(session, series.id, model_id, "1")
        assert job_id is not None
    ds = dcmread(series.source)
    sop_uid, seg_series_uid = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = seg_series_uid
    ds.Modality = "SEG"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SEG_CLASS  # the header's class; pixels stay MR
    relpath = result_relpath(job_id, "SEG", sop_uid)
    encoded = io.BytesIO()
    ds.save_as(encoded, enforce_file_format=True)
    path = replace_file(root, relpath, encoded.getvalue())
    header = InstanceHeader.from_dataset(
        ds, sop_class_uid=SEG_CLASS, sop_instance_uid=sop_uid, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID
    )
    finished = utcnow() - timedelta(days=finished_days_ago)
    with transaction(factory) as session:
        index_result_object(session, header, relpath, path.stat().st_size)
        result = ResultObject(
            job_id=job_id,
            kind="SEG",
            sop_class_uid=SEG_CLASS,
            sop_instance_uid=sop_uid,
            series_instance_uid=seg_series_uid,
            path=relpath.as_posix(),
        )
        session.add(result)
        session.flush()
        if export is not None:
            done = export == ExportState.done
            session.add(
                Export(
                    result_object_id=result.id,
                    destination=PACS,
                    state=export,
                    attempts=1,
                    last_status=0x0000 if done else 0xA900,
                    last_error=None if done else "status 0xA900",
                    delivered_at=finished if done else None,
                )
            )
        session.add(
            Finding(
                job_id=job_id,
                name="tissue",
                code_value="85756007",
                code_scheme="SCT",
                code_meaning="Tissue",
                probability=0.9,
                positive=True,
            )
        )
        session.add(
            Measurement(job_id=job_id, segment_number=1, segment_label="Fat", name="Volume", value=12.5, unit="mL")
        )
        session.add(JobPreview(job_id=job_id, png=b"\x89PNG\r\n\x1a\n", slice_index=1))
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                state=state,
                finished_at=finished if state in (JobState.done, JobState.failed, JobState.cancelled) else None,
                error="export failed: status 0xA900" if export == ExportState.failed else None,
            )
        )
    return HeldJob(job_id, path, sop_uid, seg_series_uid)


def study_exists(factory: sessionmaker[Session], study_uid: str) -> bool:
    with factory() as session:
        return session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid)) is not None
