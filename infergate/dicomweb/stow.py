"""STOW-RS: storing the Part 10 files of a request, one part at a time (PS3.18 10.5).

Each part takes the SCP's path into the store, :func:`~infergate.ingest.ingest_instance`, so an
instance acknowledged over DICOMweb is as durable as one acknowledged over DIMSE (fsync'd, then
committed) and enters the same completion and routing path. The File Meta Information plays the
part of the C-STORE request: its SOP Class/Instance UIDs must agree with the dataset's.

Failure reasons (PS3.18 Table I.2-2; one code per instance, the most specific that applies):

======  ==========================================================================================
0xC000  Error: cannot understand. Not a Part 10 file, undecodable (a dataset that is not whole
        elements to its last byte, a deflated one that inflates too far: the SCP's checks), a
        missing or malformed UID, or a part that is not ``application/dicom``.
0xC122  Referenced Transfer Syntax not supported: a syntax the node's SCP does not accept either.
0x0122  Referenced SOP Class not supported: a SOP Class the node's SCP does not accept either.
0xA900  Error: data set does not match SOP Class. The dataset's SOP Class/Instance UIDs differ from
        its File Meta Information's, or (``POST /studies/{study}``) its Study Instance UID differs
        from the request's. PS3.18 10.5.3 lists the study mismatch among conflicts but gives it no
        code; the node treats it as it treats a dataset that contradicts its request over DIMSE
        (PS3.4 B.2.3), as the SCP does.
0xA700  Refused: out of resources. Storage full or database unavailable; nothing was kept.
0x0110  Processing failure: anything unexpected (logged with its traceback).
======  ==========================================================================================

A SOP Instance UID the node already holds counts as stored; the first copy is kept (as the SCP).
"""

from __future__ import annotations

import enum
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import UID
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from infergate.dicom.receive import check_encoding, inflate_dataset
from infergate.dicom.storage import OutOfSpace
from infergate.dicom.uids import is_valid_uid
from infergate.dicomweb.multipart import Buffer, Part, split_parts
from infergate.errors import InvalidInput
from infergate.ingest import InstanceHeader, ingest_instance

__all__ = ["FailureReason", "StoreOutcome", "StorePolicy", "store_multipart", "store_part", "store_response"]

log = logging.getLogger(__name__)

_PREAMBLE = 128


class FailureReason(enum.IntEnum):
    """Failure Reason (0008,1197) values of the Store Instances Response (PS3.18 I.2.2)."""

    PROCESSING_FAILURE = 0x0110
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122


@dataclass(frozen=True)
class StorePolicy:
    """What the node accepts: the SCP's SOP Classes and Transfer Syntaxes, passed in by the API."""

    sop_class_uids: frozenset[str]
    transfer_syntax_uids: frozenset[str]


