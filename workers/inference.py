"""Run a model package on a volume: check it fits, preprocess, run (whole or sliding window), postprocess.

This is the "inference operator" of the pipeline (MONAI Deploy's split): it takes a typed
:class:`~infergate.dicom.volume.Volume` and returns a typed :class:`InferenceOutput`, knowing
nothing of Celery, SQL or DICOM writing. The network itself is behind
:class:`~workers.runtime.InferenceRunner`, so tests can substitute a runner that computes a known
function; a package with a region-of-interest cascade also needs
:class:`~workers.runtime.RegionRunner` to run its second ONNX file.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from infergate.accepts import check_series
from infergate.dicom.volume import Volume
from infergate.errors import InfergateError, InvalidInput, ModelFailed
from infergate.manifest import ModelManifest, ModelPackage
from workers.postprocess import (
    channel_probability,
    classification_probabilities,
    clean_labels,
    label_map_from_scores,
    labels_to_source,
    threshold_labels,
)
from workers.preprocess import PreparedInput, prepare
from workers.runtime import InferenceRunner, RegionRunner
from workers.stages import StageTimer, timed

log = logging.getLogger(__name__)

#: Standard deviation of the Gaussian blending weights as a fraction of the patch size (nnU-Net's).
GAUSSIAN_SIGMA_SCALE = 0.125
#: Floor of the blending weights, so that voxels seen only near a patch edge are still defined.
_MIN_WEIGHT = 1e-4

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass
class InferenceOutput:
    """What a model produced for one volume.

    Attributes
    ----------
    label_map : numpy.ndarray | None
        Segmentation: uint8 ``(slices, rows, columns)`` on the source grid, 0 is background and
        other values are the manifest's label values. None for classification.
    probabilities : numpy.ndarray | None
        Classification: float64 ``(C,)`` softmax probabilities indexed like the manifest's
        ``classes``. None for segmentation.
    """

    label_map: np.ndarray | None
    probabilities: np.ndarray | None


def check_accepts(volume: Volume, manifest: ModelManifest) -> None:
    """Refuse a volume the model was not made for (``accepts`` in the manifest).

    A 3-D model needs at least two slices; a 2-D segmentation model is run slice by slice; a 2-D
    classification model gives one answer per series and so takes exactly one image.

    Raises
    ------
    InvalidInput
        Wrong dimensionality, modality, body part, image type or number of slices.
    """
    accepts = manifest.accepts
    slices = volume.shape[0]
    if accepts.dimensionality == 3 and slices < 2:
        raise InvalidInput(f"Model {manifest.id!r} needs a 3-D volume; the series has a single image.")
    if accepts.dimensionality == 2 and manifest.task == "classification" and slices != 1:
        raise InvalidInput(f"Model {manifest.id!r} classifies a single image; the series has {slices} slices.")
    check_series(volume.datasets, manifest, images=slices)


def patch_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of windows of ``patch`` voxels covering ``size`` voxels (``size >= patch``).

    Windows advance by ``patch * (1 - overlap)`` voxels (at least one) and the last one is moved
    back to end exactly at the edge, so every voxel is covered without padding beyond the volume.
    """
    if size < patch:
        raise ValueError(f'Argument "size" ({size}) should be at least "patch" ({patch}).')
    step = max(1, int(patch * (1.0 - overlap)))
    starts = list(range(0, size - patch + 1, step))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def blending_weights(patch_size: Sequence[int], blend: Literal["uniform", "gaussian"]) -> np.ndarray:
    """Weights of one patch's voxels when overlapping predictions are averaged.

    Gaussian weights (peak at the centre) trust a voxel less near the patch edge, where a
    convolutional network sees padding instead of context; uniform weights give the plain mean.
    """
    if blend == "uniform":
        return np.ones(tuple(patch_size), dtype=np.float32)
    weights = np.ones((), dtype=np.float64)
    for n in patch_size:
        sigma = max(n * GAUSSIAN_SIGMA_SCALE, 1e-6)
        axis = np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2.0) / sigma) ** 2)
        weights = np.multiply.outer(weights, axis / axis.max())
    return np.maximum(weights, _MIN_WEIGHT).astype(np.float32)


