"""SQLAlchemy 2.0 tables of the results store (PostgreSQL in production, SQLite embedded).

The database is the source of truth for what was received, which series are complete, which jobs
exist and where results went; Celery messages only carry job ids. Schema changes go through the
Alembic migrations in ``infergate/store/migrations``.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class SeriesState(enum.StrEnum):
    """``receiving`` until quiet for ``series_quiet_seconds``; then ``routed`` or ``unmatched``.

    ``produced`` marks the node's own SEG/SR series, indexed for DICOMweb but never routed.
    """

    receiving = "receiving"
    routed = "routed"
    unmatched = "unmatched"
    produced = "produced"


class JobState(enum.StrEnum):
    """``queued -> running -> exporting -> done | failed``; ``cancelled`` by request at any point."""

    queued = "queued"
    running = "running"
    exporting = "exporting"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


class ExportState(enum.StrEnum):
    pending = "pending"
    done = "done"
    failed = "failed"


def _enum(cls: type[enum.Enum]) -> Enum:
    return Enum(cls, name=cls.__name__.lower(), native_enum=False, length=16, validate_strings=True)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps in UTC that come back timezone-aware from every backend.

    SQLite has no time zones and returns naive values; comparing those with aware ones fails in
    Python, so naive results are marked UTC (everything we store is UTC).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("Timestamps stored in the results store must be timezone-aware.")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


_TS = UTCDateTime()


class Study(Base):
    """A study, with the Patient and General Study attributes QIDO-RS matches and returns.

    The attributes come from the first instance that created the row, like every attribute the
    node indexes. Dates are DICOM DA strings (``YYYYMMDD``) and times TM strings (``HHMMSS.F``),
    so that range matching (PS3.4 C.2.2.2.5) can compare them as text; values that do not follow
    their VR are not stored.
    """

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(_TS, default=utcnow)
    patient_name: Mapped[str | None] = mapped_column(String(256), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)
    study_time: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    study_description: Mapped[str | None] = mapped_column(String(64))
    referring_physician_name: Mapped[str | None] = mapped_column(String(256))
    study_id_value: Mapped[str | None] = mapped_column(String(64), doc="Study ID (0020,0010).")

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    series_description: Mapped[str | None] = mapped_column(String(64))
    image_type: Mapped[str | None] = mapped_column(String(128))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    called_ae: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[SeriesState] = mapped_column(_enum(SeriesState), default=SeriesState.receiving, index=True)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(_TS, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(_TS, default=utcnow, index=True)
    completed_at: Mapped[datetime | None] = mapped_column(_TS)
    routing_note: Mapped[str | None] = mapped_column(Text)
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_date: Mapped[str | None] = mapped_column(String(8))
    series_time: Mapped[str | None] = mapped_column(String(16))
    performed_procedure_step_start_date: Mapped[str | None] = mapped_column(String(8))
    purged_at: Mapped[datetime | None] = mapped_column(
        _TS, doc="When retention last removed its instances; the row stays as long as jobs refer to it."
    )

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    jobs: Mapped[list[Job]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(512), doc="Relative to the data folder.")
    size: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(_TS, default=utcnow)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    bits_allocated: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("series_id", "model_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    model_id: Mapped[str] = mapped_column(String(64), index=True)
    model_version: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.queued, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(_TS, default=utcnow)
    queued_at: Mapped[datetime] = mapped_column(_TS, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(_TS)
    finished_at: Mapped[datetime | None] = mapped_column(_TS)
    lease_until: Mapped[datetime | None] = mapped_column(_TS)
    updated_at: Mapped[datetime] = mapped_column(_TS, default=utcnow, onupdate=utcnow)
    timings: Mapped[dict[str, float] | None] = mapped_column(
        JSON, doc="Seconds per stage of the last attempt (load, onnx, ..., export), written by the worker."
    )

    series: Mapped[Series] = relationship(back_populates="jobs")
    findings: Mapped[list[Finding]] = relationship(back_populates="job", cascade="all, delete-orphan")
    measurements: Mapped[list[Measurement]] = relationship(back_populates="job", cascade="all, delete-orphan")
    result_objects: Mapped[list[ResultObject]] = relationship(back_populates="job", cascade="all, delete-orphan")


class Finding(Base):
    """A classification result: the class named by a code and its probability."""

    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    code_value: Mapped[str] = mapped_column(String(64))
    code_scheme: Mapped[str] = mapped_column(String(16))
    code_meaning: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    positive: Mapped[bool | None] = mapped_column()

    job: Mapped[Job] = relationship(back_populates="findings")


class Measurement(Base):
    """A measurement of one segment, e.g. its volume in mL."""

    __tablename__ = "measurements"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    segment_number: Mapped[int | None] = mapped_column(Integer)
    segment_label: Mapped[str | None] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    unit: Mapped[str] = mapped_column(String(16))

    job: Mapped[Job] = relationship(back_populates="measurements")


class ResultObject(Base):
    """A DICOM object the node produced (SEG or SR), kept in the node's storage."""

    __tablename__ = "result_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512), doc="Relative to the data folder.")
    created_at: Mapped[datetime] = mapped_column(_TS, default=utcnow)
    purged_at: Mapped[datetime | None] = mapped_column(
        _TS, doc="When retention removed the file and its index row; this row and its exports stay as the record."
    )

    job: Mapped[Job] = relationship(back_populates="result_objects")
    exports: Mapped[list[Export]] = relationship(back_populates="result_object", cascade="all, delete-orphan")


