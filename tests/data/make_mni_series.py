"""Write a real T1 brain, nilearn's MNI152 2009a template, as a DICOM MR Image series; nothing is downloaded.

nilearn's wheel ships the ICBM 2009a nonlinear symmetric T1 template (197 x 233 x 189 voxels of 1 mm,
skull-stripped, 8-bit) as NIfTI. This module writes it as axial slices of a 3D T1 MPRAGE acquisition
(MR Image IOD, PS3.3 A.4) with Image Plane geometry derived from the NIfTI affine, and returns the
reference brain mask on the same (slice, row, column) grid, so that a brain-extraction model run
through the pipeline can be scored with Dice.

The reference is nilearn's own whole-brain mask, ``load_mni152_brain_mask``: the template above 0.2
of its maximum. (nilearn no longer ships a separate mask file; this is how it derives one.)

NIfTI world coordinates are RAS+ (x grows towards the patient's Right, y Anterior, z Superior);
DICOM's patient coordinates are LPS+ (PS3.3 C.7.6.2.1.1), so x and y change sign. The voxel axes
are reordered so that DICOM columns run towards the Left, rows towards Posterior and slices towards
Superior, the usual axial layout.

Usage::

    python -m tests.data.make_mni_series --out DIR [--mask mask.npy]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from tests.data.make_series import SeriesInfo, _common_header, _ds, _uid

__all__ = ["MNI_BRAIN_THRESHOLD", "MniSeries", "mni_t1_path", "write_mni_series"]

#: nilearn's ``load_mni152_brain_mask`` threshold, as a fraction of the template's maximum.
MNI_BRAIN_THRESHOLD = 0.2
#: Stored values are the template's 0-255 values times this (12 bits), undone by Rescale Slope.
_STORED_PER_UNIT = 16
_T1_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
#: RAS+ (NIfTI) to LPS+ (DICOM) world coordinates.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class MniSeries:
    """The written series and its reference.

    Attributes
    ----------
    info : SeriesInfo
        UIDs and paths, in slice (InstanceNumber) order, inferior to superior.
    reference_mask : numpy.ndarray
        uint8 ``(slices, rows, columns)`` brain mask (1 = brain) aligned with the files, i.e. with
        the array :func:`~infergate.dicom.volume.load_volume` builds from them.
    spacing : tuple[float, float, float]
        mm between slices, rows and columns.
    """

    info: SeriesInfo
    reference_mask: np.ndarray
    spacing: tuple[float, float, float]


def mni_t1_path() -> Path:
    """The template inside the installed nilearn package (test dependency group)."""
    import nilearn

    path = Path(nilearn.__file__).resolve().parent / "datasets" / "data" / _T1_FILE
    if not path.is_file():
        raise FileNotFoundError(f"nilearn {nilearn.__version__} has no {_T1_FILE}")
    return path


def _as_axial(image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """The data as (slice, row, column) = (S, P, L)-increasing axes, and that grid's LPS affine."""
    data = np.asarray(image.dataobj)
    transform = nib.orientations.ornt_transform(
        nib.io_orientation(image.affine), nib.orientations.axcodes2ornt(("L", "P", "S"))
    )
    lps_data = nib.orientations.apply_orientation(data, transform)  # axes x->Left, y->Posterior, z->Superior
    voxel_to_ras = image.affine @ nib.orientations.inv_ornt_aff(transform, data.shape)
    voxel_to_lps = _RAS_TO_LPS @ voxel_to_ras
    return np.ascontiguousarray(lps_data.transpose(2, 1, 0)), voxel_to_lps


