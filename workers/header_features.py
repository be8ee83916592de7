"""Running models that classify a series from its DICOM headers, not its pixels.

A manifest with ``"input": "header_features"`` names a ``feature_extractor`` registered in
:mod:`workers.features` (``@feature_extractor("dcm-classifier-v1", ...)``); the pipeline calls
:func:`classify_from_headers` for such a model instead of building a volume. dcm-classifier
(Brzus et al., SPIE Medical Imaging 2024), shipped as ``models/mr-series-type``, is the first: it
tells T1-, T2-, T2*-weighted, FLAIR and diffusion MR series apart from TE, TR, TI, flip angle,
Scanning Sequence, Image Type, b-value and a few more header values, which is enough to route series
to the models that expect them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from infergate.accepts import check_series
from infergate.errors import InfergateError, ModelFailed
from infergate.manifest import ModelPackage
from workers.features import (
    HeaderFeatureExtractor,
    feature_extractor,
    get_extractor,
    registered_extractors,
    require_datasets,
)
from workers.postprocess import softmax
from workers.runtime import InferenceRunner

__all__ = [
    "HeaderFeatureExtractor",
    "classify_from_headers",
    "feature_extractor",
    "get_extractor",
    "registered_extractors",
    "volume_probabilities",
]

log = logging.getLogger(__name__)


def _check_accepts(datasets: Sequence[Dataset], package: ModelPackage) -> None:
    check_series(datasets, package.manifest)


def volume_probabilities(datasets: Sequence[Dataset], package: ModelPackage, runner: InferenceRunner) -> np.ndarray:
    """Class probabilities of each volume of one series from a header-feature model.

    This is what :func:`classify_from_headers` combines; see there for the parameters and errors.

    Returns
    -------
    numpy.ndarray
        float64 ``(volumes, C)`` indexed like the manifest's ``classes``.
    """
    return _run(datasets, package, runner)[2]


def _run(
    datasets: Sequence[Dataset], package: ModelPackage, runner: InferenceRunner
) -> tuple[HeaderFeatureExtractor, np.ndarray, np.ndarray]:
    """(extractor, features, probabilities per volume), with every failure typed for the task's retry decision."""
    manifest = package.manifest
    if manifest.input != "header_features" or manifest.feature_extractor is None:
        raise ModelFailed(f'Model {manifest.id!r} does not take "header_features" input.')
    extractor = get_extractor(manifest.feature_extractor)
    _check_accepts(require_datasets(datasets), package)
    features = extractor(datasets)
    try:
        output = np.asarray(runner.run(package, features), dtype=np.float64)
    except InfergateError:
        raise
    except Exception as exc:  # any runtime failure is permanent for this input and model
        raise ModelFailed(f"Model {manifest.id!r} failed on header features {features.shape}: {exc}") from exc
    expected = (features.shape[0], len(manifest.classes))
    if output.shape != expected:
        raise ModelFailed(f"Model {manifest.id!r} returned shape {output.shape}; the manifest implies {expected}.")
    if not np.all(np.isfinite(output)):
        raise ModelFailed(f"Model {manifest.id!r} returned NaN or infinite values.")
    if manifest.postprocess.activation == "none":
        return extractor, features, softmax(output, axis=1)
    if np.any(output < -1e-6) or np.any(output > 1.0 + 1e-6):
        raise ModelFailed(f"Model {manifest.id!r} should output probabilities but returned values outside [0, 1].")
    return extractor, features, np.clip(output, 0.0, 1.0)


def classify_from_headers(datasets: Sequence[Dataset], package: ModelPackage, runner: InferenceRunner) -> np.ndarray:
    """Class probabilities of one series from a header-feature model (what the pipeline records).

    A series of one volume (the usual case) gets that volume's probabilities, exactly what
    dcm-classifier reports for it. A series gets one answer, so the probabilities of a multi-volume
    series (DWI b-values, multi-echo) are averaged with the extractor's ``volume_weights`` (for
    dcm-classifier: over the diffusion-weighted volumes of a DWI series, else over all volumes).

    Parameters
    ----------
    datasets : Sequence[pydicom.Dataset]
        Every image of the series (pixel data is not read).
    package : ModelPackage
        A classification package with ``"input": "header_features"``.
    runner : InferenceRunner
        Runs the model on the ``(volumes, features)`` float32 batch.

    Returns
    -------
    numpy.ndarray
        float64 ``(C,)`` indexed like the manifest's ``classes``. A graph whose output is already
        probabilities says so with ``postprocess.activation`` other than ``"none"``; otherwise the
        output is taken as logits and softmax is applied.

    Raises
    ------
    InvalidInput
        Wrong modality or image count, or header values the extractor needs are missing.
    ModelFailed
        The package is not a header-feature model, names an unknown extractor, or the model fails
        or returns a malformed output.
    """
    extractor, features, probabilities = _run(datasets, package, runner)
    weights = np.asarray(extractor.volume_weights(features), dtype=np.float64)
    if weights.shape != (features.shape[0],) or np.any(weights < 0) or not weights.sum() > 0:
        raise ModelFailed(f"Feature extractor {extractor.name!r} gave unusable volume weights {weights}.")
    log.debug("model %s: %d volume(s), weights %s", package.manifest.id, len(weights), weights)
    return np.asarray(weights @ probabilities / weights.sum(), dtype=np.float64)
