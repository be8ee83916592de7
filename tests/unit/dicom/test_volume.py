"""Building volumes from series: sorting, rescale, refusals, single images, compressed pixel data."""

from __future__ import annotations

import copy
import io
import random

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from infergate.dicom.volume import Volume, load_volume
from infergate.errors import InvalidInput
from tests.unit.dicom._synthetic import make_image, make_series


def _ramp(shape: tuple[int, int, int] = (6, 4, 5)) -> np.ndarray:
    """HU values that differ per slice, row and column, so any misplacement shows."""
    k, r, c = np.indices(shape)
    return (100.0 * k + 10.0 * r + c - 500.0).astype(np.float32)


def test_shuffled_slices_are_sorted_along_the_normal() -> None:
    hu = _ramp()
    series = make_series(hu, spacing=(2.5, 0.7, 0.8), origin=(-10.0, 20.0, 30.0))
    shuffled = series[:]
    random.Random(1).shuffle(shuffled)

    volume = load_volume(shuffled)

    assert isinstance(volume, Volume)
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, hu)
    assert volume.spacing == pytest.approx((2.5, 0.7, 0.8))
    assert volume.origin == pytest.approx((-10.0, 20.0, 30.0))
    np.testing.assert_allclose(volume.direction, np.eye(3))
    assert [ds.InstanceNumber for ds in volume.datasets] == list(range(1, 7))


def test_sorting_follows_the_normal_not_the_z_axis() -> None:
    # Column cosines pointing to -y make the normal -z: the first slice is the highest z.
    orientation = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
    hu = _ramp((4, 3, 3))
    series = make_series(hu, orientation=orientation, origin=(0.0, 0.0, 100.0), spacing=(3.0, 1.0, 1.0))

    volume = load_volume(list(reversed(series)))

    np.testing.assert_array_equal(volume.array, hu)
    assert volume.origin == pytest.approx((0.0, 0.0, 100.0))
    np.testing.assert_allclose(volume.direction[2], [0.0, 0.0, -1.0])
    assert volume.datasets[-1].ImagePositionPatient[2] == pytest.approx(91.0)


def test_oblique_stack() -> None:
    angle = np.deg2rad(20.0)
    orientation = (1.0, 0.0, 0.0, 0.0, np.cos(angle), np.sin(angle))
    series = make_series(_ramp((5, 3, 3)), orientation=orientation, spacing=(2.0, 1.0, 1.0))
    volume = load_volume(series[::-1])
    assert volume.spacing[0] == pytest.approx(2.0, abs=1e-4)
    np.testing.assert_array_equal(volume.array, _ramp((5, 3, 3)))


def _set_all(series: list[pydicom.Dataset], keyword: str, value: object) -> None:
    for ds in series:
        setattr(ds, keyword, value)


def test_rescale_is_applied_per_slice() -> None:
    series = make_series(np.zeros((3, 2, 2), dtype=np.float32))
    stored = np.full((2, 2), 100, dtype=np.int16)
    for k, (slope, intercept) in enumerate([(1.0, -1024.0), (2.0, -1000.0), (0.5, 0.0)]):
        replacement = make_image(
            stored, position=series[k].ImagePositionPatient, slope=slope, intercept=intercept
        )
        series[k] = replacement

    volume = load_volume(series)

    np.testing.assert_allclose(volume.array[:, 0, 0], [-924.0, -800.0, 50.0])


def test_missing_rescale_means_identity() -> None:
    series = make_series(np.zeros((2, 2, 2), dtype=np.float32), intercept=0.0)
    for ds in series:
        del ds.RescaleSlope, ds.RescaleIntercept
    assert load_volume(series).array.max() == 0.0


def test_small_position_jitter_is_tolerated() -> None:
    series = make_series(_ramp((5, 2, 2)), spacing=(1.0, 1.0, 1.0))
    series[2].ImagePositionPatient = [0.0, 0.0, 2.005]
    assert load_volume(series).spacing[0] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: setattr(s[2], "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]), "orientation"),
        (lambda s: setattr(s[2], "ImagePositionPatient", list(s[1].ImagePositionPatient)), "duplicate"),
        (lambda s: s.pop(2), "uneven"),
        (lambda s: setattr(s[3], "ImagePositionPatient", [0.0, 0.0, 7.8]), "uneven"),
        (lambda s: setattr(s[1], "PixelSpacing", [1.0, 1.2]), "pixel spacing"),
        (lambda s: delattr(s[1], "ImagePositionPatient"), "lacks"),
        (lambda s: delattr(s[0], "PixelSpacing"), "lacks"),
        (lambda s: setattr(s[4], "ImagePositionPatient", [3.0, 0.0, 10.0]), "drift"),
        (lambda s: _set_all(s, "ImageOrientationPatient", [1, 0, 0, 1, 0, 0]), "orthogonal"),
        (lambda s: setattr(s[0], "ImagePositionPatient", [0.0, 1.0]), "ImagePositionPatient"),
    ],
    ids=[
        "orientation",
        "duplicate",
        "gap",
        "uneven",
        "pixel-spacing",
        "no-position",
        "no-spacing",
        "sheared",
        "not-orthogonal",
        "wrong-count",
    ],
)
def test_irregular_series_are_refused(change: object, message: str) -> None:
    series = make_series(_ramp((6, 3, 3)))
    change(series)  # type: ignore[operator]
    with pytest.raises(InvalidInput, match=f"(?i){message}"):
        load_volume(series)


