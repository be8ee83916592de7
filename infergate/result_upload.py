"""Results handed back by a worker that does not share the node's data folder.

A worker on another machine (``INFERGATE_NODE_URL``) writes its SEG and SR into its own data folder,
then uploads each one to the node (``PUT /api/v1/jobs/{job_id}/results/{kind}/{sop_instance_uid}``), before it
records the job in SQL. The node stores the file at the very relative path the job's
``result_objects`` row will name (:func:`~infergate.dicom.storage.result_relpath`), so that WADO-RS,
QIDO-RS and the exports find it where a co-located worker would have put it.

STOW-RS is not used for this on purpose: an instance stored that way enters completion and routing
as a new input, and would lie outside ``results/``. This path accepts only what the job itself
will record: a Part 10 SEG or SR whose SOP Instance and Series UIDs are the ones derived from the
job's source series and model (:func:`~infergate.dicom.uids.result_uids`), for a job running under
the attempt the worker claims. Anything else is refused before a byte is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage
from sqlalchemy.orm import Session

from infergate.dicom.storage import replace_file, result_relpath
from infergate.dicom.uids import is_valid_uid, result_uids
from infergate.errors import Conflict, InvalidInput, NotFound
from infergate.store.tables import Job, JobState

log = logging.getLogger(__name__)

__all__ = ["RESULT_SOP_CLASSES", "ResultName", "check_result", "store_result"]

#: The SOP Class of each kind of result the pipeline writes (infergate.dicom.seg / sr).
RESULT_SOP_CLASSES = {"SEG": SegmentationStorage, "SR": Comprehensive3DSRStorage}


@dataclass(frozen=True)
class ResultName:
    """A checked name of a result: its kind (``"SEG"`` or ``"SR"``) and a valid SOP Instance UID."""

    kind: str
    sop_instance_uid: str

    @classmethod
    def parse(cls, kind: str, sop_instance_uid: str) -> ResultName:
        """Check what a request names; only these two values ever make a path.

        The path is built by :func:`~infergate.dicom.storage.result_relpath` from a known kind and a
        UID that follows the UID grammar (digits and dots, no leading zeros, no empty component),
        so ``..``, slashes or NUL bytes cannot lead anywhere.

        Raises
        ------
        InvalidInput
            The kind is neither SEG nor SR, or the UID breaks the UID grammar (PS3.5 9.1).
        """
        if kind not in RESULT_SOP_CLASSES:
            raise InvalidInput('Argument "kind" should be SEG or SR.')
        if not is_valid_uid(sop_instance_uid):
            raise InvalidInput('Argument "sop_instance_uid" is not a valid UID.')
        return cls(kind, sop_instance_uid)

    def relpath(self, job_id: int) -> Path:
        """Where the result lies in a data folder: ``results/<job>/<kind>-<uid>.dcm``."""
        return result_relpath(job_id, self.kind, self.sop_instance_uid)


def _read(data: bytes) -> Dataset:
    if not data:
        raise InvalidInput("The request body is empty; send the result as a DICOM Part 10 file.")
    try:
        return dcmread(BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError) as exc:
        # what pydicom raises on a body that is not Part 10, or is truncated or malformed
        raise InvalidInput(f"The request body is not a readable DICOM Part 10 file ({type(exc).__name__}).") from None


def _check_pixel_data(ds: Dataset, kind: str) -> None:
    """A SEG's native Pixel Data must hold every frame: pydicom reads a truncated file without a word."""
    if "PixelData" not in ds:
        if kind == "SEG":
            raise InvalidInput("The SEG result has no Pixel Data.")
        return
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or syntax.is_encapsulated:
        return  # compressed frames carry their own lengths
    try:
        expected = get_expected_length(ds, "bytes")
    except (AttributeError, KeyError, TypeError, ValueError):
        raise InvalidInput(f"The {kind} result lacks the attributes that size its Pixel Data.") from None
    if len(ds.PixelData) < expected:
        raise InvalidInput(
            f"The {kind} result's Pixel Data holds {len(ds.PixelData)} bytes, fewer than the {expected} its "
            "frames need (a truncated file?)."
        )


