"""Geometry of the model grid and its exact inverse: nearest lookup, ``fit`` resize, orientation, thresholds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infergate.dicom.volume import Volume
from infergate.manifest import ModelPackage, Postprocess, Preprocess
from tests.unit.workers._fakes import PointwiseRunner, segmentation_package, volume_of
from workers.inference import infer
from workers.postprocess import channel_probability, classification_probabilities, labels_to_source
from workers.preprocess import prepare
from workers.resample import fit_into, fit_placement, nearest_indices, resample

#: Row cosines P (the column index runs Posterior), column cosines I, normal R: a sagittal series.
SAGITTAL = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]])


@pytest.mark.parametrize(("n_in", "n_out"), [(197, 128), (233, 128), (189, 256), (7, 3), (3, 7), (100, 100)])
def test_nearest_indices_match_torch_nearest_exact(n_in: int, n_out: int) -> None:
    torch = pytest.importorskip("torch")
    source = torch.arange(n_in, dtype=torch.float32)[None, None]
    expected = torch.nn.functional.interpolate(source, size=n_out, mode="nearest-exact")[0, 0].numpy()
    np.testing.assert_array_equal(nearest_indices(n_in, n_out), expected.astype(int))


def test_fit_keeps_the_physical_aspect_ratio_and_centres_the_image() -> None:
    # 200 x 50 mm into 256 x 256: 0.78125 mm voxels, 256 x 64 voxels, 96 columns of padding per side
    content_shape, content = fit_placement((1000, 500), (0.2, 0.1), (256, 256))
    assert content_shape == (256, 64)
    assert content == (slice(0, 256), slice(96, 160))
    image = np.arange(12, dtype=np.float32).reshape(3, 4) + 5.0
    fitted = fit_into(image, (6, 6), (slice(0, 6), slice(1, 5)), "nearest")
    assert fitted.shape == (6, 6) and fitted[0, 0] == 5.0 and fitted[:, 0].max() == 5.0  # padded with the minimum
    np.testing.assert_array_equal(fitted[:, 1:5], resample(image, (6, 4), "nearest"))
    with pytest.raises(ValueError, match="one value per axis"):
        fit_placement((4, 4), (1.0, 1.0), (4, 4, 4))


def test_fit_2d_model_prepares_a_padded_grid_and_maps_labels_back(tmp_path: Path) -> None:
    # 10 x 5 mm into 20 x 20: 0.5 mm voxels (exactly x2), 20 x 10 voxels, 5 columns of padding per side
    array = np.zeros((2, 10, 5), dtype=np.float32)
    array[:, 2:8, 1:4] = 0.9
    volume = volume_of(array, spacing=(1.0, 1.0, 1.0))
    settings = Preprocess(intensity="none", target_shape=[20, 20], resize="fit", interpolation="nearest")
    prepared = prepare(volume, settings, 2)
    assert prepared.array.shape == (2, 20, 20) and prepared.content == (slice(0, 2), slice(0, 20), slice(5, 15))
    assert prepared.spacing == pytest.approx((1.0, 0.5, 0.5))
    labels = (prepared.array > 0.5).astype(np.uint8)
    labels[:, :, :5] = 1  # padding is cut off on the way back
    np.testing.assert_array_equal(labels_to_source(labels, prepared), (array > 0.5).astype(np.uint8))
    output = infer(volume_of(array), segmentation_package(tmp_path, dimensionality=2, **settings.model_dump()), _pw())
    assert output.label_map is not None
    np.testing.assert_array_equal(output.label_map, np.where(array < 0.5, 1, 0))


def _pw() -> PointwiseRunner:
    return PointwiseRunner()


def _oriented_volume(array: np.ndarray, direction: np.ndarray, spacing: tuple[float, float, float]) -> Volume:
    volume = volume_of(array, spacing=spacing)
    volume.direction = direction
    return volume


@pytest.mark.parametrize("resize", ["stretch", "fit"])
def test_orientation_and_resize_map_back_exactly(tmp_path: Path, resize: str) -> None:
    # 8 x 16 x 32 voxels of 2 x 1 x 0.5 mm: 16 mm cubed, upsampled x4, x2, x1 onto 32^3 then mapped back
    array = np.random.default_rng(0).random((8, 16, 32)).astype(np.float32)
    volume = _oriented_volume(array, SAGITTAL, (2.0, 1.0, 0.5))
    settings: dict[str, Any] = {"orientation": "RAS", "target_shape": [32, 32, 32], "resize": resize}
    prepared = prepare(volume, Preprocess(intensity="none", interpolation="nearest", **settings), 3)
    # slices run Right, columns Posterior, rows Inferior: RAS takes slices, columns and rows, flipping the last two
    assert prepared.orientation.axes == (0, 2, 1) and prepared.orientation.flips == (False, True, True)
    np.testing.assert_array_equal(prepared.array[::4, :, ::2], prepared.orientation.apply(array))
    runner = PointwiseRunner()
    package = segmentation_package(tmp_path, interpolation="nearest", **settings)
    output = infer(volume, package, runner)
    assert output.label_map is not None
    np.testing.assert_array_equal(output.label_map, np.where(array < 0.5, 1, 0))


def _with_postprocess(package: ModelPackage, **postprocess: Any) -> ModelPackage:
    manifest = package.manifest.model_copy(update={"postprocess": Postprocess(**postprocess)})
    return package.model_copy(update={"manifest": manifest})


def test_threshold_on_one_channel_with_clean_up(tmp_path: Path) -> None:
    array = np.full((12, 12, 12), 0.9, dtype=np.float32)
    array[2:9, 2:9, 2:9] = 0.1  # label 1 where channel 1 (1 - x) > 0.5
    array[5, 5, 5] = 0.9  # a hole
    array[11, 11, 11] = 0.1  # an island
    package = _with_postprocess(
        segmentation_package(tmp_path), threshold=0.5, channel=1, activation="softmax", largest_component=True
    )
    output = infer(volume_of(array), package, PointwiseRunner())
    assert output.label_map is not None
    assert output.label_map[11, 11, 11] == 0 and output.label_map[5, 5, 5] == 0
    filled = _with_postprocess(package, threshold=0.5, activation="softmax", largest_component=True, fill_holes=True)
    output = infer(volume_of(array), filled, PointwiseRunner())
    assert output.label_map is not None
    expected = np.zeros_like(array, dtype=np.uint8)
    expected[2:9, 2:9, 2:9] = 1
    np.testing.assert_array_equal(output.label_map, expected)


def test_channel_probability_by_activation() -> None:
    logits = np.array([[[0.0, 2.0]], [[np.log(3.0), 0.0]]], dtype=np.float32).transpose(1, 0, 2)  # (1, 2, 2)
    soft = channel_probability(logits, Postprocess(activation="none", channel=0))
    np.testing.assert_allclose(soft[0, 0], [0.25, 1.0 / (1.0 + np.exp(-2.0))], rtol=1e-6)
    assert soft.shape == (1, 1, 2)
    single = channel_probability(np.zeros((1, 1, 3)), Postprocess(activation="none", channel=0))
    np.testing.assert_allclose(single, 0.5)
    kept = channel_probability(np.full((1, 2, 3), 0.3), Postprocess(activation="sigmoid", channel=1))
    np.testing.assert_allclose(kept, 0.3)
    with pytest.raises(ValueError, match='"channel" 1'):
        channel_probability(np.zeros((1, 1, 3)), Postprocess(channel=1))


def test_classification_probabilities_respect_the_activation() -> None:
    np.testing.assert_allclose(classification_probabilities(np.array([[0.2, 0.8]]), "softmax"), [0.2, 0.8])
    np.testing.assert_allclose(classification_probabilities(np.array([0.0, 0.0])), [0.5, 0.5])
    with pytest.raises(ValueError, match="probabilities"):
        classification_probabilities(np.array([[-3.0, 2.0]]), "softmax")
