"""Receiving instances over DICOM: the C-STORE handler of the SCP, also used for C-GET retrieves.

The C-STORE handler only stores: it checks the UIDs, writes the Part 10 file, fsyncs it, commits
its row and answers. Inference, routing and network calls happen elsewhere (pynetdicom runs one
thread per association; a slow handler stalls the sender).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from infergate.dicom.storage import OutOfSpace
from infergate.errors import InvalidInput
from infergate.ingest import IngestOutcome, InstanceHeader, ingest_instance

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210


@dataclass(frozen=True)
class StoreContext:
    """What the C-STORE handler needs, bound as the handler's extra argument."""

    factory: sessionmaker[Session]
    data_root: Path


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


def handle_echo(event: Event) -> int:
    """``EVT_C_ECHO``: always Success (PS3.7 9.1.5)."""
    return SUCCESS


def handle_store(event: Event, ctx: StoreContext) -> int | Dataset:
    """``EVT_C_STORE``: store one instance durably.

    Statuses returned
    -----------------
    0x0000 Success
        The file is fsync'd and its row committed, or the SOP Instance UID was already stored
        (the first copy is kept).
    0xA700 Refused: out of resources
        Storage full or database unavailable; nothing of ours was kept, the sender may retry.
    0xA900 Error: data set does not match SOP class
        The dataset's SOP Class/Instance UID differs from the request's.
    0xC210 Error: cannot understand
        The dataset could not be decoded, or a UID is missing or malformed.

    Any other exception propagates so that pynetdicom answers 0xC211 and logs it.
    """
    request = event.request
    assert isinstance(request, C_STORE)
    try:
        ds = event.dataset
        header = InstanceHeader.from_dataset(
            ds,
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
        )
    except InvalidInput as exc:
        log.warning("C-STORE refused: %s", exc)
        return _status(CANNOT_UNDERSTAND, str(exc))
    except ValueError as exc:
        log.warning("C-STORE refused: %s", exc)
        return _status(DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc))
    except Exception as exc:  # noqa: BLE001 - any decoding error of hostile input is 0xC210
        log.warning("C-STORE dataset could not be decoded (%s)", type(exc).__name__)
        return _status(CANNOT_UNDERSTAND, "The dataset could not be decoded.")

    assoc = event.assoc
    try:
        outcome = ingest_instance(
            ctx.factory,
            ctx.data_root,
            header,
            event.encoded_dataset(include_meta=True),
            calling_ae=assoc.requestor.ae_title.strip() or None,
            called_ae=assoc.acceptor.ae_title.strip() or None,
        )
    except OutOfSpace:
        log.error("C-STORE refused: storage volume is full")
        return _status(OUT_OF_RESOURCES, "Storage full.")
    except OperationalError as exc:
        log.error("C-STORE refused: database unavailable (%s)", type(exc.orig).__name__)
        return _status(OUT_OF_RESOURCES, "Database unavailable.")
    if outcome is IngestOutcome.duplicate:
        log.info("duplicate SOP Instance UID: first copy kept")
    return SUCCESS
