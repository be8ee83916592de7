"""Resampling arrays between grids that cover the same extent, and fitting an image into a fixed shape.

Grids are aligned by their outer edges (scipy's ``grid_mode=True``, PyTorch's ``align_corners=False``):
a voxel covers the same physical extent before and after resampling, so the field of view is kept and
the two directions of mapping agree. Nearest-neighbour lookup follows PyTorch's ``nearest-exact`` mode
to the bit, so that a model exported from PyTorch sees the same voxels here as in its reference code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import ndimage

Interpolation = Literal["linear", "nearest"]


def resample_linear(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linearly resample ``array`` to exactly ``shape``, edges aligned.

    Linear rather than cubic interpolation never overshoots, so a thresholding model sees no
    ringing at sharp edges such as bone next to soft tissue.
    """
    if tuple(array.shape) == tuple(shape):
        return np.asarray(array, dtype=np.float32)
    # scipy derives the output shape as round(n_in * zoom), which is exactly n_out here.
    zoom = [n_out / n_in for n_in, n_out in zip(array.shape, shape, strict=True)]
    return ndimage.zoom(np.asarray(array, dtype=np.float32), zoom, order=1, mode="nearest", grid_mode=True)


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each of ``n_out`` voxels when ``n_in`` voxels span the same extent.

    The source of output voxel ``j`` is ``floor((j + 0.5) * scale)`` with ``scale = n_in / n_out``
    rounded to float32, exactly as PyTorch's ``nearest-exact`` interpolation computes it: at the few
    voxels whose centre falls on a source boundary, the float32 scale decides which side is taken.
    """
    scale = float(np.float32(n_in) / np.float32(n_out))
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) * scale
    return np.minimum(np.floor(centres).astype(np.intp), n_in - 1)


def resample_nearest(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resampling of an array (labels or intensities) to exactly ``shape``, edges aligned.

    Used for label maps (it never invents a label between two others) and for model inputs whose
    reference implementation resized with nearest-neighbour lookup. The same function maps a model's
    labels back, so a source voxel lands on the model voxel that covered it.
    """
    if labels.ndim != len(shape):
        raise ValueError(f'Argument "shape" {shape} should have {labels.ndim} values, one per axis of "labels".')
    if tuple(labels.shape) == tuple(shape):
        return labels
    index = np.ix_(*(nearest_indices(n_in, n_out) for n_in, n_out in zip(labels.shape, shape, strict=True)))
    return labels[index]


def resample(array: np.ndarray, shape: tuple[int, ...], interpolation: Interpolation) -> np.ndarray:
    """Resample image intensities to ``shape`` with the manifest's ``interpolation``; float32 out."""
    if interpolation == "nearest":
        return np.asarray(resample_nearest(array, shape), dtype=np.float32)
    return resample_linear(array, shape)


def fit_placement(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[int]
) -> tuple[tuple[int, ...], tuple[slice, ...]]:
    """Where an image goes when it is scaled to fit inside ``target`` keeping its physical aspect ratio.

    The image's extent (voxels times spacing, per axis) is scaled by one factor so that it fills
    ``target`` along its tightest axis; the other axes are then padded evenly on both sides. Keeping
    the aspect ratio matters for radiographs, whose anatomy a stretched image would distort.

    Parameters
    ----------
    shape, spacing : Sequence
        The image's voxels and their size in mm, per axis.
    target : Sequence[int]
        The model's input shape, one value per axis of ``shape``.

    Returns
    -------
    tuple
        ``(content_shape, content)``: the image's shape after scaling, and the slices of ``target``
        that hold it (the rest is padding).

    Raises
    ------
    ValueError
        The three sequences differ in length, or a value is not positive.
    """
    if not len(shape) == len(spacing) == len(target):
        raise ValueError('Arguments "shape", "spacing" and "target" should have one value per axis each.')
    if min(shape) < 1 or min(spacing) <= 0 or min(target) < 1:
        raise ValueError('Arguments "shape", "spacing" and "target" should hold positive values.')
    extents = [n * s for n, s in zip(shape, spacing, strict=True)]
    voxel = max(e / t for e, t in zip(extents, target, strict=True))  # mm per target voxel
    content_shape = tuple(min(t, max(1, int(round(e / voxel)))) for e, t in zip(extents, target, strict=True))
    content = tuple(slice((t - n) // 2, (t - n) // 2 + n) for n, t in zip(content_shape, target, strict=True))
    return content_shape, content


def fit_into(
    array: np.ndarray, target: tuple[int, ...], content: tuple[slice, ...], interpolation: Interpolation
) -> np.ndarray:
    """Resample ``array`` into the ``content`` region of a ``target``-shaped grid padded with its minimum.

    The minimum (air, or the darkest value) is the padding least likely to look like anatomy; a
    constant zero could lie inside the image's range and form an artificial edge.
    """
    content_shape = tuple(s.stop - s.start for s in content)
    scaled = resample(array, content_shape, interpolation)
    out = np.full(target, scaled.min() if scaled.size else 0.0, dtype=np.float32)
    out[content] = scaled
    return out