@dataclass(frozen=True)
class StoreOutcome:
    """The result for one part: its UIDs (empty when unreadable) and a failure reason, if any."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    failure: FailureReason | None = None
    detail: str = ""

    @property
    def stored(self) -> bool:
        return self.failure is None


def _uid_or_empty(value: object) -> str:
    """A received UID for the response, or "" when it is not one (it must stay valid DICOM JSON)."""
    return str(value) if is_valid_uid(str(value) if value is not None else None) else ""


def _failed(reason: FailureReason, detail: str, ds: Dataset | None = None) -> StoreOutcome:
    meta = getattr(ds, "file_meta", None) if ds is not None else None
    sop_class = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    sop_instance = meta.get("MediaStorageSOPInstanceUID") if meta is not None else None
    if ds is not None:
        sop_class = sop_class or ds.get("SOPClassUID")
        sop_instance = sop_instance or ds.get("SOPInstanceUID")
    log.warning("STOW-RS part refused with 0x%04X: %s", int(reason), detail)
    return StoreOutcome(_uid_or_empty(sop_class), _uid_or_empty(sop_instance), failure=reason, detail=detail)


class _ViewReader(io.RawIOBase):
    """A read-only file over a buffer (a slice of the spooled body's ``mmap``), without copying it.

    ``BytesIO(content)`` would copy a whole part into memory before pydicom looks at its first
    bytes; reading through this keeps a garbage part at no memory and a real one at its values.
    """

    def __init__(self, view: memoryview) -> None:
        self._view, self._pos = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._view[self._pos : self._pos + len(buffer)]
        count = len(chunk)
        memoryview(buffer).cast("B")[:count] = chunk
        self._pos += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _after_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group != 0x0002


def _check_dataset_encoding(view: memoryview) -> None:
    """The dataset after the File Meta Information is whole elements to its last byte, and a deflated
    one inflates within bounds (:func:`~infergate.dicom.receive.check_encoding`, as the SCP checks):
    pydicom reads a dataset cut short without complaint, and inflates a deflated one whole."""
    with _ViewReader(view) as handle:
        read_preamble(handle, False)  # type: ignore[arg-type]  # raises InvalidDicomError without "DICM"
        meta = read_dataset(handle, False, True, stop_when=_after_meta)  # type: ignore[arg-type]
        start = handle.tell()
    syntax = UID(str(meta.get("TransferSyntaxUID", "") or ""))
    if not syntax.is_transfer_syntax:
        return  # refused by the policy check; pydicom reads it as explicit VR, inflating nothing
    if syntax.is_deflated:
        check_encoding(inflate_dataset(view[start:]), implicit_vr=False, little_endian=True)
    else:
        check_encoding(view[start:], implicit_vr=syntax.is_implicit_VR, little_endian=syntax.is_little_endian)


def _read(content: bytes | memoryview) -> Dataset:
    """Read and fully decode a Part 10 file; every element is parsed so garbage fails here, not in a worker."""
    _check_dataset_encoding(memoryview(content))
    # Not wrapped in io.BufferedReader: pydicom takes one for a named file on disk.
    with _ViewReader(memoryview(content)) as handle:
        ds = dcmread(handle, force=False)
        for dataset in (ds.file_meta, ds):  # the meta too: its UIDs are read right after this
            for _ in dataset.iterall():
                pass
    return ds


def store_part(
    factory: sessionmaker[Session],
    data_root: Path,
    content: bytes | memoryview,
    *,
    policy: StorePolicy,
    study_instance_uid: str | None = None,
) -> StoreOutcome:
    """Check and durably store one Part 10 file of a STOW-RS request.

    Parameters
    ----------
    factory, data_root
        The store, as the SCP's handler gets them.
    content
        The part's content: a complete Part 10 file (preamble, ``DICM``, meta, dataset).
    policy
        The SOP Classes and Transfer Syntaxes accepted.
    study_instance_uid
        The study of a ``POST /studies/{study}`` request; every instance must belong to it.

    Returns
    -------
    StoreOutcome
        Stored (or already held), or the failure reason from the module's table. Only the
        unexpected goes to the log with a traceback; nothing raises for a bad part, so one bad
        instance never costs the others their acknowledgement.
    """
    try:
        ds = _read(content)
    except InvalidDicomError:
        return _failed(FailureReason.CANNOT_UNDERSTAND, "The part is not a DICOM Part 10 file.")
    except InvalidInput as exc:
        return _failed(FailureReason.CANNOT_UNDERSTAND, str(exc))
    except Exception as exc:  # noqa: BLE001 - any decoding error of hostile input is "cannot understand"
        return _failed(FailureReason.CANNOT_UNDERSTAND, f"The dataset could not be decoded ({type(exc).__name__}).")

    meta = ds.file_meta
    required = ("TransferSyntaxUID", "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID")
    if any(not meta.get(keyword) for keyword in required):
        return _failed(FailureReason.CANNOT_UNDERSTAND, "The File Meta Information lacks a required UID.", ds)
    syntax = str(meta.TransferSyntaxUID)
    if syntax not in policy.transfer_syntax_uids:
        return _failed(FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED, "Transfer Syntax not accepted by this node.", ds)
    sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
    if sop_class not in policy.sop_class_uids:
        return _failed(FailureReason.SOP_CLASS_NOT_SUPPORTED, "SOP Class not accepted by this node.", ds)
    try:
        header = InstanceHeader.from_dataset(
            ds,
            sop_class_uid=sop_class,
            sop_instance_uid=str(meta.get("MediaStorageSOPInstanceUID", "")),
            transfer_syntax_uid=syntax,
        )
    except InvalidInput as exc:
        return _failed(FailureReason.CANNOT_UNDERSTAND, str(exc), ds)
    except ValueError as exc:
        return _failed(FailureReason.DATA_SET_DOES_NOT_MATCH, str(exc), ds)
    if study_instance_uid is not None and header.study_instance_uid != study_instance_uid:
        return _failed(
            FailureReason.DATA_SET_DOES_NOT_MATCH, "The Study Instance UID differs from the request's study.", ds
        )

    # The preamble is free for any content (PS3.10 7.1); zeroing it keeps a dual-format payload
    # (a TIFF or an executable, CVE-2019-11687) from being served back from this node.
    encoded: list[bytes | memoryview] = [
        bytes(_PREAMBLE),
        memoryview(content)[_PREAMBLE:],
    ]  # written as is: no copy of the part
    try:
        ingest_instance(factory, data_root, header, encoded, calling_ae=None, called_ae=None)
    except OutOfSpace:
        return _failed(FailureReason.OUT_OF_RESOURCES, "Storage full.", ds)
    except OperationalError as exc:
        return _failed(FailureReason.OUT_OF_RESOURCES, f"Database unavailable ({type(exc.orig).__name__}).", ds)
    except Exception:  # noqa: BLE001 - reported per instance so the others' results still reach the client
        log.exception("STOW-RS part failed unexpectedly")
        return _failed(FailureReason.PROCESSING_FAILURE, "Unexpected error while storing.", ds)
    return StoreOutcome(
        sop_class_uid=header.sop_class_uid,
        sop_instance_uid=header.sop_instance_uid,
        study_instance_uid=header.study_instance_uid,
        series_instance_uid=header.series_instance_uid,
    )


def store_multipart(
    factory: sessionmaker[Session],
    data_root: Path,
    body: Buffer,
    boundary: str,
    *,
    policy: StorePolicy,
    study_instance_uid: str | None = None,
    max_parts: int | None = None,
) -> list[StoreOutcome]:
    """Store every part of a ``multipart/related; type="application/dicom"`` body, in order.

    The whole body is split first, so a malformed or oversized body is refused before anything is
    stored; then each part is copied out of ``body`` (an ``mmap`` of the spooled request) and
    stored on its own, one part in memory at a time.

    Raises
    ------
    TooManyParts
        More than ``max_parts`` parts.
    InvalidInput
        The body is malformed (see :func:`~infergate.dicomweb.multipart.split_parts`) or has no part.
    """
    parts = split_parts(body, boundary, max_parts=max_parts)
    if not parts:
        raise InvalidInput("The multipart body has no parts.")
    with memoryview(body) as view:  # type: ignore[arg-type]  # bytes, bytearray and mmap all export buffers
        return [_store_one(factory, data_root, view, part, policy, study_instance_uid) for part in parts]


def _store_one(
    factory: sessionmaker[Session],
    data_root: Path,
    view: memoryview,
    part: Part,
    policy: StorePolicy,
    study_instance_uid: str | None,
) -> StoreOutcome:
    """Check the part's media type, then store its content straight from ``view`` (no copy)."""
    try:
        media = part.content_type("application/dicom")
    except InvalidInput as exc:
        return _failed(FailureReason.CANNOT_UNDERSTAND, str(exc))
    if media.essence != "application/dicom":
        return _failed(FailureReason.CANNOT_UNDERSTAND, f"A part is {media.essence}, not application/dicom.")
    with view[part.start : part.end] as content:
        return store_part(factory, data_root, content, policy=policy, study_instance_uid=study_instance_uid)


def store_response(
    outcomes: Sequence[StoreOutcome], *, retrieve_url: str, instance_url: Callable[[StoreOutcome], str]
) -> Dataset:
    """The Store Instances Response Module (PS3.18 Table I.1-1) for a request's outcomes.

    Parameters
    ----------
    retrieve_url
        The study's Retrieve URL (0008,1190), or "" when the instances span several studies (the
        attribute is Type 2, so it is then present and empty).
    instance_url
        The Retrieve URL of a stored instance.
    """
    response = Dataset()
    response.RetrieveURL = retrieve_url
    failed, referenced = [], []
    for outcome in outcomes:
        item = Dataset()
        item.ReferencedSOPClassUID = outcome.sop_class_uid
        item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
        if outcome.failure is None:
            item.RetrieveURL = instance_url(outcome)
            referenced.append(item)
        else:
            item.FailureReason = int(outcome.failure)
            failed.append(item)
    if failed:
        response.FailedSOPSequence = failed
    if referenced:
        response.ReferencedSOPSequence = referenced
    return response
