"""Pulling a study from a PACS: C-MOVE to the node's own SCP, or C-GET on one association.

C-MOVE is what most PACS support and needs the PACS to know the node's AE (its C-STOREs arrive at
the SCP and are stored like any other). C-GET needs no configuration on the PACS: the instances
come back on the same association and are stored here with the same ingest function the SCP
uses. Both are Study Root Query/Retrieve (PS3.4 C.4.2, C.4.3).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.events import Event

from infergate.config import Destination
from infergate.dicom.net import NODELAY_HANDLER, quiet_identifiers

log = logging.getLogger(__name__)

STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"

#: Storage classes proposed with an SCP role for C-GET (the ones the node's SCP accepts).
GET_STORAGE_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.2",  # CT
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4",  # MR
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX for presentation
    "1.2.840.10008.5.1.4.1.1.1.2",  # MG for presentation
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
]


@dataclass(frozen=True)
class RetrieveResult:
    """Sub-operation counts of the final response; ``error`` when the retrieve did not succeed."""

    completed: int
    failed: int
    warning: int
    status: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


def _identifier(study_instance_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_instance_uid
    return ds


def _collect(responses: object, source: Destination) -> RetrieveResult:
    completed = failed = warning = 0
    last_status: int | None = None
    for status, _identifier_ds in responses:  # type: ignore[attr-defined]
        if "Status" not in status:
            return RetrieveResult(completed, failed, warning, None, f"{source}: no response")
        last_status = int(status.Status)
        completed = int(status.get("NumberOfCompletedSuboperations", completed) or completed)
        failed = int(status.get("NumberOfFailedSuboperations", failed) or failed)
        warning = int(status.get("NumberOfWarningSuboperations", warning) or warning)
    if last_status is None:
        return RetrieveResult(0, 0, 0, None, f"{source}: no response")
    if last_status not in (0x0000, 0xB000) or (completed == 0 and failed == 0 and warning == 0):
        return RetrieveResult(
            completed, failed, warning, last_status, f"{source}: status 0x{last_status:04X}, {completed} instances"
        )
    return RetrieveResult(completed, failed, warning, last_status, None)


def move_study(
    source: Destination, study_instance_uid: str, *, calling_ae: str, move_destination: str, timeout: float = 600
) -> RetrieveResult:
    """C-MOVE a study to ``move_destination`` (the node's AE title, known to the PACS)."""
    quiet_identifiers()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = 30
    ae.dimse_timeout = timeout
    ae.add_requested_context(STUDY_ROOT_MOVE)
    assoc = ae.associate(source.host, source.port, ae_title=source.ae_title, evt_handlers=[NODELAY_HANDLER])
    if not assoc.is_established:
        return RetrieveResult(0, 0, 0, None, f"{source}: association rejected or peer unreachable")
    try:
        responses = assoc.send_c_move(_identifier(study_instance_uid), move_destination, STUDY_ROOT_MOVE)
        return _collect(responses, source)
    finally:
        if assoc.is_established:
            assoc.release()


def get_study(
    source: Destination,
    study_instance_uid: str,
    *,
    calling_ae: str,
    store: Callable[[Event], int | Dataset],
    timeout: float = 600,
) -> RetrieveResult:
    """C-GET a study; ``store`` handles each instance (the SCP's own C-STORE handler logic)."""
    quiet_identifiers()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = 30
    ae.dimse_timeout = timeout
    ae.add_requested_context(STUDY_ROOT_GET)
    for sop_class in GET_STORAGE_CLASSES:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    roles = [build_role(sop_class, scp_role=True) for sop_class in GET_STORAGE_CLASSES]
    handlers = [NODELAY_HANDLER, (evt.EVT_C_STORE, store)]
    assoc = ae.associate(
        source.host,
        source.port,
        ae_title=source.ae_title,
        ext_neg=roles,  # type: ignore[arg-type]  # pynetdicom types it as an invariant list of a union
        evt_handlers=handlers,  # type: ignore[arg-type]
    )
    if not assoc.is_established:
        return RetrieveResult(0, 0, 0, None, f"{source}: association rejected or peer unreachable")
    try:
        responses = assoc.send_c_get(_identifier(study_instance_uid), STUDY_ROOT_GET)
        return _collect(responses, source)
    finally:
        if assoc.is_established:
            assoc.release()
