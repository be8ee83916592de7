"""Build, export and verify the ``ct-bone-classifier`` demonstration model.

Run from anywhere with the ``export`` extra installed (torch 2.13.0, onnx)::

    python models/ct-bone-classifier/export.py

The network has no trained weights: they are set analytically so that it measures the fraction of
the field of view denser than a bone threshold and turns it into two logits. The script writes
``model.onnx`` and ``manifest.json`` (with the ONNX file's SHA-256) next to itself and prints the
largest difference between PyTorch and ONNX Runtime on a random input.
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
#: A voxel at or above this HU counts as high-density (bone, dense contrast, metal).
HIGH_DENSITY_MIN_HU = 250.0
#: HU over which the voxel threshold's logistic rises by a factor e.
LOGISTIC_SCALE_HU = 10.0
#: Fraction of the resampled field of view that must be high-density for class 1 to win.
FRACTION_AT_DECISION = 0.005
#: Logit difference per unit of fraction: +-5 at 0 and at twice the decision fraction.
LOGIT_SLOPE = 1000.0


def hu_to_unit(hu: float) -> float:
    """A HU value after the manifest's window, i.e. in the network's input units."""
    return (hu - (WINDOW_CENTER_HU - WINDOW_WIDTH_HU / 2.0)) / WINDOW_WIDTH_HU


class HighDensityNet(nn.Module):
    """Voxel threshold (1x1x1 conv + sigmoid) -> global mean (fraction) -> two logits (linear).

    With ``f`` the fraction of voxels above the threshold, the logits are
    ``[-a (f - f0) / 2, +a (f - f0) / 2]``, so the softmax probability of class 1 is
    ``sigmoid(a (f - f0))``: exactly 0.5 at ``f = f0``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.threshold = nn.Conv3d(1, 1, kernel_size=1)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.logits = nn.Linear(1, 2)
        gain = WINDOW_WIDTH_HU / LOGISTIC_SCALE_HU
        half = LOGIT_SLOPE / 2.0
        assert self.threshold.bias is not None
        with torch.no_grad():
            self.threshold.weight.fill_(gain)
            self.threshold.bias.fill_(-gain * hu_to_unit(HIGH_DENSITY_MIN_HU))
            self.logits.weight.copy_(torch.tensor([[-half], [half]]))
            self.logits.bias.copy_(torch.tensor([half * FRACTION_AT_DECISION, -half * FRACTION_AT_DECISION]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fraction = self.pool(torch.sigmoid(self.threshold(x)))
        return self.logits(torch.flatten(fraction, 1))


def manifest(sha256: str) -> dict[str, object]:
    return {
        "id": MODEL_ID,
        "version": VERSION,
        "name": "CT high-density structure present (demonstration)",
        "description": (
            "Demonstration model with analytically set weights: class 1 when at least "
            f"{FRACTION_AT_DECISION:.1%} of the resampled field of view is above "
            f"{HIGH_DENSITY_MIN_HU:.0f} HU "
            "(bone, but also dense contrast or metal). Not for clinical use."
        ),
        "task": "classification",
        "file": "model.onnx",
        "sha256": sha256,
        "input_name": "input",
        "output_name": "output",
        "accepts": {"modalities": ["CT"], "dimensionality": 3, "min_slices": 8},
        "preprocess": {
            "target_shape": [32, 64, 64],
            "intensity": "window",
            "window": {"center": WINDOW_CENTER_HU, "width": WINDOW_WIDTH_HU},
            "batch_size": 1,
        },
        "classes": [
            {
                "index": 0,
                "name": "No high-density structure",
                "code": {"value": "260413007", "scheme": "SCT", "meaning": "None"},
            },
            {
                "index": 1,
                "name": "High-density structure present",
                "code": {"value": "272673000", "scheme": "SCT", "meaning": "Bone"},
            },
        ],
        "finding": {"value": "121071", "scheme": "DCM", "meaning": "Finding"},
        "threshold": 0.5,
        "positive_class": 1,
        "measurements": [],
    }


def threshold_as_batchnorm(path: Path) -> None:
    """Rewrite the exported ``Conv -> Sigmoid -> GlobalAveragePool`` for ONNX Runtime's fast kernels.

    The 1x1x1 convolution of one channel is the affine map ``gain * x + bias``; as a
    ``BatchNormalization`` with mean 0, variance 1 and epsilon 0 it is the same arithmetic in one pass
    (ONNX Runtime fused the convolution with the sigmoid into a ``FusedConv`` that took about two thirds of
    the model's 67 us per call; now a call takes about 50 us, onnxruntime 1.32, 2 cores). The global mean
    becomes a ``Reshape`` to ``(N, 1, voxels)`` and a ``ReduceMean``. See ``benchmarks/README.md``.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    ops = [node.op_type for node in graph.node]
    if ops != ["Conv", "Sigmoid", "GlobalAveragePool", "Flatten", "Gemm"]:
        raise SystemExit(f"unexpected graph {ops}")
    conv, sigmoid, pool = graph.node[0], graph.node[1], graph.node[2]
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    gain, bias = initializers[conv.input[1]].reshape(1), initializers[conv.input[2]].reshape(1)
    kept = [init for init in graph.initializer if init.name not in conv.input[1:]]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.extend(
        [
            numpy_helper.from_array(gain.astype(np.float32), "threshold/gain"),
            numpy_helper.from_array(bias.astype(np.float32), "threshold/bias"),
            numpy_helper.from_array(np.zeros(1, dtype=np.float32), "threshold/mean"),
            numpy_helper.from_array(np.ones(1, dtype=np.float32), "threshold/variance"),
            numpy_helper.from_array(np.array([0, 1, -1], dtype=np.int64), "threshold/flat_shape"),
        ]
    )
    inputs = [conv.input[0], "threshold/gain", "threshold/bias", "threshold/mean", "threshold/variance"]
    replacement = [
        helper.make_node("BatchNormalization", inputs, [conv.output[0]], epsilon=0.0),
        sigmoid,
        helper.make_node("Reshape", [sigmoid.output[0], "threshold/flat_shape"], ["threshold/flat"]),
        helper.make_node("ReduceMean", ["threshold/flat"], [pool.output[0]], axes=[2], keepdims=1),  # (N, 1, 1)
    ]
    rest = list(graph.node[3:])
    del graph.node[:]
    graph.node.extend(replacement + rest)
    del graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def export(net: nn.Module, path: Path) -> None:
    example = torch.rand(1, 1, 16, 32, 32)
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
        dynamic_axes={"input": {0: "batch", 2: "depth", 3: "height", 4: "width"}, "output": {0: "batch"}},
    )
    threshold_as_batchnorm(path)


def verify(net: nn.Module, path: Path) -> float:
    """Largest |torch - onnxruntime| on inputs of another shape (tests the dynamic axes).

    Half the batch is random in [0, 1]; the other half is mostly soft tissue with a dense block
    near the decision fraction, so the comparison covers logits of both signs.
    """
    generator = torch.Generator().manual_seed(0)
    sample = torch.rand(4, 1, 32, 64, 64, generator=generator)
    sample[2:] = hu_to_unit(40.0)
    sample[2, :, :4, :8, :8] = hu_to_unit(700.0)  # 0.2 % dense
    sample[3, :, :8, :16, :16] = hu_to_unit(700.0)  # 1.6 % dense
    with torch.no_grad():
        expected = net(sample).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["output"], {"input": sample.numpy()})
    if actual.shape != expected.shape:
        raise SystemExit(f"ONNX output shape {actual.shape} differs from torch {expected.shape}")
    difference = float(np.max(np.abs(actual - expected)))
    largest = float(np.max(np.abs(expected)))
    print(f"{MODEL_ID}: largest |logit| {largest:.1f}; relative difference {difference / largest:.2g}")  # noqa: T201
    return difference


def main() -> None:
    net = HighDensityNet().eval()
    onnx_path = HERE / "model.onnx"
    export(net, onnx_path)
    difference = verify(net, onnx_path)
    print(f"{MODEL_ID}: max |torch - onnxruntime| = {difference:.3g}")  # noqa: T201
    if difference > 1e-3:
        raise SystemExit("ONNX Runtime disagrees with torch")
    sha256 = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    content = manifest(sha256)
    ModelManifest.model_validate(content)  # refuse to write a manifest the worker would reject
    (HERE / "manifest.json").write_text(json.dumps(content, indent=2) + "\n")
    size = onnx_path.stat().st_size
    print(f"{MODEL_ID}: wrote {onnx_path.name} ({size} bytes, sha256 {sha256})")  # noqa: T201


if __name__ == "__main__":
    main()
