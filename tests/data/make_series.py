"""Generate realistic, deterministic DICOM test series; nothing is downloaded.

No package ships a multi-slice CT series that can be used offline, so the tests build their own: full CT and
MR Image IODs (PS3.3 A.3 and A.4) with consistent geometry and UIDs, one Part 10 file per slice, and pixel
content drawn from simple phantoms whose ground-truth labels are available (:func:`ct_phantom_labels`,
:func:`ct_phantom_tissues`, :func:`mr_phantom_labels`), so that a segmentation model's output can be scored with
Dice, and whose CT tissue volumes are known exactly (:func:`ct_phantom_volumes_ml`).

Everything is a function of the arguments and ``seed``: the same call writes byte-identical files, which keeps
test failures reproducible.

Usage::

    python -m tests.data.make_series ct --out DIR --slices 100 --size 512
    python -m tests.data.make_series mr --out DIR --slices 24 --size 128 --orientation sagittal
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom.uid as uids
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

__all__ = [
    "COMPRESSED_SYNTAXES",
    "CT_INTERCEPT",
    "HU_AIR",
    "HU_BONE",
    "HU_FAT",
    "HU_LUNG",
    "HU_SOFT_TISSUE",
    "LABEL_BONE",
    "LABEL_BRAIN",
    "LABEL_SOFT_TISSUE",
    "SUPPORTED_SYNTAXES",
    "TISSUE_BONE",
    "TISSUE_FAT",
    "TISSUE_LUNG",
    "TISSUE_NAMES",
    "TISSUE_SOFT",
    "SeriesInfo",
    "ct_phantom_hu",
    "ct_phantom_labels",
    "ct_phantom_tissues",
    "ct_phantom_volumes_ml",
    "mr_phantom_labels",
    "write_ct_series",
    "write_mr_series",
]

#: Lossless syntaxes pydicom 3 can encode offline here (RLE natively, JPEG 2000 via pylibjpeg-openjpeg,
#: JPEG-LS via pyjpegls). Send them with the matching storescu flag (``-xr``, ``-xv``, ``-xt``).
COMPRESSED_SYNTAXES: tuple[UID, ...] = (RLELossless, JPEG2000Lossless, JPEGLSLossless)
SUPPORTED_SYNTAXES: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, *COMPRESSED_SYNTAXES)

#: CT values are stored as HU + 1024 in 12 unsigned bits (RescaleIntercept -1024), as most scanners do.
CT_INTERCEPT = -1024
HU_AIR, HU_LUNG, HU_SOFT_TISSUE, HU_BONE = -1000.0, -800.0, 40.0, 700.0
#: Subcutaneous fat; typical adipose tissue lies between -120 and -80 HU.
HU_FAT = -90.0
#: Labels of :func:`ct_phantom_labels` (two classes: fat counts as soft tissue there).
LABEL_SOFT_TISSUE, LABEL_BONE = 1, 2
#: Labels of :func:`ct_phantom_tissues`, the same values and names as the ``ct-tissue-seg`` model's segments.
TISSUE_SOFT, TISSUE_FAT, TISSUE_LUNG, TISSUE_BONE = 1, 2, 3, 4
TISSUE_NAMES: dict[int, str] = {TISSUE_SOFT: "Soft tissue", TISSUE_FAT: "Fat", TISSUE_LUNG: "Lung", TISSUE_BONE: "Bone"}
LABEL_BRAIN = 1

_UID_NAMESPACE = "infergate-tests-make-series"
_STUDY_DATE, _STUDY_TIME = "20240115", "101500"

Orientation = Literal["axial", "coronal", "sagittal"]
#: Row and column direction cosines (ImageOrientationPatient) per plane, in the patient (LPS) system.
_ORIENTATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}


@dataclass(frozen=True)
class SeriesInfo:
    """What a writer produced; ``paths`` and ``sop_instance_uids`` are in slice (InstanceNumber) order."""

    study_uid: str
    series_uid: str
    sop_instance_uids: list[str]
    paths: list[Path]
    folder: Path
    frame_of_reference_uid: str = ""
    transfer_syntax: str = ExplicitVRLittleEndian


# Phantom geometry -------------------------------------------------------------------------------------------
# Shapes are defined in fractions of the field of view (u right->left, v anterior->posterior, both in
# [-0.5, 0.5]), so the labels depend only on the matrix size and slice count, never on the spacing.


def _plane_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    centre = (size - 1) / 2.0
    coords = ((np.arange(size, dtype=np.float64) - centre) / size).astype(np.float32)
    return coords[np.newaxis, :], coords[:, np.newaxis]  # u varies along columns, v along rows


@dataclass(frozen=True)
class _Ellipse:
    """An axis-aligned ellipse in field-of-view fractions; its pixels and its exact area come from one place."""

    cu: float
    cv: float
    ru: float
    rv: float

    def mask(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Pixels whose centre lies inside (or on) the ellipse."""
        return ((u - self.cu) / self.ru) ** 2 + ((v - self.cv) / self.rv) ** 2 <= 1.0

    @property
    def area(self) -> float:
        """Area in squared field-of-view fractions (multiply by the field of view in mm, squared)."""
        return float(np.pi * self.ru * self.rv)


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
    return _Ellipse(cu, cv, ru, rv).mask(u, v)


