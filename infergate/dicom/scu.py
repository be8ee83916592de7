"""C-STORE SCU: sends result objects to a PACS.

Failures are split the way retry logic needs them: a refused association or a network error is
transient (try again later with backoff); a failure status from the peer (0xA7xx out of resources
excepted) is permanent for that object, so the node does not hammer a PACS that said no.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from infergate.config import Destination
from infergate.dicom.net import NODELAY_HANDLER

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreResult:
    """The outcome of one C-STORE: ``status`` is None when no response was received."""

    path: Path
    status: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        # Warnings (0xB000, 0xB007, 0xB006) mean the peer stored the object.
        return self.status is not None and (self.status == 0x0000 or (self.status & 0xF000) == 0xB000)

    @property
    def transient(self) -> bool:
        """True when trying again later may help."""
        return self.status is None or (self.status & 0xFF00) == 0xA700


def send_files(
    destination: Destination,
    paths: list[Path],
    *,
    calling_ae: str,
    max_pdu: int = 0,
    timeout: float = 30.0,
) -> list[StoreResult]:
    """Send Part 10 files in one association, proposing each file's SOP class and transfer syntax."""
    datasets = [dcmread(path) for path in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 10.0)
    ae.maximum_pdu_size = max_pdu
    proposed: set[tuple[str, str]] = set()
    for ds in datasets:
        syntax = ds.file_meta.TransferSyntaxUID
        key = (ds.SOPClassUID, syntax)
        if key not in proposed:
            proposed.add(key)
            syntaxes = [syntax] + [s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if s != syntax]
            ae.add_requested_context(ds.SOPClassUID, syntaxes)
    assoc = ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title, evt_handlers=[NODELAY_HANDLER]
    )
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "association aborted or peer unreachable"
        return [StoreResult(path, None, f"{destination}: {reason}") for path in paths]
    results: list[StoreResult] = []
    try:
        for path, ds in zip(paths, datasets, strict=True):
            try:
                response = assoc.send_c_store(ds)
            except (RuntimeError, ValueError) as exc:
                results.append(StoreResult(path, None, f"{destination}: {exc}"))
                continue
            status = int(response.Status) if "Status" in response else None
            error = (
                None
                if status == 0
                else f"{destination}: status 0x{status:04X}"
                if status is not None
                else (f"{destination}: no response")
            )
            results.append(StoreResult(path, status, error))
    finally:
        if assoc.is_established:
            assoc.release()
    return results