def check_result(
    ds: Dataset, name: ResultName, *, study_uid: str, source_series_uid: str, model_id: str, model_version: str
) -> None:
    """Refuse a dataset that is not the result the job records under ``name``.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The uploaded object, as read.
    name : ResultName
        The checked kind and SOP Instance UID it is uploaded under.
    study_uid, source_series_uid : str
        Study and Series Instance UIDs of the job's source series.
    model_id, model_version : str
        The job's model and the version the worker ran (both go into the derived UIDs).

    Raises
    ------
    InvalidInput
        The SOP Class is not that of the kind, a UID differs from what the job derives (the
        message names the attribute, never its value), or a SEG's Pixel Data is short.
    """
    expected_class = RESULT_SOP_CLASSES[name.kind]
    if ds.get("SOPClassUID") != expected_class:
        raise InvalidInput(f"A {name.kind} result should have SOP Class UID {expected_class} ({expected_class.name}).")
    series_uid, instance_uid = result_uids(source_series_uid, model_id, model_version, name.kind)
    meta = getattr(ds, "file_meta", Dataset())
    derived = "the UID derived from the job and model version"
    checks = (
        ("SOPInstanceUID", ds.get("SOPInstanceUID"), name.sop_instance_uid, "the UID in the request"),
        (
            "MediaStorageSOPInstanceUID",
            meta.get("MediaStorageSOPInstanceUID"),
            name.sop_instance_uid,
            "the UID in the request",
        ),
        ("SOPInstanceUID", ds.get("SOPInstanceUID"), instance_uid, derived),
        ("SeriesInstanceUID", ds.get("SeriesInstanceUID"), series_uid, derived),
        ("StudyInstanceUID", ds.get("StudyInstanceUID"), study_uid, "the job's study"),
    )
    for keyword, value, expected, source in checks:
        if value != expected:
            raise InvalidInput(f"The {name.kind} result's {keyword} does not match {source}.")
    _check_pixel_data(ds, name.kind)


def store_result(
    session: Session,
    data_root: Path,
    job_id: int,
    kind: str,
    sop_instance_uid: str,
    data: bytes,
    *,
    model_version: str,
    attempt: int,
) -> Path:
    """Check an uploaded SEG/SR against its job and write it durably where the job's row will point.

    The file is replaced atomically (:func:`~infergate.dicom.storage.replace_file`): a rerun of the
    job yields the same UIDs, hence the same path, and a reader never sees half a file.

    Parameters
    ----------
    session : sqlalchemy.orm.Session
        Only read; the caller owns it.
    data_root : pathlib.Path
        The node's data folder.
    job_id : int
        The job the worker ran.
    kind, sop_instance_uid : str
        What the request names (checked by :meth:`ResultName.parse`).
    data : bytes
        The Part 10 file.
    model_version : str
        The version of the model the worker ran (it is part of the derived UIDs).
    attempt : int
        The job attempt the worker runs; an older one has lost the job to a newer attempt.

    Returns
    -------
    pathlib.Path
        The relative path written.

    Raises
    ------
    NotFound
        No such job.
    Conflict
        The job is not running, or runs under another attempt (its worker lost the lease).
    InvalidInput
        A bad kind or UID, a body that is no Part 10 file, or a dataset that is not this job's result.
    OutOfSpace
        The node's data folder is full; nothing was replaced.
    """
    name = ResultName.parse(kind, sop_instance_uid)
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"Job {job_id} does not exist.")
    if job.state != JobState.running:
        raise Conflict(f"Job {job_id} is {job.state.value}, not running: results are taken only while it runs.")
    if job.attempts != attempt:
        raise Conflict(f"Job {job_id} runs attempt {job.attempts}, not {attempt}: this attempt lost its lease.")
    ds = _read(data)
    check_result(
        ds,
        name,
        study_uid=job.series.study.study_instance_uid,
        source_series_uid=job.series.series_instance_uid,
        model_id=job.model_id,
        model_version=model_version,
    )
    relpath = name.relpath(job_id)
    replace_file(data_root, relpath, data)
    log.info("job %d: %s result received from its worker (%d bytes)", job_id, name.kind, len(data))
    return relpath