def test_different_matrix_sizes_are_refused() -> None:
    series = make_series(_ramp((3, 3, 3)))
    series[1] = make_image(np.zeros((4, 3), dtype=np.int16), position=series[1].ImagePositionPatient)
    with pytest.raises(InvalidInput, match="matrix size"):
        load_volume(series)


def test_multiframe_and_colour_are_refused() -> None:
    ds = make_image(np.zeros((2, 2), dtype=np.int16))
    multi = copy.deepcopy(ds)
    multi.NumberOfFrames = 2
    with pytest.raises(InvalidInput, match="frames"):
        load_volume([multi])
    colour = copy.deepcopy(ds)
    colour.PhotometricInterpretation, colour.SamplesPerPixel = "RGB", 3
    with pytest.raises(InvalidInput, match="Photometric"):
        load_volume([colour])


def test_bad_arguments() -> None:
    with pytest.raises(InvalidInput, match="empty"):
        load_volume([])
    with pytest.raises(TypeError, match='"datasets"'):
        load_volume(make_image(np.zeros((2, 2), dtype=np.int16)))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="item 1"):
        load_volume([make_image(np.zeros((2, 2), dtype=np.int16)), "x"])  # type: ignore[list-item]


def test_missing_pixel_data_is_refused() -> None:
    series = make_series(_ramp((3, 2, 2)))
    del series[1].PixelData
    with pytest.raises(InvalidInput, match="pixel data"):
        load_volume(series)


def _radiograph(photometric: str = "MONOCHROME2", **spacing: object) -> pydicom.Dataset:
    stored = np.array([[0, 100], [1000, 4095]], dtype=np.uint16)
    ds = make_image(
        stored,
        modality="DX",
        position=None,
        orientation=None,
        pixel_spacing=None,
        slope=None,
        intercept=None,
        photometric=photometric,
    )
    ds.BitsStored, ds.HighBit = 12, 11
    for keyword, value in spacing.items():
        setattr(ds, keyword, value)
    return ds


def test_single_radiograph_without_geometry() -> None:
    volume = load_volume([_radiograph(ImagerPixelSpacing=[0.15, 0.2])])
    assert volume.array.shape == (1, 2, 2)
    assert volume.spacing == pytest.approx((1.0, 0.15, 0.2))
    assert volume.origin == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(volume.direction, np.eye(3))
    np.testing.assert_array_equal(volume.array[0], [[0, 100], [1000, 4095]])


def test_pixel_spacing_wins_over_imager_pixel_spacing_and_defaults_to_one() -> None:
    assert (
        load_volume([_radiograph(PixelSpacing=[0.1, 0.1], ImagerPixelSpacing=[0.15, 0.15])]).spacing[1] == 0.1
    )
    assert load_volume([_radiograph()]).spacing == (1.0, 1.0, 1.0)


def test_monochrome1_radiograph_is_inverted_over_the_stored_range() -> None:
    volume = load_volume([_radiograph("MONOCHROME1")])
    np.testing.assert_array_equal(volume.array[0], [[4095, 3995], [3095, 0]])


def test_single_ct_slice_keeps_its_geometry_and_values() -> None:
    (ds,) = make_series(_ramp((1, 3, 3)), origin=(5.0, 6.0, 7.0))
    ds.PhotometricInterpretation = "MONOCHROME1"  # HU keep their meaning: not inverted
    ds.SliceThickness = "3.0"
    volume = load_volume([ds])
    assert volume.spacing[0] == 3.0
    assert volume.origin == (5.0, 6.0, 7.0)
    np.testing.assert_array_equal(volume.array, _ramp((1, 3, 3)))


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]
)
def test_compressed_pixel_data_decodes_like_the_uncompressed_original(name: str) -> None:
    compressed_path = get_testdata_file(name, download=False)
    original_path = get_testdata_file("MR_small.dcm", download=False)
    if compressed_path is None or original_path is None:
        pytest.skip(f"{name} is not in this pydicom installation")
    volume = load_volume([pydicom.dcmread(compressed_path)])
    reference = load_volume([pydicom.dcmread(original_path)])
    assert volume.array.shape == (1, 64, 64)
    np.testing.assert_array_equal(volume.array, reference.array)
    assert volume.spacing[1:] == pytest.approx((0.3125, 0.3125))


def test_jpeg_ls_near_lossless_image_without_geometry_decodes() -> None:
    path = get_testdata_file("JPEGLSNearLossless_16.dcm", download=False)
    if path is None:
        pytest.skip("JPEGLSNearLossless_16.dcm is not in this pydicom installation")
    ds = pydicom.dcmread(path)
    volume = load_volume([ds])
    assert volume.array.shape == (1, ds.Rows, ds.Columns)
    assert volume.spacing == (1.0, 1.0, 1.0)
    assert np.ptp(volume.array) > 0


def test_malformed_number_read_from_a_file_is_refused() -> None:
    series = make_series(np.zeros((3, 2, 2), dtype=np.float32), origin=(7.0, 8.0, 9.0))
    encoded = []
    for ds in series:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        encoded.append(buffer.getvalue())
    assert encoded[1].count(b"7\\8\\11.5") == 1
    encoded[1] = encoded[1].replace(b"7\\8\\11.5", b"7\\x\\11.5")
    with pytest.raises(InvalidInput, match="Image 1 has no usable ImagePositionPatient"):
        load_volume([pydicom.dcmread(io.BytesIO(data)) for data in encoded])
