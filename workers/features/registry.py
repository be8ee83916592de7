"""The registry of header feature extractors: a manifest's ``feature_extractor`` name -> a function.

Extractors register themselves with the :func:`feature_extractor` decorator (a registry like mercure's
``@handler_for``), so a new family of header models adds a module under :mod:`workers.features`, not a
branch in the pipeline. Names are versioned (``-v1``) because a trained model is tied to one encoding
for good: two encodings must never share a name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from infergate.errors import InvalidInput, ModelFailed

__all__ = [
    "FeatureFunction",
    "HeaderFeatureExtractor",
    "VolumeWeights",
    "equal_weights",
    "feature_extractor",
    "get_extractor",
    "registered_extractors",
    "require_datasets",
]

FeatureFunction = Callable[[Sequence[Dataset]], np.ndarray]
VolumeWeights = Callable[[np.ndarray], np.ndarray]


def equal_weights(features: np.ndarray) -> np.ndarray:
    """Every volume counts the same: the series gets the mean of its volumes' probabilities."""
    return np.ones(features.shape[0], dtype=np.float64)


@dataclass(frozen=True)
class HeaderFeatureExtractor:
    """A registered extractor: one series in, one row of features per volume out.

    Attributes
    ----------
    name : str
        The name manifests use in ``feature_extractor``.
    feature_names : tuple[str, ...]
        Column names, in the order the model expects them.
    function : Callable[[Sequence[pydicom.Dataset]], numpy.ndarray]
        Computes the ``(volumes, features)`` array of one series.
    volume_weights : Callable[[numpy.ndarray], numpy.ndarray]
        Weights ``(volumes,)`` from the features, for averaging volume probabilities into the
        series' answer (a series gets one); the model family knows which volumes characterise it.
    """

    name: str
    feature_names: tuple[str, ...]
    function: FeatureFunction
    volume_weights: VolumeWeights = equal_weights

    def __call__(self, datasets: Sequence[Dataset]) -> np.ndarray:
        """Features of one series as float32 ``(volumes, len(feature_names))``.

        Raises
        ------
        TypeError
            ``datasets`` is not a sequence of pydicom Datasets.
        InvalidInput
            The series is empty or lacks a header value the model cannot do without.
        """
        features = np.asarray(self.function(require_datasets(datasets)), dtype=np.float32)
        if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] != len(self.feature_names):
            raise ModelFailed(
                f"Feature extractor {self.name!r} returned shape {features.shape}; expected "
                f"(volumes, {len(self.feature_names)})."
            )
        return features


_REGISTRY: dict[str, HeaderFeatureExtractor] = {}


def require_datasets(datasets: Sequence[Dataset]) -> Sequence[Dataset]:
    """``datasets`` if it is a non-empty sequence of Datasets (one series).

    Raises
    ------
    TypeError
        Not a sequence of pydicom Datasets.
    InvalidInput
        An empty series.
    """
    if isinstance(datasets, Dataset) or not isinstance(datasets, Sequence):
        raise TypeError('Argument "datasets" should be a sequence of pydicom Datasets (one series).')
    if not all(isinstance(ds, Dataset) for ds in datasets):
        raise TypeError('Items of argument "datasets" should be pydicom Datasets.')
    if not datasets:
        raise InvalidInput('Argument "datasets" should hold at least one image.')
    return datasets


def feature_extractor(
    name: str, features: Sequence[str], *, volume_weights: VolumeWeights = equal_weights
) -> Callable[[FeatureFunction], FeatureFunction]:
    """Register the decorated function as the header feature extractor called ``name``.

    Parameters
    ----------
    name : str
        What a manifest's ``feature_extractor`` says; versioned (``-v1``) because a model is tied to
        one encoding for good.
    features : Sequence[str]
        The column names of the function's output, in order.
    volume_weights : Callable[[numpy.ndarray], numpy.ndarray]
        How much each volume counts in the series' answer (default: equally).

    Raises
    ------
    ValueError
        ``name`` is empty or already registered (two encodings must never share a name), or
        ``features`` is empty or repeats a name.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError('Argument "name" should be a non-empty string.')
    names = tuple(features)
    if not names or len(set(names)) != len(names):
        raise ValueError('Argument "features" should be non-empty names without repeats.')

    def register(function: FeatureFunction) -> FeatureFunction:
        if name in _REGISTRY:
            raise ValueError(f"A header feature extractor named {name!r} is already registered.")
        _REGISTRY[name] = HeaderFeatureExtractor(name, names, function, volume_weights)
        return function

    return register


def get_extractor(name: str) -> HeaderFeatureExtractor:
    """The extractor registered as ``name``.

    Raises
    ------
    ModelFailed
        No such extractor: the model package needs a newer worker, which is permanent for this job.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise ModelFailed(
            f"The manifest names header feature extractor {name!r}, which this worker does not have "
            f"(registered: {known})."
        ) from None


def registered_extractors() -> list[str]:
    """Names of the registered extractors, sorted."""
    return sorted(_REGISTRY)