def _position_along(index: int, count: int) -> float:
    """0 for the first slice, 1 for the last, so that shapes vary smoothly along the series."""
    return index / (count - 1) if count > 1 else 0.5


def _check_dims(slices: int, size: int) -> None:
    if not isinstance(slices, int) or slices < 1:
        raise ValueError('Argument "slices" should be a positive integer.')
    if not isinstance(size, int) or size < 16:
        raise ValueError('Argument "size" should be an integer of at least 16.')


#: Skin and subcutaneous fat thickness, in field-of-view fractions (2 mm and 12 mm for a 410 mm field of view).
_SKIN, _SUBCUTANEOUS_FAT = 0.005, 0.03


@dataclass(frozen=True)
class _CtShapes:
    """The ellipses of one CT phantom slice, nested so that their areas add up exactly.

    ``body`` holds ``subcutis`` (its inside minus a skin layer), which holds ``muscle`` (the subcutaneous
    fat is the ring between the two); ``muscle`` holds both ``lungs`` and the vertebral body ``bone``, which
    are disjoint (``tests/unit/workers/test_ct_tissue_model.py`` checks the nesting numerically).
    """

    body: _Ellipse
    subcutis: _Ellipse
    muscle: _Ellipse
    lungs: tuple[_Ellipse, _Ellipse]
    bone: _Ellipse


def _ct_shapes(index: int, slices: int) -> _CtShapes:
    """Ellipses of slice ``index``: the body breathes by 3 % and the lungs are widest mid-series, as from apex
    to base, so that slices differ."""
    t = _position_along(index, slices)
    body_scale = 1.0 + 0.03 * np.sin(2.0 * np.pi * t)
    lung_scale = 0.75 + 0.25 * np.sin(np.pi * t)
    ru, rv = 0.40 * body_scale, 0.30 * body_scale
    inset = _SKIN + _SUBCUTANEOUS_FAT
    return _CtShapes(
        body=_Ellipse(0.0, 0.02, ru, rv),
        subcutis=_Ellipse(0.0, 0.02, ru - _SKIN, rv - _SKIN),
        muscle=_Ellipse(0.0, 0.02, ru - inset, rv - inset),
        lungs=(
            _Ellipse(-0.17, -0.02, 0.11 * lung_scale, 0.17 * lung_scale),
            _Ellipse(0.17, -0.02, 0.11 * lung_scale, 0.17 * lung_scale),
        ),
        bone=_Ellipse(0.0, 0.19, 0.05, 0.05),  # vertebral body, posterior (+v is posterior)
    )


@dataclass(frozen=True)
class _CtMasks:
    body: np.ndarray
    fat: np.ndarray
    lungs: np.ndarray
    bone: np.ndarray


def _ct_masks(index: int, slices: int, u: np.ndarray, v: np.ndarray) -> _CtMasks:
    """Body, subcutaneous fat, lung and bone masks of one CT slice; the single source of truth for pixels and
    labels. Soft tissue is the body minus the other three (skin, muscle and organs)."""
    shapes = _ct_shapes(index, slices)
    body = shapes.body.mask(u, v)
    bone = shapes.bone.mask(u, v) & body
    lungs = (shapes.lungs[0].mask(u, v) | shapes.lungs[1].mask(u, v)) & body & ~bone
    fat = shapes.subcutis.mask(u, v) & ~shapes.muscle.mask(u, v) & ~lungs & ~bone
    return _CtMasks(body=body, fat=fat, lungs=lungs, bone=bone)


