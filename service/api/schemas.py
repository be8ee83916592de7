"""Response models of the REST API (separate from the SQL tables)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, field_validator

from infergate.store.tables import ExportState, JobState, RetrievalState

UID_PATTERN = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$"


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


#: A database id in a path: positive and within a 32-bit INTEGER on every backend.
RowId = Annotated[int, Path(ge=1, le=2_147_483_647)]


class ErrorOut(BaseModel):
    """Every 4xx answer: a message for a person, never patient data."""

    detail: str


#: Documented on every router, so clients (and schemathesis) know the error answers.
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorOut, "description": "Invalid request"},
    404: {"model": ErrorOut, "description": "Not held by the node"},
    409: {"model": ErrorOut, "description": "Conflicts with the current state"},
}


class Health(BaseModel):
    status: str
    version: str


class ReadyCheck(BaseModel):
    """One readiness check: ``database``, ``broker``, ``storage``, ``workers`` or ``models``."""

    name: str
    ok: bool
    detail: str


class Readiness(BaseModel):
    """``ready`` when every check passed; ``failing`` names the others."""

    status: Literal["ready", "not ready"]
    failing: list[str]
    checks: list[ReadyCheck]


class FindingOut(_Out):
    name: str
    code_value: str
    code_scheme: str
    code_meaning: str
    probability: float
    positive: bool | None


class MeasurementOut(_Out):
    segment_number: int | None
    segment_label: str | None
    name: str
    value: float
    unit: str


class ExportOut(_Out):
    destination: str
    state: ExportState
    attempts: int
    last_status: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None


class ResultObjectOut(_Out):
    """A SEG or SR the job produced, with where to fetch it over DICOMweb (WADO-RS)."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    retrieve_url: str = Field(description="WADO-RS URL of the instance (multipart/related; application/dicom).")
    metadata_url: str = Field(description="WADO-RS URL of its metadata (application/dicom+json).")
    purged_at: datetime | None = Field(
        None,
        description="When retention (INFERGATE_RETAIN_RESULTS_DAYS) removed the object from the node; its URLs then "
        "answer 410 Gone. The UIDs, the export record and the job's findings and measurements stay.",
    )
    exports: list[ExportOut]


class JobSummary(BaseModel):
    id: int
    model_id: str
    model_version: str | None
    state: JobState
    attempts: int
    error: str | None
    study_instance_uid: str
    series_instance_uid: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobDetail(JobSummary):
    findings: list[FindingOut]
    measurements: list[MeasurementOut]
    result_objects: list[ResultObjectOut]
    preview_url: str | None = Field(
        description="PNG of the key slice with the result drawn on it; null until the job has one."
    )
    timings: dict[str, float] | None = Field(
        description="Seconds per stage of the last attempt that produced results: queue_wait, load, preprocess, "
        "onnx, postprocess, seg_build, sr_build, preview, write, record, then export once sent; null before."
    )
    input_purged_at: datetime | None = Field(
        None,
        description="When retention (INFERGATE_RETAIN_INPUTS_DAYS) removed the input series' instances; the job "
        "can then not be retried until the series is sent again.",
    )


class JobRequest(BaseModel):
    """Run ``model_id`` (or, without it, what the routing rules choose) on a study the node holds."""

    model_config = ConfigDict(extra="forbid")

    study_instance_uid: str = Field(pattern=UID_PATTERN, max_length=64)
    series_instance_uid: str | None = Field(None, pattern=UID_PATTERN, max_length=64)
    model_id: str | None = Field(None, max_length=64)
    source: str | None = Field(
        None,
        max_length=32,
        description="Pull the study from this configured source (INFERGATE_SOURCES) first; answered with 202.",
    )


class RetrievalOut(_Out):
    """A study being pulled from a source; its jobs appear in ``job_ids`` once it is retrieved."""

    id: int
    study_instance_uid: str
    source: str
    model_id: str | None
    state: RetrievalState
    attempts: int
    instances: int | None
    error: str | None
    job_ids: list[int]
    created_at: datetime
    finished_at: datetime | None

    @field_validator("job_ids", mode="before")
    @classmethod
    def _ids(cls, value: object) -> object:
        if isinstance(value, str):
            return [int(part) for part in value.split(",") if part]
        return [] if value is None else value


class JobList(BaseModel):
    items: list[JobSummary]
    limit: int
    offset: int


class SeriesResults(BaseModel):
    series_instance_uid: str
    modality: str | None
    series_description: str | None
    state: str
    routing_note: str | None
    num_instances: int
    purged_at: datetime | None = Field(
        None, description="When retention removed the series' instances (num_instances is then 0)."
    )
    jobs: list[JobDetail]


class StudyResults(BaseModel):
    study_instance_uid: str
    series: list[SeriesResults]


class SegmentOut(BaseModel):
    value: int
    name: str
    category: str
    type: str


class ClassOut(BaseModel):
    index: int
    name: str
    code: str


class ModelOut(BaseModel):
    id: str
    version: str
    name: str
    description: str
    task: str
    modalities: list[str]
    dimensionality: int
    sha256: str
    labels: list[SegmentOut]
    classes: list[ClassOut]
