"""From a :class:`~infergate.dicom.volume.Volume` to the array a model expects.

The steps and their order come from the manifest (:class:`~infergate.manifest.Preprocess`): the
volume is already in modality units; it is reoriented to the model's patient axes, optionally cropped
to the box a region-of-interest model finds (:mod:`workers.roi`), resampled to the model's grid
(stretched, or fitted with its aspect ratio kept and padded), and its intensities are normalised
(:mod:`workers.intensity`). The returned :class:`PreparedInput` records each geometric step so that
:func:`workers.postprocess.labels_to_source` can undo them exactly, in reverse order.

Grids are aligned by their outer edges (:mod:`workers.resample`), so a voxel covers the same
physical extent before and after resampling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from infergate.dicom.volume import Volume
from infergate.manifest import Preprocess
from workers.intensity import normalise_intensity, percentile_bounds, voi_source
from workers.orientation import Reorientation, reorientation
from workers.resample import fit_into, fit_placement, resample, resample_linear
from workers.roi import find_region

__all__ = ["PreparedInput", "model_grid_shape", "normalise_intensity", "prepare", "resample_linear"]


@dataclass(frozen=True)
class PreparedInput:
    """A volume on the model's grid, normalised, with what is needed to map results back.

    Attributes
    ----------
    array : numpy.ndarray
        float32 ``(slices, rows, columns)`` on the model's grid (axes in the model's orientation).
        For a 2-D model only the rows and columns are resampled and each slice is one image.
    source_shape : tuple[int, int, int]
        ``(slices, rows, columns)`` of the source volume.
    spacing : tuple[float, float, float]
        mm between voxel centres of ``array`` along its three axes.
    orientation : Reorientation
        How the source axes were permuted and flipped (identity when the manifest keeps them).
    crop : tuple[slice, slice, slice] | None
        The region-of-interest box in the reoriented source, or None for the whole volume.
    content : tuple[slice, slice, slice] | None
        The part of ``array`` holding the image after a ``fit`` resize (the rest is padding); None
        when the image fills the grid.
    region_shape : tuple[int, int, int]
        Shape of what was resampled onto the grid: the crop, or the whole reoriented volume.
    """

    array: np.ndarray
    source_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: Reorientation
    crop: tuple[slice, slice, slice] | None
    content: tuple[slice, slice, slice] | None
    region_shape: tuple[int, int, int]


def model_grid_shape(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    preprocess: Preprocess,
    dimensionality: Literal[2, 3],
) -> tuple[int, int, int]:
    """The shape of the model's grid for a volume of ``shape`` voxels at ``spacing`` mm.

    Parameters
    ----------
    shape, spacing : tuple
        Source ``(slices, rows, columns)`` and their spacing in mm.
    preprocess : Preprocess
        Gives ``target_spacing`` (mm) or ``target_shape`` (voxels), or neither (keep the grid).
    dimensionality : {2, 3}
        A 2-D model's targets have two values and leave the slice axis alone.

    Returns
    -------
    tuple[int, int, int]
        The model grid's shape, at least one voxel per axis.

    Raises
    ------
    ValueError
        ``target_spacing`` / ``target_shape`` has a different number of values from
        ``dimensionality``.
    """
    axes = 3 if dimensionality == 3 else 2
    kept = shape[: 3 - axes]
    if preprocess.target_spacing is not None:
        target = preprocess.target_spacing
        _check_length("target_spacing", target, axes)
        resized = tuple(
            max(1, int(round(n * s / t)))
            for n, s, t in zip(shape[3 - axes :], spacing[3 - axes :], target, strict=True)
        )
    elif preprocess.target_shape is not None:
        _check_length("target_shape", preprocess.target_shape, axes)
        resized = tuple(int(n) for n in preprocess.target_shape)
    else:
        resized = shape[3 - axes :]
    slices, rows, columns = (*kept, *resized)
    return int(slices), int(rows), int(columns)


def _check_length(name: str, values: list[float] | list[int], axes: int) -> None:
    if len(values) != axes:
        raise ValueError(f'Preprocess "{name}" has {len(values)} values but the model is {axes}-D.')


def _triple(values: tuple[float, ...]) -> tuple[float, float, float]:
    return float(values[0]), float(values[1]), float(values[2])


def _resize(
    array: np.ndarray,
    spacing: tuple[float, float, float],
    preprocess: Preprocess,
    dimensionality: Literal[2, 3],
) -> tuple[np.ndarray, tuple[float, float, float], tuple[slice, slice, slice] | None]:
    """Resample to the model grid: stretched, or fitted with the aspect ratio kept (then padded).

    Returns the resampled array, its voxel spacing and, for ``fit``, the region holding the image.
    """
    shape = (int(array.shape[0]), int(array.shape[1]), int(array.shape[2]))
    grid = model_grid_shape(shape, spacing, preprocess, dimensionality)
    if preprocess.resize != "fit":
        stretched = tuple(s * n / m for s, n, m in zip(spacing, shape, grid, strict=True))
        return resample(array, grid, preprocess.interpolation), _triple(stretched), None
    axes = 3 if dimensionality == 3 else 2
    content_shape, placed = fit_placement(shape[3 - axes :], spacing[3 - axes :], grid[3 - axes :])
    content = (*(slice(0, n) for n in shape[: 3 - axes]), *placed)
    fitted = tuple(s * n / m for s, n, m in zip(spacing, shape, (*shape[: 3 - axes], *content_shape), strict=True))
    region = (content[0], content[1], content[2])
    return fit_into(array, grid, region, preprocess.interpolation), _triple(fitted), region


def prepare(
    volume: Volume,
    preprocess: Preprocess,
    dimensionality: Literal[2, 3],
    roi_predict: Callable[[np.ndarray], np.ndarray] | None = None,
) -> PreparedInput:
    """Reorient, crop, resample and normalise ``volume`` as the manifest says.

    Parameters
    ----------
    volume : Volume
        The source volume in modality units.
    preprocess : Preprocess
        The manifest's preprocessing section.
    dimensionality : {2, 3}
        The model's dimensionality (``accepts.dimensionality``).
    roi_predict : Callable[[numpy.ndarray], numpy.ndarray] | None
        Runs the region-of-interest network; required when ``preprocess.roi`` is set.

    Returns
    -------
    PreparedInput
        The normalised array on the model grid and the geometry to map results back.

    Raises
    ------
    ValueError
        The manifest's targets do not match ``dimensionality``, or it has a ``roi`` but no
        ``roi_predict`` was given.
    ModelFailed
        The region-of-interest model found nothing to crop.
    """
    orientation = reorientation(volume.direction, preprocess.orientation)
    array = orientation.apply(volume.array)
    spacing = orientation.spacing(volume.spacing)
    voi = voi_source(volume) if preprocess.intensity == "voi" else None
    crop: tuple[slice, slice, slice] | None = None
    bounds: tuple[float, float] | None = None
    if preprocess.roi is not None:
        if roi_predict is None:
            raise ValueError('Preprocess has a "roi" but no region-of-interest model was given to run it.')
        region = find_region(array, preprocess, dimensionality, roi_predict, voi)
        crop, bounds = region.crop, region.bounds
        array = array[crop]
    region_shape = (int(array.shape[0]), int(array.shape[1]), int(array.shape[2]))
    resized, grid_spacing, content = _resize(array, spacing, preprocess, dimensionality)
    if bounds is None and preprocess.intensity == "percentile":
        # of the image only: a fit's padding (the minimum) would drag the low percentile down
        bounds = percentile_bounds(resized[content] if content is not None else resized, preprocess.percentiles)
    return PreparedInput(
        array=normalise_intensity(resized, preprocess, bounds=bounds, voi=voi),
        source_shape=volume.shape,
        spacing=grid_spacing,
        orientation=orientation,
        crop=crop,
        content=content,
        region_shape=region_shape,
    )
