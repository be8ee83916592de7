"""From raw network outputs to results on the source grid: label maps, probabilities, volumes.

Segmentation scores are turned into labels on the model's grid first and only the labels are
mapped back, with nearest-neighbour lookup: interpolating labels (or resampling every class's
scores at full resolution) would cost far more memory and could invent labels between two others.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from infergate.manifest import SegmentLabel


def label_map_from_scores(scores: np.ndarray, class_axis: int = 0) -> np.ndarray:
    """``argmax`` over the class axis: label 0 is background, label ``k`` is class ``k``.

    Parameters
    ----------
    scores : numpy.ndarray
        Per-class scores (logits or probabilities; argmax is the same for both).
    class_axis : int
        The axis holding the classes.

    Returns
    -------
    numpy.ndarray
        uint8 labels with the class axis removed.

    Raises
    ------
    ValueError
        More than 256 classes, which a uint8 label map cannot hold.
    """
    if scores.shape[class_axis] > 256:
        raise ValueError(f'Argument "scores" has {scores.shape[class_axis]} classes; at most 256 fit a uint8 map.')
    return np.argmax(scores, axis=class_axis).astype(np.uint8)


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each of ``n_out`` voxels when ``n_in`` voxels span the same extent."""
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out)
    return np.minimum(np.floor(centres).astype(np.intp), n_in - 1)


def resample_nearest(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resampling of a label map to exactly ``shape``, edges aligned.

    The inverse of :func:`workers.preprocess.resample_linear`'s grid mapping, so that a voxel of
    the source lands on the model voxel that covered it.
    """
    if labels.ndim != len(shape):
        raise ValueError(f'Argument "shape" {shape} should have {labels.ndim} values, one per axis of "labels".')
    if tuple(labels.shape) == tuple(shape):
        return labels
    index = np.ix_(*(_nearest_indices(n_in, n_out) for n_in, n_out in zip(labels.shape, shape, strict=True)))
    return labels[index]


def segmentation_to_source(scores: np.ndarray, source_shape: tuple[int, int, int], class_axis: int) -> np.ndarray:
    """Label map of per-class ``scores`` on the model grid, mapped onto the source grid.

    Parameters
    ----------
    scores : numpy.ndarray
        ``(C, D, H, W)`` for a 3-D model (``class_axis=0``) or ``(S, C, H, W)`` for a 2-D model run
        slice by slice (``class_axis=1``).
    source_shape : tuple[int, int, int]
        ``(slices, rows, columns)`` of the source volume.
    class_axis : int
        Which axis holds the classes.

    Returns
    -------
    numpy.ndarray
        uint8 ``(slices, rows, columns)`` label map aligned with the source slices.
    """
    labels = label_map_from_scores(scores, class_axis=class_axis)
    if labels.ndim != 3:
        raise ValueError(f'Argument "scores" should give a 3-D label map, not shape {labels.shape}.')
    return resample_nearest(labels, source_shape)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (the largest logit is subtracted before ``exp``)."""
    values = np.asarray(logits, dtype=np.float64)
    shifted = values - np.max(values, axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / np.sum(exp, axis=axis, keepdims=True)


def classification_probabilities(logits: np.ndarray) -> np.ndarray:
    """Probabilities per class of one input from ``(1, C)`` (or ``(C,)``) logits.

    Raises
    ------
    ValueError
        ``logits`` holds more than one row; one series gets one answer.
    """
    values = np.asarray(logits)
    if values.ndim == 2 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 1:
        raise ValueError(f'Argument "logits" should have shape (1, C) or (C,), not {values.shape}.')
    return softmax(values)


def segment_volumes_ml(
    label_map: np.ndarray, spacing: tuple[float, float, float], labels: Iterable[SegmentLabel | int]
) -> dict[int, float]:
    """Volume of each label in millilitres: voxel count times voxel volume (mm^3) / 1000.

    Parameters
    ----------
    label_map : numpy.ndarray
        Integer ``(slices, rows, columns)`` labels on the source grid.
    spacing : tuple[float, float, float]
        mm between slices, rows and columns (:attr:`Volume.spacing`).
    labels : Iterable[SegmentLabel | int]
        The labels to measure (manifest labels or their values); absent labels measure 0.

    Returns
    -------
    dict[int, float]
        Label value -> volume in mL.
    """
    if not np.issubdtype(label_map.dtype, np.integer):
        raise TypeError(f'Argument "label_map" should hold integers, not {label_map.dtype}.')
    if len(spacing) != 3 or any(s <= 0 for s in spacing):
        raise ValueError(f'Argument "spacing" should hold 3 positive numbers, not {spacing}.')
    values = [label.value if isinstance(label, SegmentLabel) else int(label) for label in labels]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = np.bincount(label_map.ravel(), minlength=max(values, default=0) + 1) if label_map.size else np.zeros(1)
    return {value: float(counts[value]) * voxel_ml if value < counts.size else 0.0 for value in values}
