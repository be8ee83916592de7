"""Synthetic input series for validating a model package (``infergate models validate``).

Built from the manifest alone, so any package can be smoke-tested without patient data: a series
of the first accepted modality with consistent geometry and a simple phantom (a bright ellipsoid
in a darker background), read back through :func:`~infergate.dicom.volume.load_volume` exactly as
the worker reads received series.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from infergate.dicom.volume import Volume, load_volume
from infergate.manifest import ModelManifest

_SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _phantom(slices: int, size: int, modality: str) -> np.ndarray:
    z, y, x = np.meshgrid(np.linspace(-1, 1, slices), np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    inside = (x / 0.7) ** 2 + (y / 0.6) ** 2 + (z / 1.2) ** 2 <= 1.0
    core = (x / 0.2) ** 2 + ((y + 0.3) / 0.2) ** 2 <= 1.0
    if modality == "CT":  # air, soft tissue, bone (HU + 1024, stored unsigned)
        values = np.where(inside, 1064, 24) + np.where(inside & core, 700, 0)
    else:
        values = np.where(inside, 800, 20) + np.where(inside & core, 400, 0)
    return values.astype(np.uint16)


def synthetic_series(manifest: ModelManifest) -> tuple[list[Dataset], Volume | None]:
    """Datasets fitting ``manifest.accepts`` and their volume (None for a header-feature model)."""
    accepts = manifest.accepts
    modality = accepts.modalities[0].upper()
    two_d = accepts.dimensionality == 2
    radiograph = modality not in ("CT", "MR")  # projection images: no patient geometry
    slices = 1 if radiograph else max(accepts.min_slices, 4 if two_d else 16)
    if accepts.max_slices is not None:
        slices = min(slices, accepts.max_slices)
    size = 128 if radiograph else 64
    pixels = _phantom(slices, size, modality)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    datasets = []
    for index in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = _SOP_CLASSES.get(modality, _SECONDARY_CAPTURE)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName, ds.PatientID = "Synthetic^Validation", "SYNTHETIC"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.InstanceNumber, ds.SeriesNumber = modality, index + 1, 1
        ds.SeriesDescription = "SYNTHETIC VALIDATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        if accepts.body_parts:
            ds.BodyPartExamined = accepts.body_parts[0]
        if radiograph:
            ds.PixelSpacing = ds.ImagerPixelSpacing = [0.2, 0.2]
            ds.PatientOrientation = ["L", "F"]
        else:
            ds.FrameOfReferenceUID = frame
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [-size * 1.5, -size * 1.5, float(index) * 2.0]
            ds.PixelSpacing = [3.0, 3.0]
            ds.SliceThickness = 2.0
        if modality == "CT":
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        if modality == "MR":
            ds.EchoTime, ds.RepetitionTime, ds.FlipAngle = 3.0, 2000.0, 9.0
            ds.ScanningSequence, ds.SequenceVariant = ["GR", "IR"], ["SP", "MP"]
            ds.MagneticFieldStrength, ds.PixelBandwidth, ds.EchoTrainLength = 3.0, 200.0, 1
            ds.SliceThickness, ds.InversionTime = 2.0, 900.0
            ds.MRAcquisitionType, ds.ImagingFrequency, ds.NumberOfAverages = "3D", 123.2, 1.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels[index].tobytes()
        datasets.append(ds)
    volume = None if manifest.input == "header_features" else load_volume(datasets)
    return datasets, volume
