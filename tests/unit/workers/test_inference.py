"""Sliding-window inference and the checks around running a model, with runners of known output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from infergate.errors import InvalidInput, ModelFailed, TransientError
from tests.unit.workers._fakes import (
    BrokenRunner,
    MeanRunner,
    PointwiseRunner,
    classification_package,
    segmentation_package,
    volume_of,
)
from workers.inference import blending_weights, infer, patch_starts, sliding_window


def _pointwise(batch: np.ndarray) -> np.ndarray:
    return np.concatenate([batch, 1.0 - batch, batch**2], axis=1)


@pytest.mark.parametrize(("size", "patch", "overlap"), [(10, 4, 0.25), (10, 10, 0.5), (17, 5, 0.0), (9, 4, 0.9)])
def test_patch_starts_cover_every_voxel_within_bounds(size: int, patch: int, overlap: float) -> None:
    starts = patch_starts(size, patch, overlap)
    covered = np.zeros(size, dtype=bool)
    for start in starts:
        assert 0 <= start <= size - patch
        covered[start : start + patch] = True
    assert covered.all()
    assert starts == sorted(set(starts))


def test_blending_weights() -> None:
    uniform = blending_weights((4, 6), "uniform")
    np.testing.assert_array_equal(uniform, 1.0)
    gaussian = blending_weights((9, 9, 9), "gaussian")
    assert gaussian[4, 4, 4] == pytest.approx(1.0)
    assert gaussian.min() > 0.0
    assert gaussian[0, 0, 0] < gaussian[4, 4, 0] < gaussian[4, 4, 4]


@pytest.mark.parametrize("blend", ["uniform", "gaussian"])
@pytest.mark.parametrize(
    ("shape", "patch"), [((20, 30, 25), (8, 16, 12)), ((5, 7, 9), (8, 16, 12)), ((6, 40), (16, 16))]
)
def test_sliding_window_equals_whole_volume_for_a_pointwise_model(
    shape: tuple[int, ...], patch: tuple[int, ...], blend: str
) -> None:
    images = np.random.default_rng(0).random((2, *shape)).astype(np.float32)
    whole = _pointwise(images[:, np.newaxis])
    windowed = sliding_window(images, patch, 0.25, 3, _pointwise, 3, blend=blend)  # type: ignore[arg-type]
    assert windowed.shape == (2, 3, *shape)
    np.testing.assert_allclose(windowed, whole, atol=1e-5)


def test_sliding_window_batches_patches() -> None:
    calls: list[int] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape[0])
        return _pointwise(batch)

    sliding_window(np.zeros((1, 12, 12), dtype=np.float32), (4, 4), 0.0, 4, predict, 3)
    assert calls == [4, 4, 1]  # 9 patches in batches of 4


def test_infer_segmentation_windowed_equals_whole(tmp_path: Path) -> None:
    array = np.random.default_rng(1).random((12, 20, 24)).astype(np.float32)
    volume = volume_of(array, spacing=(2.0, 1.0, 1.0))
    windowed_runner = PointwiseRunner()
    windowed = infer(
        volume,
        segmentation_package(tmp_path, patch_size=[4, 8, 8], overlap=0.5, batch_size=2),
        windowed_runner,
    )
    whole_runner = PointwiseRunner()
    whole = infer(volume, segmentation_package(tmp_path), whole_runner)

    assert windowed.probabilities is None and whole.label_map is not None
    assert whole.label_map.dtype == np.uint8 and whole.label_map.shape == (12, 20, 24)
    np.testing.assert_array_equal(windowed.label_map, whole.label_map)
    # pointwise argmax of [x, 1 - x, x^2] for x in [0, 1): 1 below 0.5, else 0
    np.testing.assert_array_equal(whole.label_map, np.where(array < 0.5, 1, 0))
    assert whole_runner.batches == [(1, 1, 12, 20, 24)]
    assert all(shape[0] <= 2 and shape[1:] == (1, 4, 8, 8) for shape in windowed_runner.batches)


def test_infer_resamples_and_maps_back_to_the_source_grid(tmp_path: Path) -> None:
    array = np.zeros((10, 40, 40), dtype=np.float32)
    array[:, 10:30, 10:30] = 0.9  # label 0 there ([0.9, 0.1, 0.81]); label 1 elsewhere
    package = segmentation_package(tmp_path, target_spacing=[2.0, 2.0, 2.0], patch_size=[4, 8, 8])
    output = infer(volume_of(array), package, PointwiseRunner())
    assert output.label_map is not None and output.label_map.shape == (10, 40, 40)
    np.testing.assert_array_equal(output.label_map, np.where(array > 0.5, 0, 1))


def test_infer_2d_model_runs_slice_by_slice(tmp_path: Path) -> None:
    array = np.random.default_rng(2).random((3, 16, 16)).astype(np.float32)
    runner = PointwiseRunner()
    package = segmentation_package(tmp_path, dimensionality=2, patch_size=[8, 8], batch_size=5)
    output = infer(volume_of(array), package, runner)
    assert output.label_map is not None
    np.testing.assert_array_equal(output.label_map, np.where(array < 0.5, 1, 0))
    assert all(shape[1:] == (1, 8, 8) for shape in runner.batches)
    assert sum(shape[0] for shape in runner.batches) == 3 * 9


def test_infer_classification(tmp_path: Path) -> None:
    volume = volume_of(np.full((4, 8, 8), np.log(3.0) / 2))
    output = infer(volume, classification_package(tmp_path, target_shape=[2, 4, 4]), MeanRunner())
    assert output.label_map is None and output.probabilities is not None
    np.testing.assert_allclose(output.probabilities, [0.25, 0.75], rtol=1e-5)


@pytest.mark.parametrize(
    ("volume", "message"),
    [
        (volume_of(np.zeros((4, 4, 4)), modality="MR"), "accepts modalities"),
        (volume_of(np.zeros((1, 4, 4))), "3-D volume"),
    ],
)
def test_infer_refuses_volumes_the_model_does_not_accept(tmp_path: Path, volume: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        infer(volume, segmentation_package(tmp_path), PointwiseRunner())  # type: ignore[arg-type]


def test_infer_refuses_too_few_slices_and_multislice_2d_classification(tmp_path: Path) -> None:
    package = segmentation_package(tmp_path)
    strict = package.model_copy(
        update={
            "manifest": package.manifest.model_copy(
                update={"accepts": package.manifest.accepts.model_copy(update={"min_slices": 8})}
            )
        }
    )
    with pytest.raises(InvalidInput, match="at least 8 slices"):
        infer(volume_of(np.zeros((4, 4, 4))), strict, PointwiseRunner())
    cls = classification_package(tmp_path)
    flat = cls.model_copy(
        update={
            "manifest": cls.manifest.model_copy(
                update={"accepts": cls.manifest.accepts.model_copy(update={"dimensionality": 2, "min_slices": 1})}
            )
        }
    )
    with pytest.raises(InvalidInput, match="single image"):
        infer(volume_of(np.zeros((3, 4, 4))), flat, MeanRunner())


def test_runner_errors_become_model_failed(tmp_path: Path) -> None:
    runner = BrokenRunner(error=RuntimeError("CUDA exploded"))
    with pytest.raises(ModelFailed, match="CUDA exploded") as info:
        infer(volume_of(np.zeros((4, 4, 4))), segmentation_package(tmp_path), runner)
    assert isinstance(info.value.__cause__, RuntimeError)
    # the runner's own typed errors keep their meaning (e.g. retryable)
    with pytest.raises(TransientError):
        infer(
            volume_of(np.zeros((4, 4, 4))),
            segmentation_package(tmp_path),
            BrokenRunner(error=TransientError("x")),
        )


@pytest.mark.parametrize(
    "output",
    [
        np.zeros((1, 2, 4, 4, 4)),
        np.zeros((1, 3, 4, 4)),
        np.zeros((1, 3, 4, 4, 5)),
        np.full((1, 3, 4, 4, 4), np.nan),
    ],
    ids=["wrong-class-count", "wrong-rank", "wrong-spatial", "nan"],
)
def test_malformed_segmentation_outputs_become_model_failed(tmp_path: Path, output: np.ndarray) -> None:
    with pytest.raises(ModelFailed, match="fake-seg"):
        infer(volume_of(np.zeros((4, 4, 4))), segmentation_package(tmp_path), BrokenRunner(output=output))


def test_wrong_class_count_of_a_classifier_becomes_model_failed(tmp_path: Path) -> None:
    with pytest.raises(ModelFailed, match=r"2 classes"):
        infer(
            volume_of(np.zeros((4, 4, 4))),
            classification_package(tmp_path),
            BrokenRunner(output=np.zeros((1, 3))),
        )


def test_manifest_that_does_not_fit_the_model_becomes_model_failed(tmp_path: Path) -> None:
    with pytest.raises(ModelFailed, match="target_shape"):
        infer(
            volume_of(np.zeros((4, 4, 4))),
            segmentation_package(tmp_path, target_shape=[4, 4]),
            PointwiseRunner(),
        )
    with pytest.raises(ModelFailed, match="patch_size"):
        infer(
            volume_of(np.zeros((4, 4, 4))),
            segmentation_package(tmp_path, patch_size=[4, 4]),
            PointwiseRunner(),
        )
    with pytest.raises(ModelFailed, match="only meaningful for segmentation"):
        infer(
            volume_of(np.zeros((4, 4, 4))),
            classification_package(tmp_path, patch_size=[2, 2, 2]),
            MeanRunner(),
        )
