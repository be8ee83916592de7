"""Building and running the node's DICOM SCP from Settings: who may associate, for how long, how much.

The guards a hospital network needs sit in front of the C-STORE handler (which only stores):

* **Admission** (:mod:`service.scp.admission`): each A-ASSOCIATE-RQ is checked against the allowed
  networks, the calling-AE allow-list and the called AE title (rejected-permanent), then the free-space
  watermark and the association limits, in all and per peer address (rejected-transient, 2/3/2
  local-limit-exceeded, so the sender keeps the study and retries). Nothing is deleted to make room.
* **Transport** (:mod:`service.scp.transport`): connection caps before any thread starts, socket
  timeouts for stalled PDUs, PDUs bounded by the announced maximum, and TLS (BCP 195, client
  certificates required) with the handshake out of the accept loop.
* **Timers** (pynetdicom, from Settings): the ARTIM timer (``acse_timeout``) closes connections that
  never send an A-ASSOCIATE-RQ, the idle timer (``network_timeout``) associations that stop talking.
* **Audit** (:class:`~service.scp.admission.Gate`): association accepted (110114 Login), rejected
  (Login, failure) and ended (Logout); instances received, one 110104 DICOM Instances Transferred
  summary per association (study UIDs, SOP classes, counts); refused connections and TLS handshakes
  (110113 Security Alert). Refusals are rate-limited per address and kind, so a flood cannot fill the
  disk with audit lines.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, cast

from pydicom.uid import (
    JPEG2000,
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from pynetdicom import AE, evt

from infergate.audit import Auditor
from infergate.config import Settings
from infergate.dicom.net import NODELAY_HANDLER, quiet_identifiers
from infergate.dicom.receive import StoreContext, handle_echo
from service.scp.admission import (
    Gate,
    admit,
    audit_aborted,
    audit_accepted,
    audit_rejected,
    audit_released,
    free_bytes,
    store_and_count,
)
from service.scp.transport import BCP195_TLS12_CIPHERS, NodeServer, tls_context

__all__ = [
    "BCP195_TLS12_CIPHERS",
    "STORAGE_SOP_CLASSES",
    "TRANSFER_SYNTAXES",
    "VERIFICATION",
    "build_ae",
    "free_bytes",
    "start_server",
    "tls_context",
]

VERIFICATION = "1.2.840.10008.1.1"

STORAGE_SOP_CLASSES = [
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    BasicTextSRStorage,
]

#: Accepted as received: uncompressed, deflate, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]


# Building and starting -----------------------------------------------------------------------------------


def build_ae(settings: Settings) -> AE:
    """The node's AE: Verification and the storage SOP classes, AE checks, limits and timeouts applied."""
    quiet_identifiers()
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    ae.acse_timeout = settings.scp_acse_timeout_seconds
    ae.dimse_timeout = settings.scp_dimse_timeout_seconds
    ae.network_timeout = settings.scp_network_timeout_seconds
    # pynetdicom counts every association thread (also those still negotiating or being rejected); the
    # gate's limits come first, so this is set to the connection cap, as a backstop.
    ae.maximum_associations = 2 * settings.scp_max_associations
    ae.require_called_aet = settings.scp_require_called_ae
    ae.add_supported_context(VERIFICATION)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    if settings.allowed_calling_aes:
        ae.require_calling_aet = list(settings.allowed_calling_aes)
    return ae


def start_server(
    settings: Settings,
    ctx: StoreContext,
    auditor: Auditor | None = None,
    *,
    free_space: Callable[[], int] | None = None,
) -> NodeServer:
    """Start the SCP in the background and return its server (``shutdown()`` stops it).

    ``auditor`` defaults to ``Auditor.from_settings(settings, "scp")``.

    Raises
    ------
    ValueError
        If the TLS files cannot be loaded (see :func:`tls_context`).
    """
    auditor = auditor or Auditor.from_settings(settings, process="scp")
    gate = Gate(settings, auditor, free_space=free_space)
    ae = build_ae(settings)
    handlers: list[Any] = [
        NODELAY_HANDLER,
        (evt.EVT_REQUESTED, admit, [gate]),
        (evt.EVT_ACCEPTED, audit_accepted, [gate]),
        (evt.EVT_REJECTED, audit_rejected, [gate]),
        (evt.EVT_RELEASED, audit_released, [gate]),
        (evt.EVT_ABORTED, audit_aborted, [gate]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, store_and_count, [ctx, gate]),
    ]
    server = cast(
        NodeServer,
        ae.make_server(
            (settings.scp_host, settings.scp_port),
            ssl_context=tls_context(settings),
            evt_handlers=handlers,
            server_class=NodeServer,
            gate=gate,
        ),
    )
    ae._servers.append(server)  # as AE.start_server does, so that server.shutdown() and ae.shutdown() work
    thread = threading.Thread(target=server.serve_forever, name="scp-accept", daemon=True)
    thread.start()
    return server
