"""From a :class:`~infergate.dicom.volume.Volume` to the array a model expects.

The steps and their order come from the manifest (:class:`~infergate.manifest.Preprocess`):
the volume is already in modality units, then it is resampled to the model's grid, then its
intensities are normalised. The returned :class:`PreparedInput` remembers the source shape so that
the outputs can be mapped back onto the source slices exactly.

Grids are aligned by their outer edges (scipy's ``grid_mode=True``, PyTorch's
``align_corners=False``): a voxel covers the same physical extent before and after resampling,
so the field of view is kept and the two directions of mapping agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from infergate.dicom.volume import Volume
from infergate.manifest import Preprocess


@dataclass(frozen=True)
class PreparedInput:
    """A volume on the model's grid, normalised, with what is needed to map results back.

    Attributes
    ----------
    array : numpy.ndarray
        float32 ``(slices, rows, columns)`` on the model's grid. For a 2-D model only the rows and
        columns are resampled and each slice is one image.
    source_shape : tuple[int, int, int]
        ``(slices, rows, columns)`` of the source volume.
    spacing : tuple[float, float, float]
        mm between voxel centres of ``array`` along its three axes.
    """

    array: np.ndarray
    source_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]


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


def normalise_intensity(array: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """Apply the manifest's intensity step.

    ``window`` clips to ``[center - width/2, center + width/2]`` and maps that range linearly onto
    ``[0, 1]``; ``zscore`` subtracts the mean and divides by the standard deviation (1 when the
    image is constant, which would otherwise divide by zero); ``none`` returns the values as they
    are.
    """
    values = np.asarray(array, dtype=np.float32)
    if preprocess.intensity == "window":
        window = preprocess.window
        if window is None:  # the manifest validator already refuses this
            raise ValueError('"intensity": "window" needs a "window".')
        low = window.center - window.width / 2.0
        scaled = (values - np.float32(low)) * np.float32(1.0 / window.width)
        return np.clip(scaled, 0.0, 1.0, out=scaled)
    if preprocess.intensity == "zscore":
        mean = float(values.mean(dtype=np.float64))
        std = float(values.std(dtype=np.float64)) or 1.0
        return ((values - np.float32(mean)) * np.float32(1.0 / std)).astype(np.float32, copy=False)
    return values.copy()


def prepare(volume: Volume, preprocess: Preprocess, dimensionality: Literal[2, 3]) -> PreparedInput:
    """Resample ``volume`` to the model's grid and normalise its intensities.

    Parameters
    ----------
    volume : Volume
        The source volume in modality units.
    preprocess : Preprocess
        The manifest's preprocessing section.
    dimensionality : {2, 3}
        The model's dimensionality (``accepts.dimensionality``).

    Returns
    -------
    PreparedInput
        The normalised array on the model grid.

    Raises
    ------
    ValueError
        The manifest's targets do not match ``dimensionality``.
    """
    source_shape = volume.shape
    grid = model_grid_shape(source_shape, volume.spacing, preprocess, dimensionality)
    spacing = tuple(s * n / m for s, n, m in zip(volume.spacing, source_shape, grid, strict=True))
    resampled = resample_linear(volume.array, grid)
    return PreparedInput(
        array=normalise_intensity(resampled, preprocess),
        source_shape=source_shape,
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
    )
