"""Header feature extractors for models that read DICOM headers instead of pixels.

Importing this package registers the built-in extractors; :func:`get_extractor` finds one by the
name a manifest gives in ``feature_extractor``.
"""

from workers.features import dcm_classifier
from workers.features.registry import (
    FeatureFunction,
    HeaderFeatureExtractor,
    VolumeWeights,
    equal_weights,
    feature_extractor,
    get_extractor,
    registered_extractors,
    require_datasets,
)

__all__ = [
    "FeatureFunction",
    "HeaderFeatureExtractor",
    "VolumeWeights",
    "dcm_classifier",
    "equal_weights",
    "feature_extractor",
    "get_extractor",
    "registered_extractors",
    "require_datasets",
]
