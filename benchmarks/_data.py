"""Synthetic inputs for the benchmarks, built in memory; nothing is downloaded or read from disk.

* :func:`ct_series`: an axial CT series as the worker holds it after ``dcmread``: full CT Image
  headers (patient, study, series, frame of reference, image plane and pixel modules) and pixel
  data. All slices share one pixel buffer (``bytes`` is immutable), so a 200 x 512² series costs
  headers only, not 100 MB.
* :func:`label_map`: a label map with ``n_labels`` ellipsoid blobs, each covering part of the
  slices, as a segmentation model of organs or lesions would produce.
* :func:`manifest_with_labels`: the shipped ``ct-tissue-seg`` manifest cut or extended to
  ``n_labels`` labels.

Everything is a function of the arguments: the same call gives the same UIDs and pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian

from infergate.dicom.uids import derived_uid
from infergate.manifest import Code, ModelManifest, SegmentLabel, load_package

__all__ = [
    "MANIFEST_DIR",
    "PIXEL_SPACING_MM",
    "SLICE_SPACING_MM",
    "ct_series",
    "label_map",
    "manifest_with_labels",
    "series_uid",
]

MANIFEST_DIR = Path(__file__).resolve().parent.parent / "models" / "ct-tissue-seg"
SLICE_SPACING_MM = 2.5
PIXEL_SPACING_MM = 0.8

#: Extra labels, beyond the shipped manifest's, for benchmarks with more segments than it has.
_EXTRA_LABELS = [
    SegmentLabel(
        value=99,  # renumbered in manifest_with_labels
        name=name,
        category=Code(value="91723000", scheme="SCT", meaning="Anatomical Structure"),
        type=Code(value=value, scheme="SCT", meaning=meaning),
        color=color,
    )
    for name, value, meaning, color in (
        ("Liver", "10200004", "Liver", (220, 130, 100)),
        ("Spleen", "78961009", "Spleen", (150, 90, 160)),
        ("Kidney", "64033007", "Kidney", (190, 100, 70)),
    )
]


def series_uid(slices: int, size: int) -> str:
    """Series Instance UID of :func:`ct_series` with these dimensions."""
    return derived_uid("benchmark-ct", str(slices), str(size), "series")


def ct_series(slices: int = 200, size: int = 512) -> list[Dataset]:
    """``slices`` axial CT images of ``size`` x ``size`` pixels, 2.5 mm apart, in slice order."""
    base = ("benchmark-ct", str(slices), str(size))
    study, series, frame = derived_uid(*base, "study"), series_uid(slices, size), derived_uid(*base, "for")
    pixels = np.full((size, size), 1024, dtype="<u2").tobytes()
    origin = -(size - 1) / 2.0 * PIXEL_SPACING_MM
    out: list[Dataset] = []
    for index in range(slices):
        ds = Dataset()
        sop = UID(derived_uid(*base, "instance", str(index)))
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.PatientName, ds.PatientID = "Benchmark^CT", "BENCH0001"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study, "1", "ACC0001"
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20240101", "120000", ""
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "CT", series, 2
        ds.SeriesDescription, ds.BodyPartExamined, ds.PatientPosition = "CT CHEST", "CHEST", "HFS"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        ds.Manufacturer, ds.ManufacturerModelName = "infergate benchmark", "synthetic"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber, ds.AcquisitionNumber = index + 1, 1
        ds.ContentDate, ds.ContentTime = "20240101", "120000"
        ds.ImagePositionPatient = [f"{origin:.6g}", f"{origin:.6g}", f"{index * SLICE_SPACING_MM:.6g}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = [f"{PIXEL_SPACING_MM:g}", f"{PIXEL_SPACING_MM:g}"]
        ds.SliceThickness, ds.KVP = f"{SLICE_SPACING_MM:g}", "120"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.PixelData = pixels
        out.append(ds)
    return out


def label_map(slices: int, size: int, n_labels: int) -> np.ndarray:
    """A uint8 label map (slices, size, size) holding ``n_labels`` ellipsoid blobs, values 1..n.

    Blob *k* is centred at a different place in the volume and spans between a third and two
    thirds of the slices, so most frames hold some but not all segments; later labels are drawn
    over earlier ones where they overlap.
    """
    out = np.zeros((slices, size, size), dtype=np.uint8)
    z = np.arange(slices, dtype=np.float32)[:, None, None]
    y = np.arange(size, dtype=np.float32)[None, :, None]
    x = np.arange(size, dtype=np.float32)[None, None, :]
    for k in range(n_labels):
        angle = 2.0 * np.pi * k / max(n_labels, 1)
        cz = slices * (0.35 + 0.3 * k / max(n_labels - 1, 1))
        cy, cx = size * (0.5 + 0.2 * np.sin(angle)), size * (0.5 + 0.2 * np.cos(angle))
        rz, ry, rx = slices * (0.17 + 0.03 * (k % 3)), size * 0.12, size * (0.1 + 0.02 * (k % 2))
        z0, z1 = max(int(cz - rz), 0), min(int(cz + rz) + 1, slices)
        inside = ((z[z0:z1] - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
        out[z0:z1][inside] = k + 1
    return out


def manifest_with_labels(n_labels: int) -> ModelManifest:
    """The shipped ``ct-tissue-seg`` manifest with its first ``n_labels`` labels (extended if needed).

    Labels are numbered 1..n as in the shipped manifest; the "Body" volume total keeps only the
    labels that remain.
    """
    manifest = load_package(MANIFEST_DIR, verify_hash=False).manifest
    available = [*manifest.labels, *_EXTRA_LABELS]
    if not 1 <= n_labels <= len(available):
        raise ValueError(f'Argument "n_labels" should be between 1 and {len(available)}, not {n_labels}.')
    labels = available[:n_labels]
    values = set(range(1, n_labels + 1))
    data = manifest.model_dump()
    data["labels"] = [{**label.model_dump(), "value": value} for value, label in enumerate(labels, start=1)]
    data["volume_totals"] = [
        {**t.model_dump(), "labels": [v for v in t.labels if v in values]}
        for t in manifest.volume_totals
        if any(v in values for v in t.labels)
    ]
    return ModelManifest.model_validate(data)
