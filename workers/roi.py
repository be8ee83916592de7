"""The region-of-interest cascade: a coarse model finds where the main model should look.

This reproduces deepbet's ``BrainExtraction.run_model`` generically (Fisch et al., deepbet): the
whole volume is resized to the ROI model's small input, normalised like the main input, and run; the
chosen channel, thresholded and reduced to its largest connected component, gives a bounding box
that is scaled to the full-resolution grid, grown by a margin and cropped. The main model then sees
the crop at its own ``target_shape``, which spends its voxels on the anatomy rather than on air.

The box follows deepbet's ``get_bbox``/``get_bbox_with_margin`` to the bit (float32 arithmetic,
half-to-even rounding, truncation towards zero), so an exported model sees the crop its authors'
code would have given it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from infergate.errors import ModelFailed
from infergate.manifest import Preprocess
from workers.intensity import VoiSource, normalise_intensity, percentile_bounds
from workers.morphology import largest_component
from workers.resample import resample

#: A slab along one axis counts as inside the box when more than this fraction of it is foreground
#: (deepbet's ``get_bbox`` threshold): a few stray voxels must not stretch the box.
BOX_MIN_FRACTION = 0.02

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Region:
    """What the ROI model found.

    Attributes
    ----------
    crop : tuple[slice, slice, slice]
        The box in the (oriented) full-resolution array.
    bounds : tuple[float, float] | None
        With ``"intensity": "percentile"``, the percentiles of the coarse whole-volume image, reused
        for the crop as deepbet does (the crop has lost most of the background they describe).
    """

    crop: tuple[slice, slice, slice]
    bounds: tuple[float, float] | None


def box_with_margin(
    mask: np.ndarray, shape: tuple[int, ...], margin: float, axes: tuple[int, ...] | None = None
) -> tuple[slice, ...]:
    """The box of ``mask`` scaled to ``shape`` and grown by ``margin`` per side (deepbet's semantics).

    Parameters
    ----------
    mask : numpy.ndarray
        Boolean foreground on the coarse grid.
    shape : tuple[int, ...]
        The full-resolution shape the box is for, one value per axis of ``mask``.
    margin : float
        Fraction of the box's size added on each side before clipping to the array.
    axes : tuple[int, ...] | None
        Axes to box; the others keep their full range (the slice axis of a 2-D model). All when None.

    Returns
    -------
    tuple[slice, ...]
        One slice per axis.

    Raises
    ------
    ModelFailed
        Along some axis no slab holds more than :data:`BOX_MIN_FRACTION` foreground.
    """
    boxed = tuple(range(mask.ndim)) if axes is None else axes
    slices = [slice(0, n) for n in shape]
    values = mask.astype(np.float32)
    for axis in boxed:
        other = tuple(a for a in range(mask.ndim) if a != axis)
        inside = np.flatnonzero(values.mean(axis=other) > BOX_MIN_FRACTION)
        if inside.size == 0:
            raise ModelFailed(
                "The region-of-interest model found too little foreground to place a box; the series "
                "probably does not show what this model is for."
            )
        scale = np.float32(shape[axis]) / np.float32(mask.shape[axis])
        centre = np.float32((inside.max() + 1 + inside.min()) / 2.0) * scale
        size = np.float32(inside.max() + 1 - inside.min()) * scale
        size = (np.float32(1.0) + np.float32(2.0) * np.float32(margin)) * size
        centre, size = np.round(centre), np.round(size)
        low, high = int(centre - size / 2), int(centre + size / 2)
        slices[axis] = slice(max(0, low), min(shape[axis], high))
    return tuple(slices)


def find_region(
    array: np.ndarray,
    preprocess: Preprocess,
    dimensionality: Literal[2, 3],
    predict: Predict,
    voi: VoiSource | None = None,
) -> Region:
    """Run the ROI model of ``preprocess.roi`` on ``array`` and return the box to crop.

    Parameters
    ----------
    array : numpy.ndarray
        The (oriented) full-resolution volume in modality units, ``(slices, rows, columns)``.
    preprocess : Preprocess
        Its ``roi`` says how; its intensity steps normalise the coarse input.
    dimensionality : {2, 3}
        A 3-D ROI model sees the whole volume at ``roi.shape``; a 2-D one sees each slice, and the box
        then spans every slice.
    predict : Callable[[numpy.ndarray], numpy.ndarray]
        Runs the ROI network: ``(b, 1, *roi.shape)`` float32 to ``(b, C, *roi.shape)``.
    voi : VoiSource | None
        For ``"intensity": "voi"``.

    Returns
    -------
    Region
        The crop and the percentile bounds to reuse.

    Raises
    ------
    ValueError
        ``roi`` is missing or its ``shape`` does not match ``dimensionality``.
    ModelFailed
        The ROI output has too few channels or too little foreground.
    """
    roi = preprocess.roi
    if roi is None:
        raise ValueError('Preprocess has no "roi".')
    if len(roi.shape) != dimensionality:
        raise ValueError(f'"roi" "shape" has {len(roi.shape)} values but the model is {dimensionality}-D.')
    kept = array.shape[: 3 - dimensionality]
    coarse = resample(array, (*kept, *roi.shape), roi.interpolation)
    bounds = percentile_bounds(coarse, preprocess.percentiles) if preprocess.intensity == "percentile" else None
    images = normalise_intensity(coarse, preprocess, bounds=bounds, voi=voi)
    images = images[np.newaxis] if dimensionality == 3 else images
    channels = []
    for first in range(0, images.shape[0], preprocess.batch_size):
        batch = np.ascontiguousarray(images[first : first + preprocess.batch_size, np.newaxis])
        output = predict(batch)
        if output.shape[0] != batch.shape[0] or output.shape[2:] != batch.shape[2:] or output.shape[1] <= roi.channel:
            raise ModelFailed(
                f'The region-of-interest model returned shape {output.shape}; "roi" "channel" is {roi.channel}.'
            )
        channels.append(output[:, roi.channel])
    mask = np.concatenate(channels) > roi.threshold
    mask = mask[0] if dimensionality == 3 else mask
    if roi.largest_component:
        mask = largest_component(mask)
    crop = box_with_margin(mask, array.shape, roi.margin, axes=None if dimensionality == 3 else (1, 2))
    return Region(crop=(crop[0], crop[1], crop[2]), bounds=bounds)
