"""Synthetic single-frame DICOM images and CT phantoms built in memory for unit tests.

Nothing is read from disk or downloaded: every dataset is made here with just the attributes the
volume loader reads, stored uncompressed (Explicit VR Little Endian).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def make_image(
    stored: np.ndarray,
    *,
    modality: str = "CT",
    position: Sequence[float] | None = (0.0, 0.0, 0.0),
    orientation: Sequence[float] | None = AXIAL,
    pixel_spacing: Sequence[float] | None = (1.0, 1.0),
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    photometric: str = "MONOCHROME2",
    instance_number: int = 1,
) -> Dataset:
    """One single-frame greyscale image holding ``stored`` (int16 or uint16) as its pixel data."""
    stored = np.ascontiguousarray(stored)
    if stored.dtype not in (np.int16, np.uint16) or stored.ndim != 2:
        raise ValueError("stored should be a 2-D int16 or uint16 array")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = modality
    ds.InstanceNumber = instance_number
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
    if position is not None:
        ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [f"{v:.6g}" for v in orientation]
    if pixel_spacing is not None:
        ds.PixelSpacing = [f"{v:.6g}" for v in pixel_spacing]
    if slope is not None:
        ds.RescaleSlope = f"{slope:.6g}"
    if intercept is not None:
        ds.RescaleIntercept = f"{intercept:.6g}"
    ds.PixelData = stored.tobytes()
    return ds


def make_series(
    hu: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (2.5, 1.0, 1.0),
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    orientation: Sequence[float] = AXIAL,
    slope: float = 1.0,
    intercept: float = -1024.0,
    modality: str = "CT",
) -> list[Dataset]:
    """A stack of slices whose modality values are ``hu`` ``(slices, rows, columns)``, in order.

    Slice ``k`` lies at ``origin + k * spacing[0] * normal``, ``normal = cross(row, column)``.
    """
    row, column = np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:], dtype=float)
    normal = np.cross(row, column)
    stored = np.round((hu - intercept) / slope).astype(np.int16)
    return [
        make_image(
            stored[k],
            modality=modality,
            position=tuple(np.asarray(origin) + k * spacing[0] * normal),
            orientation=orientation,
            pixel_spacing=spacing[1:],
            slope=slope,
            intercept=intercept,
            instance_number=k + 1,
        )
        for k in range(hu.shape[0])
    ]


@dataclass(frozen=True)
class Phantom:
    """A CT phantom: HU values, the true labels (1 soft tissue, 2 bone) and the voxel spacing."""

    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]


def ct_phantom(
    shape: tuple[int, int, int] = (40, 256, 256),
    spacing: tuple[float, float, float] = (2.5, 1.25, 1.25),
    *,
    bone: bool = True,
    tissue_hu: float = 40.0,
    bone_hu: float = 700.0,
    noise_sd: float = 10.0,
    seed: int = 0,
) -> Phantom:
    """Air (-1000 HU) around an elliptic cylinder of soft tissue holding a round bone cylinder.

    The ellipse has semi-axes 120 x 80 mm; the bone cylinder has a 20 mm radius and is centred
    30 mm right of and 10 mm below the middle; both run through every slice.
    """
    _, rows, columns = shape
    y = (np.arange(rows) - (rows - 1) / 2.0) * spacing[1]
    x = (np.arange(columns) - (columns - 1) / 2.0) * spacing[2]
    yy, xx = np.meshgrid(y, x, indexing="ij")
    tissue = (xx / 120.0) ** 2 + (yy / 80.0) ** 2 <= 1.0
    dense = ((xx - 30.0) ** 2 + (yy - 10.0) ** 2 <= 20.0**2) if bone else np.zeros_like(tissue)
    plane = np.full((rows, columns), -1000.0)
    plane[tissue] = tissue_hu
    plane[dense] = bone_hu
    labels_plane = np.zeros((rows, columns), dtype=np.uint8)
    labels_plane[tissue] = 1
    labels_plane[dense] = 2
    noise = np.random.default_rng(seed).normal(0.0, noise_sd, size=shape)
    hu = np.broadcast_to(plane, shape) + noise
    labels = np.broadcast_to(labels_plane, shape).copy()
    return Phantom(hu=hu.astype(np.float32), labels=labels, spacing=spacing)