def sliding_window(
    images: np.ndarray,
    patch_size: Sequence[int],
    overlap: float,
    batch_size: int,
    predict: Predict,
    n_classes: int,
    blend: Literal["uniform", "gaussian"] = "gaussian",
) -> np.ndarray:
    """Dense prediction over ``images`` in overlapping patches, blended into one score map.

    Parameters
    ----------
    images : numpy.ndarray
        float32 ``(L, *spatial)``: ``L`` independent images (1 for a 3-D volume, the slices for a
        2-D model run slice by slice), ``spatial`` has ``len(patch_size)`` axes.
    patch_size : Sequence[int]
        The network's input size. An image smaller than a patch is padded by repeating its edge
        (no artificial intensity step for the network to react to) and cropped back afterwards.
    overlap : float
        Fraction of a patch shared with its neighbour, in ``[0, 1)``.
    batch_size : int
        Patches per call of ``predict``.
    predict : Callable[[numpy.ndarray], numpy.ndarray]
        Maps ``(b, 1, *patch_size)`` to ``(b, n_classes, *patch_size)``.
    n_classes : int
        Channels of the prediction.
    blend : {"uniform", "gaussian"}
        Weights of overlapping predictions (:func:`blending_weights`).

    Returns
    -------
    numpy.ndarray
        float32 ``(L, n_classes, *spatial)`` blended scores.
    """
    spatial = tuple(int(n) for n in images.shape[1:])
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != len(spatial):
        raise ValueError(f'Argument "patch_size" {patch} should have {len(spatial)} values for images of {spatial}.')
    if batch_size < 1:
        raise ValueError('Argument "batch_size" should be at least 1.')
    padded = tuple(max(n, p) for n, p in zip(spatial, patch, strict=True))
    pad = [(0, 0)] + [((m - n) // 2, (m - n) - (m - n) // 2) for n, m in zip(spatial, padded, strict=True)]
    source = np.pad(images, pad, mode="edge") if padded != spatial else images
    weights = blending_weights(patch, blend)
    windows = [
        tuple(slice(s, s + p) for s, p in zip(starts, patch, strict=True))
        for starts in itertools.product(*(patch_starts(n, p, overlap) for n, p in zip(padded, patch, strict=True)))
    ]
    weight_sum = np.zeros(padded, dtype=np.float32)
    for window in windows:
        weight_sum[window] += weights
    scores = np.zeros((images.shape[0], n_classes, *padded), dtype=np.float32)
    items = [(index, window) for index in range(images.shape[0]) for window in windows]
    log.debug("sliding window: %d images x %d patches of %s", images.shape[0], len(windows), patch)
    for first in range(0, len(items), batch_size):
        chunk = items[first : first + batch_size]
        batch = np.stack([source[_key(index, window)] for index, window in chunk])[:, np.newaxis]
        output = predict(np.ascontiguousarray(batch, dtype=np.float32))
        for (index, window), item_scores in zip(chunk, output, strict=True):
            scores[_key(index, (slice(None), *window))] += item_scores * weights
    scores /= weight_sum
    crop = tuple(slice(before, before + n) for (before, _), n in zip(pad[1:], spatial, strict=True))
    return scores[(slice(None), slice(None), *crop)]


def _key(index: int, window: tuple[slice, ...]) -> tuple[int | slice, ...]:
    """Index of ``window`` within image ``index`` of an ``(L, ...)`` array."""
    return (index, *window)


def _checked_predict(
    runner: InferenceRunner, package: ModelPackage, n_classes: int | None, spatial_output: bool, min_classes: int = 1
) -> Predict:
    """``runner.run`` with its failures and malformed outputs turned into :class:`ModelFailed`.

    ``n_classes`` None accepts any number of channels from ``min_classes`` up (a thresholded
    output only needs the channel it reads).
    """
    model_id = package.manifest.id

    def predict(batch: np.ndarray) -> np.ndarray:
        try:
            output = runner.run(package, batch)
        except InfergateError:
            raise
        except Exception as exc:  # any runtime failure is permanent for this input and model
            raise ModelFailed(f"Model {model_id!r} failed on input {batch.shape}: {exc}") from exc
        output = np.asarray(output)
        channels = n_classes if n_classes is not None else (output.shape[1] if output.ndim > 1 else 0)
        expected = (batch.shape[0], channels, *batch.shape[2:]) if spatial_output else (batch.shape[0], channels)
        if output.shape != expected or channels < min_classes:
            implied = f"{n_classes} classes" if n_classes is not None else f"at least {min_classes} channels"
            raise ModelFailed(
                f"Model {model_id!r} returned shape {output.shape} for input {batch.shape}; the manifest "
                f"implies {expected} ({implied})."
            )
        if not np.all(np.isfinite(output)):
            raise ModelFailed(f"Model {model_id!r} returned NaN or infinite values.")
        return output.astype(np.float32, copy=False)

    return predict


def _roi_predict(runner: InferenceRunner, package: ModelPackage) -> Predict | None:
    """The region-of-interest network of ``package`` as a checked function, or None if it has none."""
    roi = package.manifest.preprocess.roi
    if roi is None:
        return None
    model_id = package.manifest.id
    if not isinstance(runner, RegionRunner):
        raise ModelFailed(f"Model {model_id!r} has a region-of-interest model but the runner cannot run it.")

    def predict(batch: np.ndarray) -> np.ndarray:
        try:
            output = np.asarray(runner.run_file(package, roi, batch))
        except InfergateError:
            raise
        except Exception as exc:  # as for the main network: permanent for this input
            raise ModelFailed(f"Region-of-interest model {roi.file} of {model_id!r} failed: {exc}") from exc
        if not np.all(np.isfinite(output)):
            raise ModelFailed(f"Region-of-interest model {roi.file} of {model_id!r} returned NaN or infinite values.")
        return output.astype(np.float32, copy=False)

    return predict


def _segment(
    images: np.ndarray, package: ModelPackage, runner: InferenceRunner, patch: Sequence[int] | None
) -> np.ndarray:
    """Labels of ``(L, *spatial)`` images on the model grid: argmax of the scores, or a threshold.

    With ``postprocess.threshold`` only the probability of one channel is kept from each patch, so
    the blended map is one channel rather than all of them.
    """
    manifest = package.manifest
    settings, post = manifest.preprocess, manifest.postprocess
    if post.threshold is None:
        n_classes = max(label.value for label in manifest.labels) + 1
        predict = _checked_predict(runner, package, n_classes, spatial_output=True)
    else:
        n_classes = 1
        raw = _checked_predict(runner, package, None, spatial_output=True, min_classes=post.channel + 1)

        def predict(batch: np.ndarray) -> np.ndarray:
            return channel_probability(raw(batch), post, class_axis=1)

    def decide(scores: np.ndarray) -> np.ndarray:
        if post.threshold is None:
            return label_map_from_scores(scores, class_axis=1)
        return threshold_labels(scores, post.threshold, class_axis=1)

    if patch is None:
        # The whole image at once: each batch's scores are exactly the output (one window, plain
        # weights), so they become labels straight away. A score map of every image is never built:
        # for a 200-slice CT it is 300 MB, and weighting it and taking its argmax cost 1.5 s.
        size = settings.batch_size
        starts = range(0, images.shape[0], size)
        batches = (np.ascontiguousarray(images[i : i + size, np.newaxis], dtype=np.float32) for i in starts)
        return np.concatenate([decide(predict(batch).astype(np.float32, copy=False)) for batch in batches])
    return decide(sliding_window(images, patch, settings.overlap, settings.batch_size, predict, n_classes))


def infer(
    volume: Volume, package: ModelPackage, runner: InferenceRunner, timer: StageTimer | None = None
) -> InferenceOutput:
    """Run ``package`` on ``volume`` as its manifest says.

    Parameters
    ----------
    volume : Volume
        The source volume (modality units).
    package : ModelPackage
        The model and its manifest.
    runner : InferenceRunner
        Runs the network (ONNX Runtime in production).
    timer : StageTimer | None
        Receives the seconds of ``preprocess``, ``onnx`` (the runner's calls) and ``postprocess``
        (see :mod:`workers.stages`); the result is the same with or without it.

    Returns
    -------
    InferenceOutput
        ``label_map`` on the source grid for segmentation, ``probabilities`` for classification.

    Raises
    ------
    InvalidInput
        The volume does not fit the manifest's ``accepts``.
    ModelFailed
        The runner failed, the output has the wrong shape (e.g. a class count that differs from
        the manifest) or non-finite values, the manifest's preprocessing does not fit the
        model's dimensionality, or its region-of-interest model found nothing to crop (or the
        runner cannot run that model: it needs :class:`~workers.runtime.RegionRunner`).
    """
    timer = timer if timer is not None else StageTimer()
    runner = timed(runner, timer)
    with timer.stage("preprocess"):
        prepared, images = _prepare(volume, package, runner)
    with timer.stage("postprocess"):  # all but the runner's calls, which count as "onnx"
        return _run_and_postprocess(images, prepared, package, runner)


def _prepare(volume: Volume, package: ModelPackage, runner: InferenceRunner) -> tuple[PreparedInput, np.ndarray]:
    """The checked, preprocessed volume and the model's images: ``(1, *volume)`` for 3-D, the slices for 2-D."""
    manifest = package.manifest
    check_accepts(volume, manifest)
    dimensionality = manifest.accepts.dimensionality
    settings = manifest.preprocess
    try:
        prepared = prepare(volume, settings, dimensionality, _roi_predict(runner, package))
    except ValueError as exc:
        raise ModelFailed(f"Manifest of {manifest.id!r}: {exc}") from exc
    # A 3-D model sees one image (the volume); a 2-D model sees each slice as an image.
    return prepared, prepared.array[np.newaxis] if dimensionality == 3 else prepared.array


def _run_and_postprocess(
    images: np.ndarray, prepared: PreparedInput, package: ModelPackage, runner: InferenceRunner
) -> InferenceOutput:
    """The network on ``images`` and its output turned into labels on the source grid or probabilities."""
    manifest = package.manifest
    dimensionality = manifest.accepts.dimensionality
    settings = manifest.preprocess
    spatial = images.shape[1:]

    if manifest.task == "segmentation":
        patch = settings.patch_size
        if patch is not None and len(patch) != len(spatial):
            raise ModelFailed(f'Manifest of {manifest.id!r}: "patch_size" should have {len(spatial)} values.')
        labels = _segment(images, package, runner, patch)
        grid_labels = labels[0] if dimensionality == 3 else labels
        label_map = clean_labels(labels_to_source(grid_labels, prepared), manifest.postprocess)
        return InferenceOutput(label_map=label_map, probabilities=None)

    if settings.patch_size is not None:
        raise ModelFailed(f'Manifest of {manifest.id!r}: "patch_size" is only meaningful for segmentation.')
    predict = _checked_predict(runner, package, len(manifest.classes), spatial_output=False)
    logits = predict(np.ascontiguousarray(images[:1, np.newaxis], dtype=np.float32))
    try:
        probabilities = classification_probabilities(logits, manifest.postprocess.activation)
    except ValueError as exc:
        raise ModelFailed(f"Model {manifest.id!r}: {exc}") from exc
    return InferenceOutput(label_map=None, probabilities=probabilities)
