"""From raw network outputs to results on the source grid: label maps, probabilities, volumes.

Segmentation scores are turned into labels on the model's grid first (``argmax``, or a threshold on
one channel's probability as :class:`~infergate.manifest.Postprocess` says) and only the labels are
mapped back, with nearest-neighbour lookup: interpolating labels (or resampling every class's
scores at full resolution) would cost far more memory and could invent labels between two others.
Mapping back undoes the preprocessing's geometry in reverse order: the padding of a ``fit`` resize,
the resize, the region-of-interest crop (zeros outside it) and the reorientation. Connected-component
and hole clean-up (:mod:`workers.morphology`) then runs at the source resolution.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
from scipy.special import expit

from infergate.manifest import Postprocess, SegmentLabel
from workers.morphology import clean_labels
from workers.preprocess import PreparedInput
from workers.resample import resample_nearest

__all__ = [
    "channel_probability",
    "classification_probabilities",
    "clean_labels",
    "label_map_from_scores",
    "labels_to_source",
    "resample_nearest",
    "segment_volumes_ml",
    "segmentation_to_source",
    "softmax",
    "threshold_labels",
]


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


def channel_probability(output: np.ndarray, postprocess: Postprocess, class_axis: int = 1) -> np.ndarray:
    """Probability of class ``postprocess.channel`` from a network output, keeping a class axis of 1.

    ``activation`` says what the output already is: ``softmax``/``sigmoid`` probabilities are taken
    as they are; raw scores (``none``) get a softmax over the class axis, or a sigmoid when the
    output has a single channel. Softmax is per voxel, so applying it per patch before blending
    equals applying it afterwards.

    Raises
    ------
    ValueError
        The output has no channel ``postprocess.channel``.
    """
    values = np.asarray(output)
    channels = values.shape[class_axis]
    if postprocess.channel >= channels:
        raise ValueError(f'Postprocess "channel" {postprocess.channel} is missing from {channels} output channels.')
    if postprocess.activation != "none":
        probability = values
    elif channels == 1:
        probability = expit(values)
    else:
        probability = softmax(values, axis=class_axis)
    return np.asarray(probability.take([postprocess.channel], axis=class_axis), dtype=np.float32)


def threshold_labels(probability: np.ndarray, threshold: float, class_axis: int) -> np.ndarray:
    """Label 1 where the single-channel ``probability`` exceeds ``threshold`` (strictly, as deepbet)."""
    return (np.take(probability, 0, axis=class_axis) > threshold).astype(np.uint8)


def labels_to_source(labels: np.ndarray, prepared: PreparedInput) -> np.ndarray:
    """Map a label map on the model grid back onto the source volume's (slice, row, column) grid.

    Parameters
    ----------
    labels : numpy.ndarray
        uint8 labels with the shape of ``prepared.array``.
    prepared : PreparedInput
        Says how the model grid was made from the source.

    Returns
    -------
    numpy.ndarray
        uint8 ``prepared.source_shape`` labels (a new, contiguous array).
    """
    if labels.shape != prepared.array.shape:
        raise ValueError(f'Argument "labels" has shape {labels.shape}; the model grid is {prepared.array.shape}.')
    inside = labels[prepared.content] if prepared.content is not None else labels
    region = resample_nearest(inside, prepared.region_shape)
    if prepared.crop is not None:
        full = np.zeros(prepared.orientation.shape(prepared.source_shape), dtype=np.uint8)
        full[prepared.crop] = region
        region = full
    return np.ascontiguousarray(prepared.orientation.invert(region), dtype=np.uint8)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (the largest logit is subtracted before ``exp``)."""
    values = np.asarray(logits, dtype=np.float64)
    shifted = values - np.max(values, axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / np.sum(exp, axis=axis, keepdims=True)


def classification_probabilities(
    logits: np.ndarray, activation: Literal["none", "softmax", "sigmoid"] = "none"
) -> np.ndarray:
    """Probabilities per class of one input from a ``(1, C)`` (or ``(C,)``) output.

    ``activation`` is what the output already is (``Postprocess.activation``): raw logits
    (``none``) get a softmax; probabilities are kept as they are.

    Raises
    ------
    ValueError
        ``logits`` holds more than one row (one series gets one answer), or claimed probabilities
        lie outside [0, 1].
    """
    values = np.asarray(logits)
    if values.ndim == 2 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 1:
        raise ValueError(f'Argument "logits" should have shape (1, C) or (C,), not {values.shape}.')
    if activation == "none":
        return softmax(values)
    if np.any(values < -1e-6) or np.any(values > 1.0 + 1e-6):
        raise ValueError(f'The output should be probabilities ("activation": "{activation}") but leaves [0, 1].')
    return np.clip(values.astype(np.float64), 0.0, 1.0)


#: Voxels counted at a time by :func:`segment_volumes_ml` (an 8 MB int64 copy).
_COUNT_CHUNK = 1 << 20


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
    # Counted a chunk at a time: np.bincount copies its input to int64 first, which for a whole
    # 200 x 512^2 map is 420 MB of fresh memory and took 0.5-0.9 s in a worker process.
    flat = label_map.reshape(-1)
    counts = np.zeros(max(values, default=0) + 1, dtype=np.int64)
    for start in range(0, flat.size, _COUNT_CHUNK):
        counts += np.bincount(flat[start : start + _COUNT_CHUNK], minlength=counts.size)[: counts.size]
    return {value: float(counts[value]) * voxel_ml if value < counts.size else 0.0 for value in values}
