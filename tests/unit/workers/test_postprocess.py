"""Label maps back on the source grid, probabilities and segment volumes."""

from __future__ import annotations

import numpy as np
import pytest

from infergate.manifest import Code, SegmentLabel
from workers.postprocess import (
    classification_probabilities,
    label_map_from_scores,
    resample_nearest,
    segment_volumes_ml,
    segmentation_to_source,
    softmax,
)
from workers.preprocess import resample_linear


def test_argmax_gives_uint8_labels() -> None:
    scores = np.zeros((3, 2, 2), dtype=np.float32)
    scores[1, 0, 0] = 1.0
    scores[2, 1, 1] = 5.0
    labels = label_map_from_scores(scores)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, [[1, 0], [0, 2]])
    with pytest.raises(ValueError, match="257 classes"):
        label_map_from_scores(np.zeros((257, 1)))


def test_nearest_resampling_inverts_block_downsampling_exactly() -> None:
    coarse = np.random.default_rng(0).integers(0, 3, size=(4, 5, 6), dtype=np.uint8)
    fine = np.repeat(np.repeat(np.repeat(coarse, 2, axis=0), 3, axis=1), 2, axis=2)
    assert resample_nearest(coarse, fine.shape).shape == (8, 15, 12)
    np.testing.assert_array_equal(resample_nearest(coarse, fine.shape), fine)
    np.testing.assert_array_equal(resample_nearest(fine, coarse.shape), coarse)


def test_nearest_resampling_to_odd_shapes_keeps_labels_and_shape() -> None:
    labels = np.zeros((3, 7, 7), dtype=np.uint8)
    labels[:, 2:5, 2:5] = 2
    out = resample_nearest(labels, (10, 23, 17))
    assert out.shape == (10, 23, 17)
    assert set(np.unique(out)) == {0, 2}
    with pytest.raises(ValueError, match="one per axis"):
        resample_nearest(labels, (3, 7))


def test_labels_land_where_the_linear_resampling_took_them_from() -> None:
    # a bright block: downsample linearly, threshold, map back -> the block's own voxels
    source = np.zeros((8, 40, 40), dtype=np.float32)
    source[2:6, 10:30, 12:28] = 1.0
    coarse = resample_linear(source, (4, 20, 20))
    scores = np.stack([1.0 - coarse, coarse])
    labels = segmentation_to_source(scores, (8, 40, 40), class_axis=0)
    np.testing.assert_array_equal(labels, source.astype(np.uint8))


def test_segmentation_to_source_for_slicewise_2d_scores() -> None:
    scores = np.zeros((4, 2, 5, 5), dtype=np.float32)  # (slices, classes, rows, columns)
    scores[1, 1] = 1.0
    labels = segmentation_to_source(scores, (4, 10, 10), class_axis=1)
    assert labels.shape == (4, 10, 10)
    assert labels[1].all() and not labels[[0, 2, 3]].any()


def test_softmax_and_probabilities() -> None:
    probabilities = classification_probabilities(np.array([[0.0, np.log(3.0)]], dtype=np.float32))
    np.testing.assert_allclose(probabilities, [0.25, 0.75])
    np.testing.assert_allclose(softmax(np.array([1000.0, 1000.0])), [0.5, 0.5])  # no overflow
    with pytest.raises(ValueError, match=r"\(1, C\)"):
        classification_probabilities(np.zeros((2, 2)))


def test_segment_volumes_in_millilitres() -> None:
    label_map = np.zeros((10, 10, 10), dtype=np.uint8)
    label_map[:2] = 1  # 200 voxels
    label_map[5, 0, 0] = 2  # 1 voxel
    code = Code(value="85756007", scheme="SCT", meaning="Tissue")
    labels = [SegmentLabel(value=v, name=str(v), category=code, type=code) for v in (1, 2, 3)]
    volumes = segment_volumes_ml(label_map, (2.0, 0.5, 0.5), labels)  # 0.5 mm^3 per voxel
    assert volumes == pytest.approx({1: 0.1, 2: 0.0005, 3: 0.0})
    assert segment_volumes_ml(label_map, (1.0, 1.0, 1.0), [1]) == pytest.approx({1: 0.2})
    with pytest.raises(TypeError, match="integers"):
        segment_volumes_ml(label_map.astype(float), (1.0, 1.0, 1.0), [1])
    with pytest.raises(ValueError, match="positive"):
        segment_volumes_ml(label_map, (1.0, 0.0, 1.0), [1])