def write_mni_series(
    folder: Path,
    *,
    study_uid: str | None = None,
    series_number: int = 3,
    patient_id: str = "MNI152-2009A",
    seed: int = 0,
) -> MniSeries:
    """Write the MNI152 2009a T1 template as an axial MR series (files ``MR000001.dcm``, ...).

    Parameters
    ----------
    folder : Path
        Created if missing; files with the same names are overwritten.
    study_uid : str | None
        Defaults to a UID derived from ``patient_id`` and ``seed``.
    series_number : int
        Series Number, also part of the derived Series Instance UID.
    patient_id, seed : str, int
        Drive the UIDs: the same arguments give byte-identical files.

    Returns
    -------
    MniSeries
        Paths, UIDs and the reference brain mask on the DICOM grid.
    """
    image = nib.load(mni_t1_path())
    if not isinstance(image, nib.Nifti1Image):
        raise TypeError(f"{mni_t1_path()} did not load as NIfTI-1.")
    values, voxel_to_lps = _as_axial(image)  # uint8, (slices, rows, columns)
    slices, rows, columns = values.shape
    column_step, row_step, slice_step = (voxel_to_lps[:3, axis] for axis in range(3))
    row_cosines = column_step / np.linalg.norm(column_step)  # the direction the column index grows
    column_cosines = row_step / np.linalg.norm(row_step)
    pixel_spacing = (float(np.linalg.norm(row_step)), float(np.linalg.norm(column_step)))
    slice_spacing = float(np.linalg.norm(slice_step))
    study = study_uid or _uid("MNI", seed, patient_id, "study")
    series = _uid("MNI", seed, study, "series", series_number)
    frame_of_reference = _uid(series, "frame-of-reference")
    stored = (values.astype(np.uint16) * _STORED_PER_UNIT).astype("<u2")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    sop_instance_uids: list[str] = []
    for index in range(slices):
        ds = _common_header(
            modality="MR",
            sop_class_uid=MRImageStorage,
            patient_name="MNI152^Template",
            patient_id=patient_id,
            study_uid=study,
            series_uid=series,
            frame_of_reference_uid=frame_of_reference,
            series_number=series_number,
            series_description="T1 MPRAGE",
            body_part="HEAD",
            seed=seed,
        )
        ds.StudyDescription = "MR HEAD"
        _mprage_header(ds, slice_spacing)
        sop_instance_uid = _uid(series, "instance", index)
        ds.SOPInstanceUID = sop_instance_uid
        ds.InstanceNumber = index + 1
        position = voxel_to_lps @ np.array([0.0, 0.0, float(index), 1.0])
        ds.ImagePositionPatient = [_ds(v) for v in position[:3]]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_cosines, *column_cosines)]
        ds.SliceLocation = _ds(float(position[:3] @ np.cross(row_cosines, column_cosines)))
        ds.PixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]
        ds.Rows, ds.Columns = rows, columns
        ds.RescaleSlope, ds.RescaleIntercept = _ds(1.0 / _STORED_PER_UNIT), "0"
        ds.WindowCenter, ds.WindowWidth = "128", "256"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
        ds.file_meta.ImplementationVersionName = "INFERGATE_TEST"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds["PixelData"] = DataElement(0x7FE00010, "OW", stored[index].tobytes())
        path = folder / f"MR{index + 1:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        sop_instance_uids.append(sop_instance_uid)
    info = SeriesInfo(
        study_uid=study,
        series_uid=series,
        sop_instance_uids=sop_instance_uids,
        paths=paths,
        folder=folder,
        frame_of_reference_uid=frame_of_reference,
    )
    mask = (values.astype(np.float32) > MNI_BRAIN_THRESHOLD * float(values.max())).astype(np.uint8)
    return MniSeries(info=info, reference_mask=mask, spacing=(slice_spacing, *pixel_spacing))


def _mprage_header(ds: Dataset, slice_spacing: float) -> None:
    """MR Image module (PS3.3 C.8.3.1): a 3 T 3D MPRAGE, as a typical scanner labels it."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]  # value 3 is required for MR (PS3.3 C.8.3.1.1.1)
    ds.ScanningSequence = ["GR", "IR"]
    ds.SequenceVariant = ["SK", "SP", "MP"]
    ds.ScanOptions = "IR"
    ds.MRAcquisitionType = "3D"
    ds.SequenceName = "*tfl3d1_16ns"
    ds.ProtocolName = "T1 MPRAGE"
    ds.RepetitionTime = "2300"
    ds.EchoTime = "2.98"
    ds.InversionTime = "900"
    ds.FlipAngle = "9"
    ds.EchoTrainLength = 1
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "123.2"
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = "3"
    ds.PixelBandwidth = "240"
    ds.SliceThickness = _ds(slice_spacing)
    ds.SpacingBetweenSlices = _ds(slice_spacing)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints where the series went."""
    parser = argparse.ArgumentParser(prog="python -m tests.data.make_mni_series", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--mask", type=Path, help="also save the reference mask (slice, row, column) as .npy")
    parser.add_argument("--study-uid")
    args = parser.parse_args(argv)
    series = write_mni_series(args.out, study_uid=args.study_uid)
    if args.mask is not None:
        np.save(args.mask, series.reference_mask)
    print(f"{len(series.info.paths)} files in {series.info.folder}")  # noqa: T201 (command-line output)
    print(f"StudyInstanceUID  {series.info.study_uid}")  # noqa: T201 (command-line output)
    print(f"SeriesInstanceUID {series.info.series_uid}")  # noqa: T201 (command-line output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
