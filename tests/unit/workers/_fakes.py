"""Manifests and runners computing known functions, for testing the pipeline without ONNX files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from infergate.dicom.volume import Volume
from infergate.manifest import ModelManifest, ModelPackage

REPO_ROOT = Path(__file__).resolve().parents[3]
MODELS_DIR = REPO_ROOT / "models"

_TISSUE = {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"}


def segmentation_package(folder: Path, **preprocess: Any) -> ModelPackage:
    """A 3-class (background + 2 labels) CT segmentation package; ``preprocess`` overrides."""
    settings: dict[str, Any] = {"intensity": "none"}
    settings.update(preprocess)
    dimensionality = settings.pop("dimensionality", 3)
    manifest = ModelManifest.model_validate(
        {
            "id": "fake-seg",
            "version": "1",
            "name": "fake segmentation",
            "task": "segmentation",
            "sha256": "0" * 64,
            "accepts": {"modalities": ["CT"], "dimensionality": dimensionality, "min_slices": 2},
            "preprocess": settings,
            "labels": [
                {"value": 1, "name": "A", "category": _TISSUE, "type": _TISSUE},
                {"value": 2, "name": "B", "category": _TISSUE, "type": _TISSUE},
            ],
        }
    )
    return ModelPackage(manifest=manifest, folder=folder)


def classification_package(folder: Path, **preprocess: Any) -> ModelPackage:
    """A 2-class CT classification package; ``preprocess`` overrides."""
    settings: dict[str, Any] = {"intensity": "none"}
    settings.update(preprocess)
    code = {"value": "121071", "scheme": "DCM", "meaning": "Finding"}
    manifest = ModelManifest.model_validate(
        {
            "id": "fake-cls",
            "version": "1",
            "name": "fake classification",
            "task": "classification",
            "sha256": "0" * 64,
            "accepts": {"modalities": ["CT"], "dimensionality": 3, "min_slices": 2},
            "preprocess": settings,
            "classes": [{"index": 0, "name": "no", "code": code}, {"index": 1, "name": "yes", "code": code}],
            "finding": code,
            "threshold": 0.5,
            "positive_class": 1,
        }
    )
    return ModelPackage(manifest=manifest, folder=folder)


class PointwiseRunner:
    """Scores per voxel ``[x, 1 - x, x**2]``: no context, so patches must not change the result."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, ...]] = []

    def run(self, package: ModelPackage, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch.shape)
        return np.concatenate([batch, 1.0 - batch, batch**2], axis=1)


class MeanRunner:
    """Classification logits ``[-mean, +mean]`` of each input."""

    def run(self, package: ModelPackage, batch: np.ndarray) -> np.ndarray:
        mean = batch.reshape(batch.shape[0], -1).mean(axis=1)
        return np.stack([-mean, mean], axis=1)


class BrokenRunner:
    """Returns a fixed malformed output, or raises ``error``."""

    def __init__(self, output: np.ndarray | None = None, error: Exception | None = None) -> None:
        self.output, self.error = output, error

    def run(self, package: ModelPackage, batch: np.ndarray) -> np.ndarray:
        if self.error is not None:
            raise self.error
        assert self.output is not None
        return self.output


def volume_of(
    array: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), modality: str = "CT"
) -> Volume:
    """A Volume around ``array`` with minimal datasets (only Modality is read by ``infer``)."""
    from pydicom.dataset import Dataset

    datasets = []
    for _ in range(array.shape[0]):
        ds = Dataset()
        ds.Modality = modality
        datasets.append(ds)
    return Volume(
        array=np.asarray(array, dtype=np.float32),
        spacing=spacing,
        origin=(0.0, 0.0, 0.0),
        direction=np.eye(3),
        datasets=datasets,
    )
