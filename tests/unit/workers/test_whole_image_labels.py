"""Whole-image segmentation turns each batch's scores into labels at once: the same labels as blending them first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from infergate.manifest import ModelPackage
from tests.unit.workers._fakes import PointwiseRunner, segmentation_package
from workers.inference import _checked_predict, _segment, sliding_window
from workers.postprocess import channel_probability, label_map_from_scores, threshold_labels


def _blended(images: np.ndarray, package: ModelPackage) -> np.ndarray:
    """The labels as computed before: one uniform window over each whole image, blended, then decided."""
    post, batch = package.manifest.postprocess, package.manifest.preprocess.batch_size
    if post.threshold is None:
        predict = _checked_predict(PointwiseRunner(), package, 3, spatial_output=True)
        scores = sliding_window(images, images.shape[1:], 0.0, batch, predict, 3, "uniform")
        return label_map_from_scores(scores, class_axis=1)
    raw = _checked_predict(PointwiseRunner(), package, None, spatial_output=True, min_classes=post.channel + 1)

    def probability(chunk: np.ndarray) -> np.ndarray:
        return channel_probability(raw(chunk), post, class_axis=1)

    scores = sliding_window(images, images.shape[1:], 0.0, batch, probability, 1, "uniform")
    return threshold_labels(scores, post.threshold, class_axis=1)


@pytest.mark.parametrize("batch_size", [1, 3, 7])
@pytest.mark.parametrize("threshold", [None, 0.4])
def test_whole_image_labels_equal_the_blended_ones(tmp_path: Path, batch_size: int, threshold: float | None) -> None:
    images = np.random.default_rng(5).random((7, 12, 10)).astype(np.float32)
    images[0, :2, :2] = 0.5  # ties between classes 0 and 1: argmax keeps the first in both ways
    package = segmentation_package(tmp_path, dimensionality=2, batch_size=batch_size)
    if threshold is not None:
        manifest = package.manifest.model_copy(
            update={"postprocess": package.manifest.postprocess.model_copy(update={"threshold": threshold})}
        )
        package = ModelPackage(manifest=manifest, folder=tmp_path)
    runner = PointwiseRunner()
    labels = _segment(images, package, runner, None)
    assert labels.dtype == np.uint8 and labels.shape == images.shape
    np.testing.assert_array_equal(labels, _blended(images, package))
    assert [shape[0] for shape in runner.batches] == [min(batch_size, 7 - start) for start in range(0, 7, batch_size)]
