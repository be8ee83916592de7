"""Intensity steps: the image's own VOI (incl. inverted MONOCHROME1 radiographs), percentiles, z-score, scale."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import dcmread
from pydicom.pixels import apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian

from infergate.dicom.volume import load_volume
from infergate.manifest import Preprocess, Window
from workers.intensity import VoiSource, normalise_intensity, percentile_bounds, voi_source, voi_to_unit


def _radiograph(stored: np.ndarray, photometric: str = "MONOCHROME2", **elements: object) -> Dataset:
    """A minimal CR-like image without patient geometry (load_volume reads it as a projection)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality = "CR"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.2, 0.2]
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = stored.astype("<u2").tobytes()
    return ds


def _ramp() -> np.ndarray:
    return np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR, mapped onto [0, 1]."""
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def test_voi_applies_the_window_of_a_monochrome2_image() -> None:
    volume = load_volume([_radiograph(_ramp(), WindowCenter=2000, WindowWidth=1000)])
    out = normalise_intensity(volume.array, Preprocess(intensity="voi"), voi=voi_source(volume))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], _linear_window(_ramp().astype(float), 2000, 1000), atol=1e-6)


def test_voi_follows_rescale_slope_and_intercept() -> None:
    ds = _radiograph(_ramp(), WindowCenter=-48, WindowWidth=400, RescaleSlope=1, RescaleIntercept=-1024)
    volume = load_volume([ds])
    out = voi_to_unit(volume.array, voi_source(volume))
    np.testing.assert_allclose(out[0], _linear_window(_ramp() - 1024.0, -48, 400), atol=1e-6)


def test_voi_of_an_inverted_monochrome1_radiograph_keeps_the_window_and_denser_is_brighter() -> None:
    # MONOCHROME1: stored 0 is displayed white. load_volume inverts to MONOCHROME2 polarity; the
    # window was defined on the stored (modality) values and must stay where it was.
    ds = _radiograph(_ramp(), "MONOCHROME1", WindowCenter=1000, WindowWidth=800)
    volume = load_volume([ds])
    np.testing.assert_array_equal(volume.array[0], 4095.0 - _ramp())
    out = normalise_intensity(volume.array, Preprocess(intensity="voi"), voi=voi_source(volume))
    displayed_brightness = 1.0 - _linear_window(_ramp().astype(float), 1000, 800)
    np.testing.assert_allclose(out[0], displayed_brightness, atol=1e-6)
    # output rises with the volume's values, and the window still covers stored 600..1400
    order = np.argsort(volume.array.ravel())
    assert np.all(np.diff(out.ravel()[order]) >= 0)
    assert 0.0 < out[0].ravel()[1000 // 16] < 1.0


def test_real_monochrome1_radiograph() -> None:
    path = get_testdata_file("RG1_UNCI.dcm")
    if path is None:
        pytest.skip("pydicom-data is not installed")
    ds = dcmread(path)
    volume = load_volume([ds])
    out = voi_to_unit(volume.array[:, ::8, ::8], voi_source(volume))
    stored = ds.pixel_array[::8, ::8].astype(np.float64)
    expected = 1.0 - _linear_window(stored, float(ds.WindowCenter), float(ds.WindowWidth))
    np.testing.assert_allclose(out[0], expected, atol=1e-6)


def test_voi_lut_sequence_is_preferred_and_scaled_by_its_entries() -> None:
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = [min(255, i // 2) for i in range(256)]  # reaches 127 only: scaled by 0..127
    ds = _radiograph(np.arange(256, dtype=np.uint16).reshape(16, 16), VOILUTSequence=[item])
    ds.WindowCenter, ds.WindowWidth = 10, 2  # ignored: the LUT wins
    volume = load_volume([ds])
    out = voi_to_unit(volume.array, voi_source(volume))
    expected = apply_voi_lut(np.arange(256).reshape(16, 16), ds) / 127.0
    np.testing.assert_allclose(out[0], expected, atol=1e-6)


def test_image_without_voi_falls_back_to_min_max() -> None:
    volume = load_volume([_radiograph(_ramp())])
    out = normalise_intensity(volume.array, Preprocess(intensity="voi"), voi=voi_source(volume))
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(normalise_intensity(volume.array, Preprocess(intensity="voi")), out)
    assert voi_to_unit(np.full((2, 2), 5.0), VoiSource(dataset=Dataset())).max() == 0.0  # flat image


def test_percentile_clips_and_maps_to_unit_range() -> None:
    values = np.arange(1001, dtype=np.float32)  # 0..1000
    settings = Preprocess(intensity="percentile", percentiles=(10.0, 90.0))
    assert percentile_bounds(values, (10.0, 90.0)) == pytest.approx((100.0, 900.0))
    out = normalise_intensity(values, settings)
    assert out[0] == 0.0 and out[-1] == 1.0
    assert out[500] == pytest.approx(0.5)
    # bounds from elsewhere (the whole volume, for a crop) win over the array's own
    out = normalise_intensity(values, settings, bounds=(0.0, 2000.0))
    assert out[1000] == pytest.approx(0.5)


def test_standardize_then_scale_and_shift_like_deepbet() -> None:
    values = np.random.default_rng(0).normal(300.0, 80.0, size=20_000).astype(np.float32)
    settings = Preprocess(intensity="percentile", standardize=True, scale=0.226, shift=0.449)
    out = normalise_intensity(values, settings)
    assert out.mean() == pytest.approx(0.449, abs=1e-4)
    assert out.std() == pytest.approx(0.226, abs=1e-4)
    # the same as deepbet.utils.normalize (numpy translation; torch.std's Bessel correction is ~1e-5 here)
    low, high = np.percentile(values, [0.5, 99.5])
    unit = np.clip((values - low) / (high - low), 0.0, 1.0)
    reference = 0.226 * (unit - unit.mean()) / unit.std(ddof=1) + 0.449
    np.testing.assert_allclose(out, reference, atol=1e-4)


def test_window_and_zscore_combine_with_scale_and_shift() -> None:
    values = np.array([-1000.0, 40.0, 3000.0], dtype=np.float32)
    settings = Preprocess(intensity="window", window=Window(center=40.0, width=400.0), scale=2.0, shift=-1.0)
    np.testing.assert_allclose(normalise_intensity(values, settings), [-1.0, 0.0, 1.0], atol=1e-6)
    flat = normalise_intensity(np.full(4, 3.0), Preprocess(intensity="none", standardize=True))
    np.testing.assert_array_equal(flat, 0.0)  # a constant image is centred, not divided by zero
