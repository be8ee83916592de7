"""The shipped demonstration models, run through ONNX Runtime on a synthetic CT phantom."""

from __future__ import annotations

import numpy as np
import pytest

from infergate.dicom.volume import Volume, load_volume
from infergate.manifest import ModelPackage, load_package
from tests.unit.dicom._synthetic import ct_phantom, make_series
from tests.unit.workers._fakes import MODELS_DIR
from workers.inference import infer
from workers.postprocess import segment_volumes_ml
from workers.runtime import OnnxRunner


@pytest.fixture(scope="module")
def runner() -> OnnxRunner:
    return OnnxRunner(["CPUExecutionProvider"], intra_op_threads=2)


def _package(model_id: str) -> ModelPackage:
    return load_package(MODELS_DIR / model_id)


def _volume(**phantom: object) -> tuple[Volume, np.ndarray]:
    ph = ct_phantom(**phantom)  # type: ignore[arg-type]
    return load_volume(make_series(ph.hu, spacing=ph.spacing)), ph.labels


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def test_packages_load_with_verified_hashes() -> None:
    assert _package("ct-tissue-seg").manifest.task == "segmentation"
    assert _package("ct-bone-classifier").manifest.task == "classification"


def test_tissue_segmentation_matches_the_phantom(runner: OnnxRunner) -> None:
    volume, truth = _volume()
    package = _package("ct-tissue-seg")
    output = infer(volume, package, runner)
    assert output.label_map is not None
    assert output.label_map.shape == volume.shape and output.label_map.dtype == np.uint8
    values = {label.name: label.value for label in package.manifest.labels}
    for name, truth_value in (("Soft tissue", 1), ("Bone", 2)):  # the phantom has neither fat nor lungs
        dice = _dice(output.label_map == values[name], truth == truth_value)
        assert dice >= 0.9, f"{name}: Dice {dice:.3f}"
    volumes = segment_volumes_ml(output.label_map, volume.spacing, package.manifest.labels)
    bone_ml = np.pi * 20.0**2 * 100.0 / 1000.0  # 20 mm radius through 40 slices of 2.5 mm
    assert volumes[values["Bone"]] == pytest.approx(bone_ml, rel=0.1)


@pytest.mark.parametrize(("bone", "expected"), [(True, 1), (False, 0)], ids=["bone-cylinder", "water-only"])
def test_bone_classifier(runner: OnnxRunner, bone: bool, expected: int) -> None:
    volume, _ = _volume(bone=bone, tissue_hu=40.0 if bone else 0.0)
    package = _package("ct-bone-classifier")
    output = infer(volume, package, runner)
    assert output.probabilities is not None
    assert output.probabilities.shape == (2,)
    assert output.probabilities.sum() == pytest.approx(1.0)
    assert int(np.argmax(output.probabilities)) == expected
    assert package.manifest.threshold is not None
    assert (output.probabilities[1] >= package.manifest.threshold) == bool(expected)
