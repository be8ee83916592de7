"""Brain extraction (deepbet exported to ONNX) through the worker's own path, on a real T1 brain.

The MNI152 2009a template that ships with nilearn is written as an axial DICOM MR series
(``tests/data/make_mni_series.py``), read back, and run with ONNX Runtime exactly as a job would run
it. The exported networks are compared with deepbet's TorchScript originals on the inputs the
pipeline really feeds them, the mask with nilearn's brain mask, and the whole cascade with deepbet's
own ``BrainExtraction``. torch and deepbet are in the test dependency group, never in the worker.
"""

from __future__ import annotations

import time
from pathlib import Path

import deepbet.bet as deepbet_bet  # the reference implementation (test dependency group)
import nibabel as nib
import numpy as np
import pytest
import torch
from pydicom import dcmread

from infergate.dicom.volume import Volume, load_volume
from infergate.manifest import ModelPackage, load_package
from tests.data.make_mni_series import MniSeries, mni_t1_path, write_mni_series
from workers.inference import infer
from workers.orientation import reorientation
from workers.postprocess import segment_volumes_ml
from workers.preprocess import prepare
from workers.runtime import OnnxRunner

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),  # deepbet ships TorchScript
]

PACKAGE = Path(__file__).resolve().parents[2] / "models" / "brain-extraction"
#: Largest |ONNX Runtime - TorchScript| output allowed (probabilities); measured 5e-5 and 5e-4.
ONNX_TOLERANCE = 5e-3
MIN_DICE = 0.95
#: Dice between this pipeline's mask and deepbet's own run of its TorchScript networks.
MIN_AGREEMENT = 0.999


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def mni(tmp_path_factory: pytest.TempPathFactory) -> MniSeries:
    return write_mni_series(tmp_path_factory.mktemp("mni"))


@pytest.fixture(scope="module")
def volume(mni: MniSeries) -> Volume:
    return load_volume([dcmread(path) for path in mni.info.paths])


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return load_package(PACKAGE)


@pytest.fixture(scope="module")
def runner() -> OnnxRunner:
    return OnnxRunner(["CPUExecutionProvider"])


def test_dicom_series_reoriented_to_ras_is_the_nifti_as_deepbet_loads_it(volume: Volume) -> None:
    canonical = nib.as_closest_canonical(nib.load(mni_t1_path())).get_fdata(dtype=np.float32)
    oriented = reorientation(volume.direction, "RAS").apply(volume.array)
    np.testing.assert_array_equal(oriented, canonical)


def test_onnx_matches_torchscript_on_the_pipelines_own_inputs(
    volume: Volume, package: ModelPackage, runner: OnnxRunner
) -> None:
    roi = package.manifest.preprocess.roi
    assert roi is not None
    inputs: dict[str, np.ndarray] = {}
    outputs: dict[str, np.ndarray] = {}

    def run_roi(batch: np.ndarray) -> np.ndarray:
        inputs["bbox_model.pt"] = batch
        outputs["bbox_model.pt"] = runner.run_file(package, roi, batch)
        return outputs["bbox_model.pt"]

    prepared = prepare(volume, package.manifest.preprocess, 3, run_roi)
    inputs["model.pt"] = np.ascontiguousarray(prepared.array[np.newaxis, np.newaxis])
    outputs["model.pt"] = runner.run(package, inputs["model.pt"])
    for name, batch in inputs.items():
        network = torch.jit.load(f"{deepbet_bet.DATA_PATH}/models/{name}", map_location="cpu").eval()
        with torch.no_grad():
            reference = network(torch.from_numpy(batch)).numpy()
        difference = float(np.max(np.abs(outputs[name] - reference)))
        print(f"{name}: input {batch.shape}, max |ONNX Runtime - TorchScript| = {difference:.2e}")  # noqa: T201
        assert difference < ONNX_TOLERANCE, name


def test_brain_mask_matches_the_reference_and_deepbet(
    mni: MniSeries, volume: Volume, package: ModelPackage, runner: OnnxRunner
) -> None:
    start = time.perf_counter()
    output = infer(volume, package, runner)
    seconds = time.perf_counter() - start
    assert output.label_map is not None and output.label_map.shape == volume.shape
    dice = _dice(output.label_map, mni.reference_mask)

    bet = deepbet_bet.BrainExtraction(no_gpu=True)
    canonical = nib.as_closest_canonical(nib.load(mni_t1_path())).get_fdata(dtype=np.float32)
    deepbet_mask = bet.postprocess(bet.run_model(canonical.copy()) > 0.5)
    agreement = _dice(reorientation(volume.direction, "RAS").apply(output.label_map), deepbet_mask)

    volume_ml = segment_volumes_ml(output.label_map, volume.spacing, package.manifest.labels)[1]
    reference_ml = float(mni.reference_mask.sum()) * float(np.prod(mni.spacing)) / 1000.0
    print(  # noqa: T201
        f"brain-extraction on MNI152 2009a: Dice {dice:.4f} vs nilearn's mask, {agreement:.5f} vs deepbet's "
        f"own run; {volume_ml:.0f} mL (reference {reference_ml:.0f} mL); infer {seconds:.1f} s"
    )
    assert dice >= MIN_DICE
    assert agreement >= MIN_AGREEMENT
    assert volume_ml == pytest.approx(reference_ml, rel=0.05)
