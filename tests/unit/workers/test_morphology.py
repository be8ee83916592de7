"""Connected components and hole filling of masks and label maps."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from infergate.manifest import Postprocess
from workers.morphology import clean_labels, fill_holes, largest_component, remove_small_components


def _shell(shape: tuple[int, int, int], low: int, high: int) -> np.ndarray:
    """A hollow cube: the faces of [low, high) with an enclosed cavity."""
    mask = np.zeros(shape, dtype=bool)
    mask[low:high, low:high, low:high] = True
    mask[low + 1 : high - 1, low + 1 : high - 1, low + 1 : high - 1] = False
    return mask


def test_largest_component_is_26_connected_and_empty_stays_empty() -> None:
    mask = np.zeros((6, 6, 6), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # a diagonal chain: one 26-connected object
    mask[5, 5, 0] = True
    kept = largest_component(mask)
    assert kept.sum() == 3 and not kept[5, 5, 0]
    assert not largest_component(np.zeros((3, 3, 3), dtype=bool)).any()


def test_fill_holes_equals_scipy_binary_fill_holes() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = ndimage.binary_opening(rng.random((12, 14, 10)) > 0.45)
        np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
    shell = _shell((8, 8, 8), 1, 7)
    assert fill_holes(shell).sum() == 6**3


def test_single_slice_volumes_are_processed_in_2d() -> None:
    ring = np.zeros((1, 7, 7), dtype=bool)
    ring[0, 1:6, 1:6] = True
    ring[0, 3, 3] = False
    assert fill_holes(ring)[0, 3, 3]  # in 3-D every voxel of one slice touches the border
    ring[0, 0, 0] = True  # diagonal neighbour of the ring corner: 8-connected in 2-D
    assert largest_component(ring).sum() == ring.sum()


def test_remove_small_components() -> None:
    mask = np.zeros((5, 5, 5), dtype=bool)
    mask[:2, :2, :2] = True  # 8 voxels
    mask[4, 4, 4] = True
    expected = mask.copy()
    expected[4, 4, 4] = False
    np.testing.assert_array_equal(remove_small_components(mask, 2), expected)
    np.testing.assert_array_equal(remove_small_components(mask, 9), np.zeros_like(mask))
    np.testing.assert_array_equal(remove_small_components(mask, 0), mask)


def test_clean_labels_per_label() -> None:
    labels = np.zeros((12, 12, 12), dtype=np.uint8)
    labels[_shell((12, 12, 12), 1, 8)] = 1
    labels[4, 4, 4] = 2  # another label inside label 1's cavity: kept, not overwritten
    labels[10, 10, 10] = 1  # a stray island of label 1
    labels[10, 0, 0] = 2  # a second island of label 2
    post = Postprocess(largest_component=True, fill_holes=True)
    out = clean_labels(labels, post)
    assert out[10, 10, 10] == 0
    assert out[4, 4, 4] == 2 and out[10, 0, 0] == 0  # label 2 keeps its largest (first of equal) part
    cavity = np.zeros_like(labels, dtype=bool)
    cavity[2:7, 2:7, 2:7] = True
    cavity[4, 4, 4] = False
    assert np.all(out[cavity] == 1)
    assert labels[10, 10, 10] == 1  # the input is not modified
    np.testing.assert_array_equal(clean_labels(labels, Postprocess()), labels)
    dropped = clean_labels(labels, Postprocess(min_component_voxels=2))
    assert dropped[10, 10, 10] == 0 and dropped[4, 4, 4] == 0 and (dropped == 1).sum() == (labels == 1).sum() - 1