def ct_phantom_labels(slices: int, size: int) -> np.ndarray:
    """Ground truth of the CT phantom that :func:`write_ct_series` writes with these ``slices`` and ``size``.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array indexed ``[slice, row, column]`` in file order: ``1`` soft tissue (body minus lungs
        minus bone; subcutaneous fat included), ``2`` bone, ``0`` air and lungs. :func:`ct_phantom_tissues`
        tells fat and lungs apart.
    """
    _check_dims(slices, size)
    u, v = _plane_grid(size)
    labels = np.zeros((slices, size, size), dtype=np.uint8)
    for index in range(slices):
        masks = _ct_masks(index, slices, u, v)
        labels[index][masks.body & ~masks.lungs & ~masks.bone] = LABEL_SOFT_TISSUE
        labels[index][masks.bone] = LABEL_BONE
    return labels


def ct_phantom_tissues(slices: int, size: int) -> np.ndarray:
    """Four-tissue ground truth of the CT phantom that :func:`write_ct_series` writes.

    Returns
    -------
    numpy.ndarray
        ``uint8`` ``[slice, row, column]``: :data:`TISSUE_SOFT` (skin, muscle, organs), :data:`TISSUE_FAT`
        (the subcutaneous ring), :data:`TISSUE_LUNG`, :data:`TISSUE_BONE`, and 0 outside the body.
    """
    _check_dims(slices, size)
    u, v = _plane_grid(size)
    labels = np.zeros((slices, size, size), dtype=np.uint8)
    for index in range(slices):
        masks = _ct_masks(index, slices, u, v)
        labels[index][masks.body] = TISSUE_SOFT
        labels[index][masks.fat] = TISSUE_FAT
        labels[index][masks.lungs] = TISSUE_LUNG
        labels[index][masks.bone] = TISSUE_BONE
    return labels


def ct_phantom_volumes_ml(slices: int, size: int, slice_spacing: float, pixel_spacing: float) -> dict[str, float]:
    """Exact volumes of the CT phantom's tissues, from the ellipses' areas rather than from counting pixels.

    Each slice is a slab ``slice_spacing`` thick whose cross-section is the slice's ellipses, so a volume is
    the sum over slices of ``area * field_of_view**2 * slice_spacing``. The pixel masks approach these values
    as the matrix grows (for 256 x 256 they agree within 0.1 %), which makes them a truth independent of any
    voxel grid, including the one a model resamples to.

    Parameters
    ----------
    slices, size, slice_spacing, pixel_spacing
        As given to :func:`write_ct_series`.

    Returns
    -------
    dict[str, float]
        Millilitres keyed by :data:`TISSUE_NAMES` values, plus ``"Body"`` (their sum).
    """
    _check_dims(slices, size)
    if slice_spacing <= 0 or pixel_spacing <= 0:
        raise ValueError('Arguments "slice_spacing" and "pixel_spacing" should be positive.')
    scale_ml = (size * pixel_spacing) ** 2 * slice_spacing / 1000.0
    totals = dict.fromkeys(("Soft tissue", "Fat", "Lung", "Bone", "Body"), 0.0)
    for index in range(slices):
        shapes = _ct_shapes(index, slices)
        fat = shapes.subcutis.area - shapes.muscle.area
        lungs = shapes.lungs[0].area + shapes.lungs[1].area
        totals["Fat"] += fat * scale_ml
        totals["Lung"] += lungs * scale_ml
        totals["Bone"] += shapes.bone.area * scale_ml
        totals["Soft tissue"] += (shapes.body.area - fat - lungs - shapes.bone.area) * scale_ml
        totals["Body"] += shapes.body.area * scale_ml
    return totals


