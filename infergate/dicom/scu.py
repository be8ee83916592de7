"""C-STORE SCU: sends result objects to a PACS.

Failures are split the way retry logic needs them. Transient (try again later with backoff): the
peer is unreachable, the association is aborted or times out, it is rejected as *rejected-transient*
(PS3.8 9.3.4, e.g. the peer is busy), or the peer answers 0xA7xx (out of resources). Permanent (the
node does not hammer a PACS that said no): any other failure status (0xA9xx, 0xCxxx, ...), an
association rejected as *rejected-permanent* (e.g. our AE title is unknown to the peer), and a peer
that accepts none of the object's presentation contexts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu import A_ASSOCIATE_RJ

from infergate.config import Destination
from infergate.dicom.net import NODELAY_HANDLER

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreResult:
    """The outcome of one C-STORE: ``status`` is None when no response was received."""

    path: Path
    status: int | None
    error: str | None
    #: Refused without a DIMSE status in a way that trying again will not change (an A-ASSOCIATE-RJ
    #: "rejected-permanent", or no accepted presentation context for the object).
    refused: bool = False
    #: Why no status came back: "network" (peer unreachable, association aborted, no response),
    #: "rejected" (A-ASSOCIATE-RJ, or no presentation context accepted) or "file" (the result file
    #: cannot be read); None when a status came back.
    cause: str | None = None

    @property
    def ok(self) -> bool:
        # Warnings (0xB000, 0xB007, 0xB006) mean the peer stored the object.
        return self.status is not None and (self.status == 0x0000 or (self.status & 0xF000) == 0xB000)

    @property
    def transient(self) -> bool:
        """True when trying again later may help."""
        if self.refused:
            return False
        return self.status is None or (self.status & 0xFF00) == 0xA700


def _not_established(
    destination: Destination, assoc: Association, rejections: list[A_ASSOCIATE_RJ]
) -> tuple[str, bool, str]:
    """Why an association was not established, whether that is permanent, and the cause
    (``rejected`` or ``network``, see :attr:`StoreResult.cause`).

    The A-ASSOCIATE-RJ is taken from the PDUs received rather than from ``assoc.is_rejected``: when a peer
    rejects and closes the connection at once, pynetdicom may see the closed socket before it reads the
    rejection and report the association as aborted.
    """
    if rejections:
        rj = rejections[0]
        kind = "permanent" if rj.result == 0x01 else "transient"
        detail = f"result {rj.result}, source {rj.source}, reason {rj.reason_diagnostic}: {rj.reason_str}"
        return f"{destination}: association rejected-{kind} ({detail})", rj.result == 0x01, "rejected"
    if assoc.is_rejected:
        return f"{destination}: association rejected", False, "rejected"
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        # pynetdicom aborts an association in which the peer accepted no presentation context
        reason = f"{destination}: the peer accepts none of the proposed SOP classes and transfer syntaxes"
        return reason, True, "rejected"
    return f"{destination}: association aborted or peer unreachable", False, "network"


def send_files(
    destination: Destination,
    paths: list[Path],
    *,
    calling_ae: str,
    max_pdu: int = 0,
    timeout: float = 30.0,
) -> list[StoreResult]:
    """Send Part 10 files in one association, proposing each file's SOP class and transfer syntax.

    Returns one result per path, in order. A file that cannot be read is refused (trying again will
    not help) without holding up the others.
    """
    outcome: dict[int, StoreResult] = {}
    datasets: list[tuple[int, Path, Dataset]] = []
    for index, path in enumerate(paths):
        try:
            datasets.append((index, path, dcmread(path)))
        except (OSError, InvalidDicomError) as exc:
            outcome[index] = StoreResult(
                path, None, f"cannot read the result file ({type(exc).__name__})", True, cause="file"
            )
    if datasets:
        for index, result in zip(
            [index for index, _, _ in datasets],
            _send(destination, [(path, ds) for _, path, ds in datasets], calling_ae, max_pdu, timeout),
            strict=True,
        ):
            outcome[index] = result
    return [outcome[index] for index in range(len(paths))]


def _send(
    destination: Destination, items: list[tuple[Path, Dataset]], calling_ae: str, max_pdu: int, timeout: float
) -> list[StoreResult]:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 10.0)
    ae.maximum_pdu_size = max_pdu
    proposed: set[tuple[str, str]] = set()
    for _, ds in items:
        syntax = ds.file_meta.TransferSyntaxUID
        key = (ds.SOPClassUID, syntax)
        if key not in proposed:
            proposed.add(key)
            syntaxes = [syntax] + [s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if s != syntax]
            ae.add_requested_context(ds.SOPClassUID, syntaxes)
    rejections: list[A_ASSOCIATE_RJ] = []

    def on_pdu(event: Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            rejections.append(event.pdu)

    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        evt_handlers=[NODELAY_HANDLER, (evt.EVT_PDU_RECV, on_pdu)],
    )
    if not assoc.is_established:
        reason, refused, cause = _not_established(destination, assoc, rejections)
        return [StoreResult(path, None, reason, refused, cause) for path, _ in items]
    results: list[StoreResult] = []
    try:
        for path, ds in items:
            try:
                response = assoc.send_c_store(ds)
            except ValueError as exc:
                # no accepted presentation context for this object, or it cannot be encoded: permanent
                results.append(StoreResult(path, None, f"{destination}: {exc}", refused=True, cause="rejected"))
                continue
            except RuntimeError as exc:  # the association went away: transient
                results.append(StoreResult(path, None, f"{destination}: {exc}", cause="network"))
                continue
            status = int(response.Status) if "Status" in response else None
            error = (
                None
                if status == 0
                else f"{destination}: status 0x{status:04X}"
                if status is not None
                else (f"{destination}: no response")
            )
            results.append(StoreResult(path, status, error, cause=None if status is not None else "network"))
    finally:
        if assoc.is_established:
            assoc.release()
    return results
