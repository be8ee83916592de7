"""Resampling to the model grid and intensity normalisation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from infergate.manifest import Preprocess, Window
from tests.unit.workers._fakes import volume_of
from workers.preprocess import model_grid_shape, normalise_intensity, prepare, resample_linear


def test_window_clips_and_scales_to_unit_range() -> None:
    settings = Preprocess(intensity="window", window=Window(center=40.0, width=400.0))
    values = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0], dtype=np.float32)
    out = normalise_intensity(values, settings)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)


def test_zscore_and_none() -> None:
    values = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    z = normalise_intensity(values, Preprocess(intensity="zscore"))
    assert z.mean() == pytest.approx(0.0, abs=1e-6)
    assert z.std() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(normalise_intensity(np.full(3, 7.0), Preprocess(intensity="zscore")), 0.0)
    unchanged = normalise_intensity(values, Preprocess(intensity="none"))
    np.testing.assert_array_equal(unchanged, values)
    assert unchanged is not values


def test_grid_shape_from_target_spacing_shape_or_neither() -> None:
    shape, spacing = (100, 512, 512), (2.5, 0.78125, 0.78125)
    assert model_grid_shape(shape, spacing, Preprocess(intensity="none", target_spacing=[2.5, 2.0, 2.0]), 3) == (
        100,
        200,
        200,
    )
    assert model_grid_shape(shape, spacing, Preprocess(intensity="none", target_shape=[32, 64, 64]), 3) == (
        32,
        64,
        64,
    )
    assert model_grid_shape(shape, spacing, Preprocess(intensity="none"), 3) == shape
    # a 2-D model resamples rows and columns only
    assert model_grid_shape(shape, spacing, Preprocess(intensity="none", target_spacing=[1.5625, 1.5625]), 2) == (
        100,
        256,
        256,
    )
    assert model_grid_shape(
        (3, 4, 4), (1.0, 1.0, 1.0), Preprocess(intensity="none", target_spacing=[100, 9, 9]), 3
    ) == (
        1,
        1,
        1,
    )


def test_grid_shape_refuses_targets_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="3 values but the model is 2-D"):
        model_grid_shape((4, 4, 4), (1.0, 1.0, 1.0), Preprocess(intensity="none", target_shape=[2, 2, 2]), 2)


def test_resample_linear_gives_the_exact_shape_and_matches_scipy_grid_mode() -> None:
    array = np.random.default_rng(0).random((7, 33, 20)).astype(np.float32)
    out = resample_linear(array, (5, 17, 41))
    assert out.shape == (5, 17, 41)
    assert out.dtype == np.float32
    reference = ndimage.zoom(array, (5 / 7, 17 / 33, 41 / 20), order=1, mode="nearest", grid_mode=True)
    np.testing.assert_allclose(out, reference, atol=1e-6)


def test_resample_linear_keeps_a_linear_ramp_inside_and_never_overshoots() -> None:
    ramp = np.tile(np.arange(16, dtype=np.float32), (2, 4, 1))
    out = resample_linear(ramp, (2, 4, 8))
    # edge-aligned halving: output voxel j covers input voxels 2j and 2j+1
    np.testing.assert_allclose(out[0, 0], np.arange(8) * 2 + 0.5)
    step = np.zeros((1, 1, 10), dtype=np.float32)
    step[..., 5:] = 1000.0
    up = resample_linear(step, (1, 1, 37))
    assert up.min() >= 0.0 and up.max() <= 1000.0


def test_prepare_resamples_then_windows_and_remembers_the_source() -> None:
    volume = volume_of(np.full((10, 20, 30), 40.0), spacing=(2.0, 1.0, 1.0))
    settings = Preprocess(target_spacing=[4.0, 2.0, 3.0], intensity="window", window=Window(center=40.0, width=80.0))
    prepared = prepare(volume, settings, 3)
    assert prepared.array.shape == (5, 10, 10)
    assert prepared.source_shape == (10, 20, 30)
    assert prepared.spacing == pytest.approx((4.0, 2.0, 3.0))
    np.testing.assert_allclose(prepared.array, 0.5)
