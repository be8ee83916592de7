"""Build, export and verify the ``ct-tissue-seg`` demonstration model.

Run from anywhere with the ``export`` extra installed (torch 2.13.0, onnx)::

    python models/ct-tissue-seg/export.py

The network has no trained weights: they are set analytically so that it labels CT voxels by
Hounsfield thresholds and then smooths the labels. The script writes ``model.onnx`` and
``manifest.json`` (with the ONNX file's SHA-256) next to itself and prints the largest difference
between PyTorch and ONNX Runtime on a random input.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from infergate.manifest import ModelManifest

HERE = Path(__file__).resolve().parent
MODEL_ID = HERE.name
VERSION = "1.0.0"

#: Intensity window of the manifest: maps -1000..1800 HU onto 0..1.
WINDOW_CENTER_HU = 400.0
WINDOW_WIDTH_HU = 2800.0
#: Lowest HU counted as soft tissue (fat, muscle, organs, fluid lie above; lung and air below).
SOFT_TISSUE_MIN_HU = -200.0
#: Lowest HU counted as bone (cortical and most cancellous bone; also dense contrast and metal).
BONE_MIN_HU = 250.0
#: HU over which a threshold's logistic rises by a factor e; sharp next to the tissue contrasts.
LOGISTIC_SCALE_HU = 10.0


def hu_to_unit(hu: float) -> float:
    """A HU value after the manifest's window, i.e. in the network's input units."""
    return (hu - (WINDOW_CENTER_HU - WINDOW_WIDTH_HU / 2.0)) / WINDOW_WIDTH_HU


class TissueNet(nn.Module):
    """Thresholds (1x1x1 conv + sigmoid) -> class scores (1x1x1 conv) -> 3x3x3 mean filter.

    ``s1 = sigmoid((HU - soft_min)/scale)``, ``s2 = sigmoid((HU - bone_min)/scale)``; the class
    scores are background ``1 - s1``, soft tissue ``s1 - s2`` and bone ``s2`` (they sum to one).
    The depthwise mean filter makes the argmax a majority vote over the 27-neighbourhood, which
    removes isolated noisy voxels; its zero padding scales all three channels of a border voxel
    alike, so the argmax there is unaffected.
    """

    def __init__(self) -> None:
        super().__init__()
        self.thresholds = nn.Conv3d(1, 2, kernel_size=1)
        self.classes = nn.Conv3d(2, 3, kernel_size=1)
        self.smooth = nn.Conv3d(3, 3, kernel_size=3, padding=1, groups=3, bias=False)
        gain = WINDOW_WIDTH_HU / LOGISTIC_SCALE_HU  # logistic slope per input unit
        assert self.thresholds.bias is not None and self.classes.bias is not None
        with torch.no_grad():
            self.thresholds.weight.copy_(torch.full((2, 1, 1, 1, 1), gain))
            self.thresholds.bias.copy_(
                torch.tensor([-gain * hu_to_unit(SOFT_TISSUE_MIN_HU), -gain * hu_to_unit(BONE_MIN_HU)])
            )
            mix = torch.tensor([[-1.0, 0.0], [1.0, -1.0], [0.0, 1.0]])  # rows: background, soft, bone
            self.classes.weight.copy_(mix.reshape(3, 2, 1, 1, 1))
            self.classes.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
            self.smooth.weight.fill_(1.0 / 27.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.smooth(self.classes(torch.sigmoid(self.thresholds(x))))


def manifest(sha256: str) -> dict[str, object]:
    tissue = {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"}
    return {
        "id": MODEL_ID,
        "version": VERSION,
        "name": "CT soft tissue and bone (demonstration)",
        "description": (
            "Demonstration model with analytically set weights: labels CT voxels as soft tissue "
            f"({SOFT_TISSUE_MIN_HU:.0f} to {BONE_MIN_HU:.0f} HU) or bone (above {BONE_MIN_HU:.0f} HU) "
            "after a 3x3x3 majority smoothing. Not for clinical use."
        ),
        "task": "segmentation",
        "file": "model.onnx",
        "sha256": sha256,
        "input_name": "input",
        "output_name": "output",
        "accepts": {"modalities": ["CT"], "dimensionality": 3, "min_slices": 8},
        "preprocess": {
            "target_spacing": [2.5, 2.0, 2.0],
            "intensity": "window",
            "window": {"center": WINDOW_CENTER_HU, "width": WINDOW_WIDTH_HU},
            "patch_size": [64, 128, 128],
            "overlap": 0.25,
            "batch_size": 1,
        },
        "labels": [
            {
                "value": 1,
                "name": "Soft tissue",
                "category": tissue,
                "type": {"value": "87784001", "scheme": "SCT", "meaning": "Soft tissue"},
                "color": [230, 160, 120],
            },
            {
                "value": 2,
                "name": "Bone",
                "category": tissue,
                "type": {"value": "272673000", "scheme": "SCT", "meaning": "Bone"},
                "color": [240, 240, 210],
            },
        ],
        "measurements": ["volume"],
    }


def export(net: nn.Module, path: Path) -> None:
    example = torch.rand(1, 1, 16, 32, 32)
    spatial = {0: "batch", 2: "depth", 3: "height", 4: "width"}
    # The TorchScript exporter is chosen on purpose (dynamic_axes, opset 17, no onnxscript needed).
    warnings.filterwarnings("ignore", ".*legacy TorchScript-based ONNX export", DeprecationWarning)
    torch.onnx.export(
        net,
        (example,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": spatial, "output": spatial},
    )


def verify(net: nn.Module, path: Path) -> float:
    """Largest |torch - onnxruntime| on a random input of another shape (tests the dynamic axes)."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.rand(2, 1, 20, 40, 36, generator=generator)
    with torch.no_grad():
        expected = net(sample).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["output"], {"input": sample.numpy()})
    if actual.shape != expected.shape:
        raise SystemExit(f"ONNX output shape {actual.shape} differs from torch {expected.shape}")
    return float(np.max(np.abs(actual - expected)))


def main() -> None:
    net = TissueNet().eval()
    onnx_path = HERE / "model.onnx"
    export(net, onnx_path)
    difference = verify(net, onnx_path)
    print(f"{MODEL_ID}: max |torch - onnxruntime| = {difference:.3g}")  # noqa: T201
    if difference > 1e-4:
        raise SystemExit("ONNX Runtime disagrees with torch")
    sha256 = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    content = manifest(sha256)
    ModelManifest.model_validate(content)  # refuse to write a manifest the worker would reject
    (HERE / "manifest.json").write_text(json.dumps(content, indent=2) + "\n")
    size = onnx_path.stat().st_size
    print(f"{MODEL_ID}: wrote {onnx_path.name} ({size} bytes, sha256 {sha256})")  # noqa: T201


if __name__ == "__main__":
    main()
