"""Export deepbet's brain-extraction networks to ONNX and write the ``brain-extraction`` package.

Run from anywhere with the ``export`` extra installed (torch 2.13.0, onnx, deepbet 1.0.2)::

    python models/brain-extraction/export.py

deepbet (Fisch et al., MIT licence) ships two TorchScript networks in its wheel: ``bbox_model.pt``, a
coarse 3D U-Net that finds the brain on a 128^3 version of the whole head, and ``model.pt``, which
segments the brain in the cropped box at 256^3. Both end with a softmax over two channels
(background, brain). This script exports both with the TorchScript-based exporter (``dynamo=False``,
opset 17) at fixed input shapes, rewrites their instance normalisations into numerically accurate
steps (:func:`precise_instance_norm`) and their final two-class softmax into a sigmoid that ONNX Runtime
runs far faster (:func:`two_class_softmax_as_sigmoid`), checks ONNX Runtime against TorchScript on the
same inputs (printing the largest absolute difference of each), and writes ``manifest.json`` with the
SHA-256 of both files.
The manifest's preprocessing reproduces deepbet's ``BrainExtraction.run_model`` (see
``workers/roi.py``).
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
import torch
from deepbet.utils import DATA_PATH

from infergate.manifest import ModelManifest

if TYPE_CHECKING:  # onnx is imported where it is used, so benchmarks/inference.py can use this module without it
    import onnx

HERE = Path(__file__).resolve().parent
MODEL_ID = HERE.name
VERSION = "1.0.2"  # deepbet's release whose weights these are
OPSET = 17

#: (TorchScript file in deepbet's wheel, ONNX file here, cubic input size)
NETWORKS = (("bbox_model.pt", "bbox_model.onnx", 128), ("model.pt", "model.onnx", 256))
#: deepbet's ``normalize``: clip to these percentiles of the coarse image, z-score, then 0.226 x + 0.449.
PERCENTILES = (0.5, 99.5)
SCALE, SHIFT = 0.226, 0.449


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def example_input(size: int, seed: int = 0) -> np.ndarray:
    """A deterministic head-like input in the networks' units: a bright ellipsoid in dark noise, normalised."""
    rng = np.random.default_rng(seed)
    axis = (np.arange(size, dtype=np.float32) - size / 2 + 0.5) / (size / 2)
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    head = ((x / 0.7) ** 2 + (y / 0.85) ** 2 + (z / 0.75) ** 2 <= 1.0).astype(np.float32)
    image = 0.6 * head + 0.1 * rng.random((size, size, size), dtype=np.float32)
    image = (image - image.mean()) / image.std()
    return (SCALE * image + SHIFT).astype(np.float32)[np.newaxis, np.newaxis]


def precise_instance_norm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every 3-D ``InstanceNormalization`` with the same arithmetic in accurate steps.

    ONNX Runtime's CPU kernel sums the 2 million voxels of one 128^3 channel in float32 with few
    accumulators: its mean and variance were off by about 1e-3 (PyTorch: 1e-6), and the error grew
    through the network to 0.13 in output probability. Here the mean is taken per slice first and
    then over slices (mean of means of equal groups, the same value), the variance likewise from the
    centred values: the difference to PyTorch fell to the float32 rounding level, and the network ran
    faster too. ``y = (x - mean) / sqrt(var + epsilon) * scale + bias``, as ONNX defines it.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {
        node.output[0]: numpy_helper.to_array(node.attribute[0].t) for node in graph.node if node.op_type == "Constant"
    }
    constants.update({init.name: numpy_helper.to_array(init) for init in graph.initializer})
    nodes = []
    for index, node in enumerate(graph.node):
        if node.op_type != "InstanceNormalization":
            nodes.append(node)
            continue
        x, scale, bias = node.input
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        p = f"precise_instance_norm_{index}/"
        channels = constants[scale].size
        graph.initializer.extend(
            [
                numpy_helper.from_array(constants[scale].reshape(1, channels, 1, 1, 1).astype(np.float32), p + "scale"),
                numpy_helper.from_array(constants[bias].reshape(1, channels, 1, 1, 1).astype(np.float32), p + "bias"),
                numpy_helper.from_array(np.array(epsilon, dtype=np.float32), p + "epsilon"),
            ]
        )
        nodes += [
            helper.make_node("ReduceMean", [x], [p + "slice_mean"], axes=[3, 4], keepdims=1),
            helper.make_node("ReduceMean", [p + "slice_mean"], [p + "mean"], axes=[2], keepdims=1),
            helper.make_node("Sub", [x, p + "mean"], [p + "centred"]),
            helper.make_node("Mul", [p + "centred", p + "centred"], [p + "squared"]),
            helper.make_node("ReduceMean", [p + "squared"], [p + "slice_var"], axes=[3, 4], keepdims=1),
            helper.make_node("ReduceMean", [p + "slice_var"], [p + "var"], axes=[2], keepdims=1),
            helper.make_node("Add", [p + "var", p + "epsilon"], [p + "var_eps"]),
            helper.make_node("Sqrt", [p + "var_eps"], [p + "std"]),
            helper.make_node("Div", [p + "centred", p + "std"], [p + "normalised"]),
            helper.make_node("Mul", [p + "normalised", p + "scale"], [p + "scaled"]),
            helper.make_node("Add", [p + "scaled", p + "bias"], list(node.output)),
        ]
    used = {name for node in nodes for name in node.input}
    kept = [node for node in nodes if node.op_type != "Constant" or node.output[0] in used]
    del graph.node[:]
    graph.node.extend(kept)
    onnx.checker.check_model(model)
    return model