class JobPreview(Base):
    """A rendered PNG of a finished job: a key slice with its segmentation overlay or findings.

    Kept in the database rather than the data folder so that a worker on another machine can hand
    it back to the service through the one store both share. One per job; a rerun replaces it.
    """

    __tablename__ = "job_previews"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    png: Mapped[bytes] = mapped_column(LargeBinary)
    slice_index: Mapped[int] = mapped_column(Integer, doc="0-based index into the volume, in slice order.")
    created_at: Mapped[datetime] = mapped_column(_TS, default=utcnow)


class Export(Base):
    """One (result object, destination) delivery with its retry state."""

    __tablename__ = "exports"
    __table_args__ = (UniqueConstraint("result_object_id", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_object_id: Mapped[int] = mapped_column(ForeignKey("result_objects.id"), index=True)
    destination: Mapped[str] = mapped_column(String(128))
    state: Mapped[ExportState] = mapped_column(_enum(ExportState), default=ExportState.pending, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column(_TS)
    delivered_at: Mapped[datetime | None] = mapped_column(_TS)
    updated_at: Mapped[datetime] = mapped_column(_TS, default=utcnow, onupdate=utcnow)

    result_object: Mapped[ResultObject] = relationship(back_populates="exports")


class RetrievalState(enum.StrEnum):
    """``queued -> running -> done | failed``."""

    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


class Retrieval(Base):
    """A study to pull from a configured source (C-MOVE or C-GET), then run models on."""

    __tablename__ = "retrievals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    source: Mapped[str] = mapped_column(String(32))
    model_id: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[RetrievalState] = mapped_column(_enum(RetrievalState), default=RetrievalState.queued, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    instances: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    job_ids: Mapped[str | None] = mapped_column(Text, doc="Comma-separated ids of the jobs it created.")
    created_at: Mapped[datetime] = mapped_column(_TS, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(_TS, default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(_TS)


class ConflictKind(enum.StrEnum):
    """How a repeated SOP Instance UID differed from the stored first copy."""

    content = "content"  # same study and series, different bytes (or another transfer syntax)
    series = "series"  # the UID arrived in another series or study


class InstanceConflict(Base):
    """A repeated SOP Instance UID whose copy differed from the first copy, which was kept.

    The sender was answered Success (it has nothing to fix) and the differing copy was not stored;
    this row lets a person find the reuse of a UID. It holds UIDs and a digest, no patient data.
    """

    __tablename__ = "instance_conflicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True, doc="The first copy, kept.")
    kind: Mapped[ConflictKind] = mapped_column(_enum(ConflictKind))
    study_instance_uid: Mapped[str] = mapped_column(String(64), doc="As the repeated copy gave it.")
    series_instance_uid: Mapped[str] = mapped_column(String(64), doc="As the repeated copy gave it.")
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger, doc="Size of the repeated copy's Part 10 file.")
    sha256: Mapped[str] = mapped_column(String(64), doc="Digest of the repeated copy's Part 10 file.")
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(_TS, default=utcnow)


class FileDeletion(Base):
    """A file or folder of the data folder to remove, written in the transaction that deleted its rows.

    Retention deletes rows first and files after the commit (see :mod:`infergate.retention`); this
    outbox row is what makes the second step survive a crash: a pass that died between the commit
    and the unlink leaves these rows, and the next pass removes the files they name.
    """

    __tablename__ = "file_deletions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(String(512), doc="Relative to the data folder, as the deleted row held it.")
    created_at: Mapped[datetime] = mapped_column(_TS, default=utcnow)
