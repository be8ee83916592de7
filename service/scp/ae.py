"""Building the node's Application Entity from Settings."""

from __future__ import annotations

from typing import Any

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
from pynetdicom.transport import ThreadedAssociationServer

from infergate.config import Settings
from infergate.dicom.net import NODELAY_HANDLER, quiet_identifiers
from infergate.dicom.receive import StoreContext, handle_echo, handle_store

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


def build_ae(settings: Settings) -> AE:
    """The node's AE: Verification and the storage SOP classes, calling-AE allow-list applied."""
    quiet_identifiers()
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    ae.add_supported_context(VERIFICATION)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    if settings.allowed_calling_aes:
        ae.require_calling_aet = list(settings.allowed_calling_aes)
    return ae


def start_server(settings: Settings, ctx: StoreContext) -> ThreadedAssociationServer:
    """Start the SCP in the background and return its server (``shutdown()`` stops it)."""
    ae = build_ae(settings)
    handlers: list[Any] = [
        NODELAY_HANDLER,
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ctx]),
    ]
    server = ae.start_server((settings.scp_host, settings.scp_port), block=False, evt_handlers=handlers)
    assert server is not None
    return server