def ct_phantom_hu(slices: int, size: int, *, seed: int = 0, noise_sd: float = 10.0) -> np.ndarray:
    """The CT phantom in Hounsfield units (``float32``, ``[slice, row, column]``), noise included.

    The soft-tissue value drifts by a few HU along the series so that slices are not identical. Edges are
    sharp (no partial volume), so a pixel's value is that of the tissue its centre lies in.
    """
    _check_dims(slices, size)
    u, v = _plane_grid(size)
    rng = np.random.default_rng(seed)
    volume = np.empty((slices, size, size), dtype=np.float32)
    for index in range(slices):
        masks = _ct_masks(index, slices, u, v)
        plane = volume[index]
        plane.fill(HU_AIR)
        plane[masks.body] = HU_SOFT_TISSUE + 5.0 * np.sin(2.0 * np.pi * _position_along(index, slices))
        plane[masks.fat] = HU_FAT
        plane[masks.lungs] = HU_LUNG
        plane[masks.bone] = HU_BONE
        plane += rng.standard_normal((size, size), dtype=np.float32) * np.float32(noise_sd)
    return volume


def _mr_masks(index: int, slices: int, u: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    """Tissue masks of one slice of the T1-like head phantom (scalp fat, skull, grey/white matter, CSF)."""
    t = _position_along(index, slices)
    scale = 0.6 + 0.4 * np.sin(np.pi * (0.15 + 0.7 * t))  # the head narrows towards both ends
    head = _ellipse(u, v, 0.0, 0.0, 0.36 * scale, 0.44 * scale)
    inner_skull = _ellipse(u, v, 0.0, 0.0, 0.36 * scale * 0.92, 0.44 * scale * 0.92)
    brain = _ellipse(u, v, 0.0, 0.0, 0.36 * scale * 0.85, 0.44 * scale * 0.85)
    white = _ellipse(u, v, 0.0, 0.0, 0.36 * scale * 0.68, 0.44 * scale * 0.68)
    csf = (
        _ellipse(u, v, -0.05 * scale, -0.02, 0.03 * scale, 0.10 * scale)
        | _ellipse(u, v, 0.05 * scale, -0.02, 0.03 * scale, 0.10 * scale)
    ) & brain
    return {
        "scalp": head & ~inner_skull,
        "skull": inner_skull & ~brain,
        "grey": brain & ~white,
        "white": white & ~csf,
        "csf": csf,
        "brain": brain,
    }


#: T1-weighted signal per tissue: fat bright, white matter brighter than grey, CSF and cortical bone dark.
_MR_SIGNAL = {"scalp": 900.0, "skull": 60.0, "grey": 520.0, "white": 720.0, "csf": 160.0}


def mr_phantom_labels(slices: int, size: int) -> np.ndarray:
    """Brain mask (``1`` inside the skull: grey and white matter, ventricles) of :func:`write_mr_series`."""
    _check_dims(slices, size)
    u, v = _plane_grid(size)
    brain = np.stack([_mr_masks(i, slices, u, v)["brain"] for i in range(slices)])
    return np.where(brain, LABEL_BRAIN, 0).astype(np.uint8)


def _mr_signal(slices: int, size: int, *, seed: int, noise_sd: float = 15.0) -> np.ndarray:
    u, v = _plane_grid(size)
    rng = np.random.default_rng(seed)
    volume = np.zeros((slices, size, size), dtype=np.float32)
    for index in range(slices):
        masks = _mr_masks(index, slices, u, v)
        for tissue, signal in _MR_SIGNAL.items():
            volume[index][masks[tissue]] = signal
        # magnitude images: noise is Rician, i.e. |signal + complex Gaussian noise|
        real = volume[index] + rng.standard_normal((size, size), dtype=np.float32) * np.float32(noise_sd)
        imag = rng.standard_normal((size, size), dtype=np.float32) * np.float32(noise_sd)
        volume[index] = np.hypot(real, imag)
    return volume


# Headers ----------------------------------------------------------------------------------------------------


def _uid(*parts: object) -> UID:
    return generate_uid(entropy_srcs=[_UID_NAMESPACE, *(str(part) for part in parts)])


def _ds(value: float) -> str:
    """Format a decimal string (DS, at most 16 characters) without float noise such as 0.30000000000000004."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _common_header(
    *,
    modality: str,
    sop_class_uid: UID,
    patient_name: str,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    series_number: int,
    series_description: str,
    body_part: str,
    seed: int,
) -> Dataset:
    """Patient, General Study and Series, Frame of Reference, General Equipment and SOP Common modules."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = _STUDY_DATE
    ds.StudyTime = _STUDY_TIME
    ds.SeriesTime = ds.AcquisitionTime = "101730"
    ds.ReferringPhysicianName = "Referrer^Test"
    ds.StudyID = f"{seed % 10_000_000:d}"
    ds.AccessionNumber = f"ACC{seed:07d}"[:16]
    ds.StudyDescription = f"PHANTOM {modality}"
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = body_part
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "infergate test phantom"
    ds.InstitutionName = "Test Institution"
    ds.StationName = f"PHANTOM{modality}"
    ds.ManufacturerModelName = "make_series"
    ds.SoftwareVersions = "1"
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return ds


def _ct_header(ds: Dataset, *, size: int, pixel_spacing: float, slice_thickness: float) -> None:
    """CT Image module (PS3.3 C.8.2.1) beyond what :func:`_common_header` sets."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.RescaleIntercept = str(CT_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.KVP = "120"
    ds.XRayTubeCurrent = 200
    ds.ExposureTime = 500
    ds.Exposure = 100
    ds.ConvolutionKernel = "STANDARD"
    ds.DataCollectionDiameter = _ds(size * pixel_spacing)
    ds.ReconstructionDiameter = _ds(size * pixel_spacing)
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.SliceThickness = _ds(slice_thickness)


def _mr_header(ds: Dataset, *, slice_thickness: float, slice_spacing: float) -> None:
    """MR Image module (PS3.3 C.8.3.1): a 2D spin-echo T1 acquisition at 1.5 T."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "SP"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = "se2d1"
    ds.RepetitionTime = "500"
    ds.EchoTime = "15"
    ds.EchoTrainLength = 1
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "63.6"
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = "1.5"
    ds.FlipAngle = "90"
    ds.SliceThickness = _ds(slice_thickness)
    ds.SpacingBetweenSlices = _ds(slice_spacing)


# Writing ----------------------------------------------------------------------------------------------------


def _check_syntax(transfer_syntax: str) -> UID:
    uid = UID(transfer_syntax)
    if uid not in SUPPORTED_SYNTAXES:
        names = ", ".join(s.name for s in SUPPORTED_SYNTAXES)
        raise ValueError(f'Argument "transfer_syntax" should be one of: {names}; got "{transfer_syntax}".')
    return uid


def _write_slices(
    folder: Path,
    *,
    prefix: str,
    header: Callable[[], Dataset],
    stored: np.ndarray,
    orientation: Orientation,
    pixel_spacing: float,
    slice_spacing: float,
    transfer_syntax: UID,
    seed: int,
) -> SeriesInfo:
    """Write one Part 10 file per slice with Image Plane geometry (PS3.3 C.7.6.2) and the given pixels."""
    slices, size = stored.shape[0], stored.shape[1]
    row, column = (np.asarray(d) for d in _ORIENTATIONS[orientation])
    normal = np.cross(row, column)
    in_plane_origin = -(size - 1) / 2.0 * pixel_spacing * (row + column)  # image centred on the origin
    first = -(slices - 1) / 2.0 * slice_spacing
    folder.mkdir(parents=True, exist_ok=True)
    template = header()
    sop_instance_uids: list[str] = []
    paths: list[Path] = []
    for index in range(slices):
        ds = header()  # a fresh header per file: datasets sharing element objects would alias their values
        sop_instance_uid = _uid(template.SeriesInstanceUID, seed, "instance", index)
        ds.SOPInstanceUID = sop_instance_uid
        ds.InstanceNumber = index + 1
        ds.ContentTime = f"1018{index // 100 % 60:02d}.{index % 100:02d}"
        position = in_plane_origin + (first + index * slice_spacing) * normal
        ds.ImagePositionPatient = [_ds(x) for x in position]
        ds.ImageOrientationPatient = [_ds(x) for x in (*row, *column)]
        ds.SliceLocation = _ds(float(position @ normal))
        ds.PixelSpacing = [_ds(pixel_spacing), _ds(pixel_spacing)]
        ds.Rows = ds.Columns = size
        frame = np.ascontiguousarray(stored[index])
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
        ds.file_meta.ImplementationVersionName = "INFERGATE_TEST"
        if transfer_syntax in COMPRESSED_SYNTAXES:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.compress(transfer_syntax, frame, generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = transfer_syntax
            ds["PixelData"] = DataElement(0x7FE00010, "OW", frame.astype("<u2").tobytes())
        path = folder / f"{prefix}{index + 1:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sop_instance_uids.append(sop_instance_uid)
        paths.append(path)
    return SeriesInfo(
        study_uid=str(template.StudyInstanceUID),
        series_uid=str(template.SeriesInstanceUID),
        sop_instance_uids=sop_instance_uids,
        paths=paths,
        folder=folder,
        frame_of_reference_uid=str(template.FrameOfReferenceUID),
        transfer_syntax=transfer_syntax,
    )


def write_ct_series(
    folder: Path,
    *,
    slices: int = 100,
    size: int = 512,
    slice_spacing: float = 2.5,
    pixel_spacing: float = 0.8,
    study_uid: str | None = None,
    series_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    series_description: str = "CT CHEST",
    body_part: str = "CHEST",
    series_number: int = 2,
    patient_name: str = "Phantom^CT",
    patient_id: str | None = None,
    seed: int = 0,
) -> SeriesInfo:
    """Write an axial chest CT phantom as a CT Image IOD series (files ``CT000001.dcm``, ...).

    The phantom is an elliptic chest: skin, a subcutaneous fat ring, muscle and organs, two lungs and a vertebral
    body, with sharp edges and Gaussian noise (sd 10 HU).

    Parameters
    ----------
    folder
        Created if missing; existing files with the same names are overwritten.
    slices, size
        Number of slices and the square matrix size (rows = columns).
    slice_spacing, pixel_spacing
        In millimetres; the slice thickness equals the spacing (contiguous slices).
    study_uid, series_uid
        Default to UIDs derived from ``seed``, so the same seed gives the same series; pass ``study_uid`` to
        put several series into one study.
    transfer_syntax
        One of :data:`SUPPORTED_SYNTAXES`.
    seed
        Drives the UIDs and the image noise.

    Returns
    -------
    SeriesInfo
        The UIDs and paths, in slice order; :func:`ct_phantom_labels` (two classes) and
        :func:`ct_phantom_tissues` (four tissues) give the matching ground truth per pixel, and
        :func:`ct_phantom_volumes_ml` the exact volumes.

    Raises
    ------
    ValueError
        If a dimension or the transfer syntax is not supported.
    """
    _check_dims(slices, size)
    if slice_spacing <= 0 or pixel_spacing <= 0:
        raise ValueError('Arguments "slice_spacing" and "pixel_spacing" should be positive.')
    syntax = _check_syntax(transfer_syntax)
    study = study_uid or _uid("CT", seed, patient_id, "study")
    # the content depends on these, so a different series must not reuse the UIDs (PS3.5 9.1)
    series = series_uid or _uid(
        "CT", seed, study, "series", series_number, slices, size, slice_spacing, pixel_spacing
    )

    def header() -> Dataset:
        ds = _common_header(
            modality="CT",
            sop_class_uid=CTImageStorage,
            patient_name=patient_name,
            patient_id=patient_id or f"PHANTOM-CT-{seed}",
            study_uid=study,
            series_uid=series,
            frame_of_reference_uid=_uid(series, "frame-of-reference"),
            series_number=series_number,
            series_description=series_description,
            body_part=body_part,
            seed=seed,
        )
        _ct_header(ds, size=size, pixel_spacing=pixel_spacing, slice_thickness=slice_spacing)
        return ds

    hu = ct_phantom_hu(slices, size, seed=seed)
    stored = np.clip(np.rint(hu) - CT_INTERCEPT, 0, 4095).astype(np.uint16)
    return _write_slices(
        Path(folder),
        prefix="CT",
        header=header,
        stored=stored,
        orientation="axial",
        pixel_spacing=pixel_spacing,
        slice_spacing=slice_spacing,
        transfer_syntax=syntax,
        seed=seed,
    )


def write_mr_series(
    folder: Path,
    *,
    slices: int = 24,
    size: int = 128,
    slice_spacing: float = 5.0,
    slice_thickness: float | None = None,
    pixel_spacing: float = 1.8,
    orientation: Orientation = "axial",
    study_uid: str | None = None,
    series_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    series_description: str = "T1 SE AX",
    body_part: str = "HEAD",
    series_number: int = 1,
    patient_name: str = "Phantom^MR",
    patient_id: str | None = None,
    seed: int = 0,
) -> SeriesInfo:
    """Write a T1-like head phantom as an MR Image IOD series (files ``MR000001.dcm``, ...).

    ``orientation`` chooses the plane (axial, coronal or sagittal) so that geometry code can be tested off
    the z axis; the in-plane picture is the same in every plane. ``slice_thickness`` defaults to 80 % of the
    spacing, i.e. with a gap, as usual for 2D MR. :func:`mr_phantom_labels` gives the brain mask. Other
    parameters and errors are as for :func:`write_ct_series`.
    """
    _check_dims(slices, size)
    if slice_spacing <= 0 or pixel_spacing <= 0:
        raise ValueError('Arguments "slice_spacing" and "pixel_spacing" should be positive.')
    if orientation not in _ORIENTATIONS:
        raise ValueError(f'Argument "orientation" should be one of {sorted(_ORIENTATIONS)}.')
    syntax = _check_syntax(transfer_syntax)
    study = study_uid or _uid("MR", seed, patient_id, "study")
    series = series_uid or _uid(
        "MR", seed, study, "series", series_number, slices, size, slice_spacing, pixel_spacing, orientation
    )
    thickness = slice_thickness if slice_thickness is not None else 0.8 * slice_spacing

    def header() -> Dataset:
        ds = _common_header(
            modality="MR",
            sop_class_uid=MRImageStorage,
            patient_name=patient_name,
            patient_id=patient_id or f"PHANTOM-MR-{seed}",
            study_uid=study,
            series_uid=series,
            frame_of_reference_uid=_uid(series, "frame-of-reference"),
            series_number=series_number,
            series_description=series_description,
            body_part=body_part,
            seed=seed,
        )
        _mr_header(ds, slice_thickness=thickness, slice_spacing=slice_spacing)
        return ds

    stored = np.clip(np.rint(_mr_signal(slices, size, seed=seed)), 0, 4095).astype(np.uint16)
    return _write_slices(
        Path(folder),
        prefix="MR",
        header=header,
        stored=stored,
        orientation=orientation,
        pixel_spacing=pixel_spacing,
        slice_spacing=slice_spacing,
        transfer_syntax=syntax,
        seed=seed,
    )


def _syntax_from_name(text: str) -> str:
    """Accept a UID or a pydicom keyword such as ``RLELossless``."""
    value = getattr(uids, text, text)
    return str(value)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints where the series went."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.data.make_series", description=__doc__.split("\n")[0]
    )
    parser.add_argument("kind", choices=["ct", "mr"])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--slices", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--study-uid")
    parser.add_argument(
        "--transfer-syntax",
        default="ExplicitVRLittleEndian",
        help="UID or pydicom keyword, e.g. RLELossless, JPEG2000Lossless, JPEGLSLossless",
    )
    parser.add_argument("--orientation", choices=sorted(_ORIENTATIONS), default="axial", help="MR only")
    args = parser.parse_args(argv)
    common: dict[str, object] = {
        "seed": args.seed,
        "study_uid": args.study_uid,
        "transfer_syntax": _syntax_from_name(args.transfer_syntax),
    }
    if args.slices is not None:
        common["slices"] = args.slices
    if args.size is not None:
        common["size"] = args.size
    if args.kind == "ct":
        info = write_ct_series(args.out, **common)  # type: ignore[arg-type]
    else:
        info = write_mr_series(args.out, orientation=args.orientation, **common)  # type: ignore[arg-type]
    print(f"{len(info.paths)} files in {info.folder}")  # noqa: T201 (command-line output)
    print(f"StudyInstanceUID  {info.study_uid}")  # noqa: T201 (command-line output)
    print(f"SeriesInstanceUID {info.series_uid}")  # noqa: T201 (command-line output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
