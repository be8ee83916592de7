"""The test-data generator writes valid, deterministic series whose labels match their pixels."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, JPEG2000Lossless, RLELossless

from tests.data.make_series import (
    HU_BONE,
    HU_LUNG,
    HU_SOFT_TISSUE,
    LABEL_BONE,
    LABEL_SOFT_TISSUE,
    SeriesInfo,
    ct_phantom_labels,
    mr_phantom_labels,
    write_ct_series,
    write_mr_series,
)

SLICES, SIZE, SLICE_SPACING, PIXEL_SPACING = 12, 128, 2.5, 3.2


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> SeriesInfo:
    return write_ct_series(
        tmp_path_factory.mktemp("ct"),
        slices=SLICES,
        size=SIZE,
        slice_spacing=SLICE_SPACING,
        pixel_spacing=PIXEL_SPACING,
        seed=7,
    )


def _hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


def test_files_and_info_agree(ct: SeriesInfo) -> None:
    assert [p.name for p in ct.paths] == [f"CT{i:06d}.dcm" for i in range(1, SLICES + 1)]
    for index, path in enumerate(ct.paths):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SOPInstanceUID == ct.sop_instance_uids[index] == ds.file_meta.MediaStorageSOPInstanceUID
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (ct.study_uid, ct.series_uid)
        assert ds.FrameOfReferenceUID == ct.frame_of_reference_uid
        assert ds.InstanceNumber == index + 1
        assert ds.Modality == "CT" and list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    uids = [ct.study_uid, ct.series_uid, ct.frame_of_reference_uid, *ct.sop_instance_uids]
    assert all(UID(uid).is_valid for uid in uids)
    assert len(set(uids)) == len(uids)


def test_positions_step_by_slice_spacing_along_the_normal(ct: SeriesInfo) -> None:
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in ct.paths]
    positions = np.array([[float(x) for x in ds.ImagePositionPatient] for ds in headers])
    assert all([float(x) for x in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0] for ds in headers)
    np.testing.assert_allclose(np.diff(positions, axis=0), [[0, 0, SLICE_SPACING]] * (SLICES - 1), atol=1e-6)
    assert all(float(ds.SliceThickness) == SLICE_SPACING for ds in headers)
    assert all([float(x) for x in ds.PixelSpacing] == [PIXEL_SPACING] * 2 for ds in headers)
    # the image is centred on the patient origin: first and last pixel centres are symmetric
    half = (SIZE - 1) / 2 * PIXEL_SPACING
    np.testing.assert_allclose(positions[0, :2], [-half, -half], atol=1e-6)


def test_labels_have_both_classes_and_match_the_pixels(ct: SeriesInfo) -> None:
    labels = ct_phantom_labels(SLICES, SIZE)
    assert labels.shape == (SLICES, SIZE, SIZE) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, LABEL_SOFT_TISSUE, LABEL_BONE}
    hu = np.stack([_hu(path) for path in ct.paths])
    # noise sd is 10 HU and the tissue values are hundreds of HU apart: medians sit on the nominal values
    assert np.median(hu[labels == LABEL_BONE]) == pytest.approx(HU_BONE, abs=5)
    assert np.median(hu[labels == LABEL_SOFT_TISSUE]) == pytest.approx(HU_SOFT_TISSUE, abs=6)
    assert np.all(hu[labels == LABEL_BONE] > 500) and np.all(np.abs(hu[labels == LABEL_SOFT_TISSUE]) < 150)
    assert set(np.unique(labels[hu < -600])) == {0}


def test_spine_centre_is_bone(ct: SeriesInfo) -> None:
    labels = ct_phantom_labels(SLICES, SIZE)
    middle = SLICES // 2
    rows, cols = np.nonzero(labels[middle] == LABEL_BONE)
    row, col = int(round(rows.mean())), int(round(cols.mean()))
    assert col in (SIZE // 2 - 1, SIZE // 2) and row > SIZE // 2  # posterior, on the midline
    patch = _hu(ct.paths[middle])[row - 1 : row + 2, col - 1 : col + 2]
    assert patch.mean() == pytest.approx(HU_BONE, abs=15)


def test_lungs_are_air_like_and_unlabelled(ct: SeriesInfo) -> None:
    hu = _hu(ct.paths[SLICES // 2])
    lung = hu[SIZE // 2 - 2, int(SIZE * 0.33)]  # left of the midline, in the right lung
    assert lung == pytest.approx(HU_LUNG, abs=50)
    assert ct_phantom_labels(SLICES, SIZE)[SLICES // 2, SIZE // 2 - 2, int(SIZE * 0.33)] == 0


def test_ct_passes_dciodvfy(ct: SeriesInfo) -> None:
    assert _dciodvfy_errors(ct.paths[0]) == []


def test_same_seed_same_files_other_geometry_other_uids(tmp_path: Path, ct: SeriesInfo) -> None:
    again = write_ct_series(
        tmp_path / "again",
        slices=SLICES,
        size=SIZE,
        slice_spacing=SLICE_SPACING,
        pixel_spacing=PIXEL_SPACING,
        seed=7,
    )
    assert again.sop_instance_uids == ct.sop_instance_uids
    assert again.paths[3].read_bytes() == ct.paths[3].read_bytes()
    other = write_ct_series(
        tmp_path / "other", slices=SLICES + 1, size=SIZE, pixel_spacing=PIXEL_SPACING, seed=7
    )
    assert other.study_uid == ct.study_uid  # same seed, same phantom patient and study
    assert other.series_uid != ct.series_uid and not set(other.sop_instance_uids) & set(ct.sop_instance_uids)
    shared = write_ct_series(tmp_path / "shared", slices=2, size=32, study_uid=ct.study_uid, seed=99)
    assert shared.study_uid == ct.study_uid


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_output_is_lossless(tmp_path: Path, ct: SeriesInfo, syntax: UID) -> None:
    packed = write_ct_series(
        tmp_path,
        slices=SLICES,
        size=SIZE,
        slice_spacing=SLICE_SPACING,
        pixel_spacing=PIXEL_SPACING,
        transfer_syntax=syntax,
        seed=7,
    )
    ds = pydicom.dcmread(packed.paths[5])
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert packed.sop_instance_uids == ct.sop_instance_uids  # same image, other encoding
    np.testing.assert_array_equal(ds.pixel_array, pydicom.dcmread(ct.paths[5]).pixel_array)
    assert _dciodvfy_errors(packed.paths[5]) == []


def test_unsupported_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match='"transfer_syntax"'):
        write_ct_series(tmp_path, slices=1, size=16, transfer_syntax="1.2.840.10008.1.2.4.50")
    with pytest.raises(ValueError, match='"slices"'):
        ct_phantom_labels(0, 64)


@pytest.mark.parametrize(
    ("orientation", "normal"), [("axial", (0, 0, 1)), ("coronal", (0, 1, 0)), ("sagittal", (-1, 0, 0))]
)
def test_mr_series_geometry_and_validity(tmp_path: Path, orientation: str, normal: tuple[int, ...]) -> None:
    info = write_mr_series(tmp_path, slices=6, size=64, slice_spacing=4.0, orientation=orientation)  # type: ignore[arg-type]
    headers = [pydicom.dcmread(path) for path in info.paths]
    positions = np.array([[float(x) for x in ds.ImagePositionPatient] for ds in headers])
    np.testing.assert_allclose(np.diff(positions, axis=0), [np.multiply(normal, 4.0)] * 5, atol=1e-6)
    ds = headers[2]
    assert ds.Modality == "MR" and ds.ScanningSequence == "SE" and float(ds.SpacingBetweenSlices) == 4.0
    labels = mr_phantom_labels(6, 64)
    brain = np.stack([h.pixel_array for h in headers])[labels == 1]
    assert labels.any() and brain.mean() > 400  # grey and white matter are bright on T1
    assert _dciodvfy_errors(info.paths[2]) == []