def two_class_softmax_as_sigmoid(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace the final two-channel ``Softmax`` by a ``Sigmoid``, folding the channel difference into the layer before.

    For two classes ``softmax(z)_1 = sigmoid(z_1 - z_0)`` and ``softmax(z)_0 = sigmoid(z_0 - z_1)``, and the
    differences are linear in the weights of the (transposed) convolution that makes ``z``: it is given the
    weights ``w_0 - w_1`` and ``w_1 - w_0`` (biases likewise, differences taken in float64), and the
    ``Softmax`` becomes an element-wise ``Sigmoid``; the output is the same two probabilities up to
    rounding. ONNX Runtime's CPU ``Softmax`` over the channel axis of a ``(1, 2, 256, 256, 256)`` tensor
    moves the channels last and normalises 16.8 million rows of two values: it took 1.1 s of the
    network's 2.2 s (profiled with onnxruntime 1.32 on 2 cores), the ``Sigmoid`` takes 8 ms.
    """
    from onnx import numpy_helper

    graph = model.graph
    (softmax,) = [node for node in graph.node if node.op_type == "Softmax"]
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    (producer,) = [node for node in graph.node if softmax.input[0] in node.output]
    users = [node for node in graph.node if softmax.input[0] in node.input]
    groups = next((a.i for a in producer.attribute if a.name == "group"), 1)
    if axis != 1 or producer.op_type not in ("Conv", "ConvTranspose") or len(users) != 1 or groups != 1:
        raise SystemExit(f"unexpected {producer.op_type} -> Softmax(axis={axis}) with {len(users)} users")
    initializers = {init.name: init for init in graph.initializer}
    weight_name, bias_name = producer.input[1], producer.input[2]
    if sum(name in (weight_name, bias_name) for node in graph.node for name in node.input) != 2:
        raise SystemExit("the last layer's weights are shared with another node")
    weight = numpy_helper.to_array(initializers[weight_name]).astype(np.float64)
    bias = numpy_helper.to_array(initializers[bias_name]).astype(np.float64)
    channel_axis = 1 if producer.op_type == "ConvTranspose" else 0  # ConvTranspose: (C_in, C_out, k...)
    if weight.shape[channel_axis] != 2:
        raise SystemExit(f"the Softmax is over {weight.shape[channel_axis]} channels, not 2")
    w0, w1 = np.take(weight, 0, axis=channel_axis), np.take(weight, 1, axis=channel_axis)
    differences = np.stack([w0 - w1, w1 - w0], axis=channel_axis).astype(np.float32)
    initializers[weight_name].CopyFrom(numpy_helper.from_array(differences, weight_name))
    initializers[bias_name].CopyFrom(
        numpy_helper.from_array(np.array([bias[0] - bias[1], bias[1] - bias[0]], dtype=np.float32), bias_name)
    )
    softmax.op_type = "Sigmoid"
    del softmax.attribute[:]
    return model


def export(source: Path, target: Path, size: int) -> tuple[float, float, float]:
    """Export one network; returns (max abs difference, TorchScript seconds, ONNX Runtime seconds)."""
    import onnx

    model = torch.jit.load(str(source), map_location="cpu").eval()
    example = torch.from_numpy(example_input(size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's notes on ScriptModules
        torch.onnx.export(
            model,
            (example,),
            str(target),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["output"],
        )
    rewritten = two_class_softmax_as_sigmoid(precise_instance_norm(onnx.load(str(target))))
    onnx.checker.check_model(rewritten)
    onnx.save(rewritten, str(target))
    start = time.perf_counter()
    with torch.no_grad():
        reference = model(example).numpy()
    torch_seconds = time.perf_counter() - start
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    start = time.perf_counter()
    (output,) = session.run(["output"], {"input": example.numpy()})
    onnx_seconds = time.perf_counter() - start
    return float(np.max(np.abs(output - reference))), torch_seconds, onnx_seconds


def _code(value: str, meaning: str) -> dict[str, str]:
    return {"value": value, "scheme": "SCT", "meaning": meaning}


def manifest(model_sha256: str, bbox_sha256: str) -> dict[str, Any]:
    """The package manifest: deepbet's pipeline expressed in infergate's schema."""
    brain = _code("12738006", "Brain")
    return {
        "id": MODEL_ID,
        "version": VERSION,
        "name": "Brain extraction (deepbet)",
        "description": (
            "deepbet 1.0.2 (Fisch et al., MIT licence) exported to ONNX: brain mask of a T1-weighted head MR "
            "volume, found by a coarse 128^3 network and segmented in the cropped box at 256^3. "
            "Research use only; not for clinical use."
        ),
        "task": "segmentation",
        "file": "model.onnx",
        "sha256": model_sha256,
        "input_name": "input",
        "output_name": "output",
        "accepts": {"modalities": ["MR"], "dimensionality": 3, "min_slices": 20},
        "preprocess": {
            "orientation": "RAS",
            "roi": {
                "file": "bbox_model.onnx",
                "sha256": bbox_sha256,
                "input_name": "input",
                "output_name": "output",
                "shape": [128, 128, 128],
                "interpolation": "nearest",
                "channel": 1,
                "threshold": 0.5,
                "largest_component": True,
                "margin": 0.1,
            },
            "target_shape": [256, 256, 256],
            "interpolation": "nearest",
            "intensity": "percentile",
            "percentiles": list(PERCENTILES),
            "standardize": True,
            "scale": SCALE,
            "shift": SHIFT,
            "batch_size": 1,
        },
        "postprocess": {
            "activation": "softmax",
            "threshold": 0.5,
            "channel": 1,
            "largest_component": True,
            "fill_holes": True,
        },
        "labels": [
            {
                "value": 1,
                "name": "Brain",
                "category": _code("91723000", "Anatomical structure"),
                "type": brain,
                "anatomic_region": brain,
                "color": [255, 190, 120],
            }
        ],
        "measurements": ["volume"],
    }


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    hashes: dict[str, str] = {}
    for source_name, target_name, size in NETWORKS:
        source = Path(DATA_PATH) / "models" / source_name
        target = HERE / target_name
        difference, torch_seconds, onnx_seconds = export(source, target, size)
        hashes[target_name] = sha256(target)
        print(
            f"{target_name}: input 1x1x{size}^3, max |ONNX Runtime - TorchScript| = {difference:.2e} "
            f"(TorchScript {torch_seconds:.1f} s, ONNX Runtime {onnx_seconds:.1f} s)"
        )
    document = manifest(hashes["model.onnx"], hashes["bbox_model.onnx"])
    ModelManifest.model_validate(document)  # refuse to write a manifest the worker would refuse
    path = HERE / "manifest.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {path}")
    check_on_real_t1()


def check_on_real_t1() -> None:
    """Dice of the exported package, run through the worker's own path, on nilearn's real MNI T1.

    The template is written as a DICOM MR series (as the node would receive it) by the project's
    test-data script; needs the test dependency group (nilearn, nibabel).
    """
    import sys
    import tempfile

    import numpy as np
    from pydicom import dcmread

    sys.path.insert(0, str(HERE.parents[1]))
    from infergate.dicom.volume import load_volume
    from infergate.manifest import load_package
    from tests.data.make_mni_series import write_mni_series
    from workers.inference import infer
    from workers.runtime import OnnxRunner

    with tempfile.TemporaryDirectory() as folder:
        mni = write_mni_series(Path(folder))
        volume = load_volume([dcmread(p) for p in mni.info.paths])
    output = infer(volume, load_package(HERE), OnnxRunner(["CPUExecutionProvider"]))
    assert output.label_map is not None
    mask, reference = output.label_map.astype(bool), mni.reference_mask.astype(bool)
    dice = 2.0 * np.logical_and(mask, reference).sum() / (mask.sum() + reference.sum())
    print(f"Dice on the MNI152 2009a T1 (nilearn) against its brain mask: {dice:.4f} (needs >= 0.95)")


if __name__ == "__main__":
    main()
