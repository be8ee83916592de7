"""Intensity normalisation of model inputs: window, the image's own VOI, percentiles, z-score.

The steps follow :class:`~infergate.manifest.Preprocess`: one of ``window``, ``voi``, ``percentile``,
``zscore`` or ``none``; then, if ``standardize``, a z-score of the result; finally ``scale * x + shift``
(deepbet, for example, clips to the 0.5-99.5 percentiles, z-scores, then maps to mean 0.449 and
standard deviation 0.226, the ImageNet statistics its encoder was trained with).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_voi, apply_windowing

from infergate.dicom.volume import Volume, invert_monochrome1
from infergate.manifest import Preprocess


@dataclass(frozen=True)
class VoiSource:
    """The dataset whose VOI LUT or window applies, and how the volume's values relate to its input.

    Attributes
    ----------
    dataset : pydicom.Dataset
        The first image of the series; its VOI LUT Module (PS3.3 C.11.2) is applied.
    reflection : float | None
        For a MONOCHROME1 radiograph, which :func:`~infergate.dicom.volume.load_volume` inverted to
        MONOCHROME2 polarity, the constant ``c`` with ``modality value = c - volume value``; the
        VOI was defined on the modality values. None when the volume holds modality values as they are.
    """

    dataset: Dataset
    reflection: float | None = None


def voi_source(volume: Volume) -> VoiSource:
    """The VOI source of ``volume``: its first dataset, and the MONOCHROME1 reflection if one was applied.

    The reflection is recovered by applying the volume loader's own inversion again (it is its own
    inverse), so this stays right whatever range that inversion uses.
    """
    ds = volume.datasets[0]
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    # the loader's own test for "a projection image without patient geometry"
    geometry = ds.get("ImageOrientationPatient") is not None and ds.get("ImagePositionPatient") is not None
    if photometric != "MONOCHROME1" or len(volume.datasets) != 1 or geometry:
        return VoiSource(dataset=ds)
    corner = volume.array[:1, :1, :1]
    modality = invert_monochrome1(volume.array, ds)[:1, :1, :1]
    return VoiSource(dataset=ds, reflection=float(modality[0, 0, 0] + corner[0, 0, 0]))


def percentile_bounds(array: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """The ``percentiles`` (0-100, linear interpolation as ``torch.quantile``) of ``array``."""
    low, high = np.percentile(np.asarray(array, dtype=np.float32), percentiles)
    return float(low), float(high)


def _to_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to ``[low, high]`` and map linearly onto [0, 1]; a flat range gives zeros."""
    if not high > low:
        return np.zeros(values.shape, dtype=np.float32)
    scaled = (np.asarray(values, dtype=np.float32) - np.float32(low)) * np.float32(1.0 / (high - low))
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def voi_to_unit(array: np.ndarray, source: VoiSource) -> np.ndarray:
    """Apply the image's VOI LUT or window (PS3.3 C.11.2) and map its output range onto [0, 1].

    A VOI LUT Sequence is preferred over Window Center/Width (as pydicom does); the first of several
    alternatives is used. Windowed output is scaled by the window function's own range (its values
    far below and above the window), a LUT's by its lowest and highest entries: the LUT Descriptor's
    bit depth is unreliable in practice. An image without any VOI is mapped from its minimum and
    maximum instead.

    For a MONOCHROME1 radiograph that the volume loader inverted, the VOI is applied to the original
    modality values and its result inverted again, so the output still rises with the volume's values
    (denser is brighter) while the window's position is the one the modality defined.
    """
    ds = source.dataset
    values = np.asarray(array, dtype=np.float64)
    if source.reflection is not None:
        values = source.reflection - values
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        entries = int(item.LUTDescriptor[0]) or 2**16
        first = int(item.LUTDescriptor[1])
        table = np.asarray(apply_voi(np.arange(first, first + entries, dtype=np.int64), ds), dtype=np.float64)
        # rounded and clipped into the table first: pydicom indexes with unsigned ints that would wrap
        indices = np.clip(np.rint(values), first, first + entries - 1).astype(np.int64) - first
        unit = _to_unit(table[indices], float(table.min()), float(table.max()))
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        low, high = apply_windowing(np.array([-np.inf, np.inf]), ds)
        unit = _to_unit(apply_windowing(values, ds), float(low), float(high))
    else:
        return _to_unit(array, float(np.min(array)), float(np.max(array)))
    return (1.0 - unit).astype(np.float32) if source.reflection is not None else unit


def normalise_intensity(
    array: np.ndarray,
    preprocess: Preprocess,
    *,
    bounds: tuple[float, float] | None = None,
    voi: VoiSource | None = None,
) -> np.ndarray:
    """Apply the manifest's intensity steps to ``array``.

    Parameters
    ----------
    array : numpy.ndarray
        Values in modality units on the model's grid.
    preprocess : Preprocess
        ``window`` clips to ``[center - width/2, center + width/2]`` and maps it onto [0, 1]; ``voi``
        applies the image's own VOI (:func:`voi_to_unit`); ``percentile`` clips to the
        ``percentiles`` of ``array`` (or to ``bounds``) and maps them onto [0, 1]; ``zscore``
        subtracts the mean and divides by the standard deviation; ``none`` keeps the values. Then
        ``standardize`` z-scores the result and ``scale``/``shift`` apply.
    bounds : tuple[float, float] | None
        Percentile values computed elsewhere, e.g. on the whole volume when ``array`` is a crop of it
        (a crop has lost the background the percentiles were chosen for).
    voi : VoiSource | None
        Where the VOI comes from; without it, ``voi`` falls back to the array's minimum and maximum.

    Returns
    -------
    numpy.ndarray
        float32, same shape.
    """
    values = np.asarray(array, dtype=np.float32)
    if preprocess.intensity == "window":
        window = preprocess.window
        if window is None:  # the manifest validator already refuses this
            raise ValueError('"intensity": "window" needs a "window".')
        out = _to_unit(values, window.center - window.width / 2.0, window.center + window.width / 2.0)
    elif preprocess.intensity == "voi":
        fallback = VoiSource(dataset=Dataset())  # no VOI attributes: the image's own minimum and maximum
        out = voi_to_unit(values, voi if voi is not None else fallback)
    elif preprocess.intensity == "percentile":
        low, high = bounds if bounds is not None else percentile_bounds(values, preprocess.percentiles)
        out = _to_unit(values, low, high)
    elif preprocess.intensity == "zscore":
        out = _zscore(values)
    else:
        out = values.copy()
    if preprocess.standardize:
        out = _zscore(out)
    if preprocess.scale != 1.0 or preprocess.shift != 0.0:
        out = out * np.float32(preprocess.scale) + np.float32(preprocess.shift)
    return out.astype(np.float32, copy=False)


def _zscore(values: np.ndarray) -> np.ndarray:
    """Mean 0, standard deviation 1; a constant image (sd 0) is only centred, never divided by zero."""
    mean = float(values.mean(dtype=np.float64))
    std = float(values.std(dtype=np.float64)) or 1.0
    return ((values - np.float32(mean)) * np.float32(1.0 / std)).astype(np.float32, copy=False)
