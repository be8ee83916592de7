"""Build, export and verify the ``cxr-demo-classifier`` demonstration model.

Run from anywhere with the ``export`` extra installed (torch 2.13.0, onnx)::

    python models/cxr-demo-classifier/export.py

The network has no trained weights (no chest radiographs with labels are available offline): they
are set analytically so that it measures how much darker the two lung bands of a frontal chest
radiograph are than the midline band (spine and mediastinum) and turns that contrast into two
logits. The script writes ``model.onnx`` and ``manifest.json`` (with the ONNX file's SHA-256) next
to itself and prints the largest difference between PyTorch and ONNX Runtime. The exported pooling is
rewritten as two reductions (:func:`zone_means_as_reductions`), which ONNX Runtime runs faster.
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

#: Input rows and columns: the radiograph is fitted into this square, keeping its aspect ratio.
SIZE = 256
#: Side of the square grid of zones the image is averaged over (16 x 16 zones of 16 x 16 pixels).
GRID = 16
#: Grid rows (top to bottom) holding the upper and middle lung zones of a frontal chest
#: radiograph: 12.5 % to 56.25 % of the height, below the apices and above the diaphragm.
ZONE_ROWS = range(2, 9)
#: Grid columns of the midline band (spine, trachea, mediastinum): 43.75 % to 56.25 % of the width.
MIDLINE_COLUMNS = range(7, 9)
#: Grid columns of the two lung bands: 18.75 % to 37.5 % and 62.5 % to 81.25 % of the width.
LUNG_COLUMNS = (*range(3, 6), *range(10, 13))
#: Midline-minus-lungs contrast (fraction of the display range) at which both classes are equally
#: likely: lungs displayed 10 % of the window darker than the midline.
CONTRAST_AT_DECISION = 0.10
#: Logit difference per unit of contrast: -3 at no contrast and +3 at twice the decision contrast,
#: i.e. probabilities 0.05 and 0.95, so that the probability still tells near-misses from clear cases.
LOGIT_SLOPE = 30.0


def zone_weights() -> torch.Tensor:
    """Weights over the ``GRID x GRID`` zone means whose sum is the midline-minus-lungs contrast.

    Midline zones get ``+1/n_midline`` and lung zones ``-1/n_lung``, so the weighted sum is the
    mean grey level of the midline band minus that of the lung bands (in [-1, 1] for inputs in
    [0, 1]); every other zone, including any padding added to keep the aspect ratio, gets 0.
    """
    weights = torch.zeros(GRID, GRID, dtype=torch.float64)
    rows = list(ZONE_ROWS)
    midline = torch.zeros(GRID, dtype=torch.bool)
    midline[list(MIDLINE_COLUMNS)] = True
    lungs = torch.zeros(GRID, dtype=torch.bool)
    lungs[list(LUNG_COLUMNS)] = True
    n_midline = len(rows) * int(midline.sum())
    n_lung = len(rows) * int(lungs.sum())
    for row in rows:
        weights[row, midline] = 1.0 / n_midline
        weights[row, lungs] = -1.0 / n_lung
    return weights.flatten().to(torch.float32)


class LungContrastNet(nn.Module):
    """Zone means (16 x 16 average pooling) -> two logits (one linear layer with fixed weights).

    With ``c`` the midline-minus-lungs contrast (:func:`zone_weights`), the logits are
    ``[-a (c - c0) / 2, +a (c - c0) / 2]``, so the softmax probability of class 1 ("radiolucent
    lung fields") is ``sigmoid(a (c - c0))``: exactly 0.5 at ``c = c0``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.zones = nn.AvgPool2d(kernel_size=SIZE // GRID)
        self.logits = nn.Linear(GRID * GRID, 2)
        half = LOGIT_SLOPE / 2.0
        contrast = zone_weights()
        with torch.no_grad():
            self.logits.weight.copy_(torch.stack([-half * contrast, half * contrast]))
            self.logits.bias.copy_(torch.tensor([half * CONTRAST_AT_DECISION, -half * CONTRAST_AT_DECISION]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(torch.flatten(self.zones(x), 1))


def synthetic_chest(lung: float, midline: float, background: float = 0.85) -> torch.Tensor:
    """A crude frontal chest pattern on the input grid: bright body, two lung bands, a midline band.

    Only for checking the export: the lung bands (grey ``lung``) and the midline (grey
    ``midline``) cover the zones the network weighs, with a soft edge so that the pooled zone means
    are not all exact multiples of a constant.
    """
    rows = torch.linspace(0.0, 1.0, SIZE).unsqueeze(1)
    columns = torch.linspace(0.0, 1.0, SIZE).unsqueeze(0)
    image = torch.full((SIZE, SIZE), background)
    in_rows = (rows > 0.1) & (rows < 0.62)
    left = in_rows & (columns > 0.15) & (columns < 0.41)
    right = in_rows & (columns > 0.59) & (columns < 0.85)
    image = torch.where(left | right, torch.tensor(lung), image)
    image = torch.where(in_rows & (columns > 0.43) & (columns < 0.57), torch.tensor(midline), image)
    return image + 0.02 * torch.sin(37.0 * rows) * torch.cos(23.0 * columns)


def manifest(sha256: str) -> dict[str, object]:
    return {
        "id": MODEL_ID,
        "version": VERSION,
        "name": "Chest radiograph lung-field lucency (demonstration)",
        "description": (
            "Demonstration model with analytically set weights, never trained: class 1 when the lung "
            "bands of a frontal chest radiograph are displayed, with the image's own VOI window, at "
            f"least {CONTRAST_AT_DECISION:.0%} of the window darker than the midline band (spine and "
            "mediastinum). Not for clinical use."
        ),
        "task": "classification",
        "file": "model.onnx",
        "sha256": sha256,
        "input_name": "input",
        "output_name": "output",
        "accepts": {"modalities": ["CR", "DX"], "dimensionality": 2, "body_parts": ["CHEST"]},
        "preprocess": {
            "target_shape": [SIZE, SIZE],
            "resize": "fit",
            "interpolation": "linear",
            "intensity": "voi",
            "batch_size": 1,
        },
        "classes": [
            {
                "index": 0,
                "name": "No radiolucent lung fields",
                "code": {"value": "260413007", "scheme": "SCT", "meaning": "None"},
            },
            {
                "index": 1,
                "name": "Radiolucent lung fields",
                "code": {"value": "112084", "scheme": "DCM", "meaning": "Lucency"},
            },
        ],
        "finding": {"value": "112005", "scheme": "DCM", "meaning": "Radiographic anatomy"},
        "threshold": 0.5,
        "positive_class": 1,
        "measurements": [],
    }


def zone_means_as_reductions(path: Path) -> None:
    """Rewrite the exported ``AveragePool`` over the zones as two reshapes and two ``ReduceMean`` nodes.

    The same means, taken in two steps: over the ``SIZE // GRID`` rows of each band of zones, then over
    the columns of each zone (float32 results differ from the pooled ones by rounding, about 1e-06 on the
    logits).
    ONNX Runtime's CPU ``AveragePool`` works through a one-channel image on one thread and took about 20
    of the model's 27 us per call (onnxruntime 1.32, 2 cores; torch's eager ``avg_pool2d`` uses both cores
    and ran the whole model in 21-24 us); with the reductions a call takes 9 us, of which about 8 us is
    the fixed cost of any ONNX Runtime call. See ``benchmarks/README.md``.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    (pool,) = [node for node in graph.node if node.op_type == "AveragePool"]
    attributes = {a.name: helper.get_attribute_value(a) for a in pool.attribute}
    zone = SIZE // GRID
    if list(attributes["kernel_shape"]) != [zone, zone] or list(attributes.get("strides", [])) != [zone, zone]:
        raise SystemExit(f"unexpected AveragePool {attributes}")
    (consumer,) = [node for node in graph.node if pool.output[0] in node.input]
    if consumer.op_type != "Flatten" or helper.get_attribute_value(consumer.attribute[0]) != 1:
        raise SystemExit("the pooled zones should go straight into Flatten(axis=1)")
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([-1, GRID, zone, SIZE], dtype=np.int64), "zones/band_shape"),
            numpy_helper.from_array(np.array([-1, GRID, GRID, zone], dtype=np.int64), "zones/zone_shape"),
        ]
    )
    replacement = [
        helper.make_node("Reshape", [pool.input[0], "zones/band_shape"], ["zones/bands"]),  # (N, GRID, zone, SIZE)
        helper.make_node("ReduceMean", ["zones/bands"], ["zones/band_means"], axes=[2], keepdims=0),
        helper.make_node("Reshape", ["zones/band_means", "zones/zone_shape"], ["zones/columns"]),
        helper.make_node("ReduceMean", ["zones/columns"], [pool.output[0]], axes=[3], keepdims=0),  # (N, GRID, GRID)
    ]
    nodes = []
    for node in graph.node:
        nodes.extend(replacement if node is pool else [node])
    del graph.node[:]
    graph.node.extend(nodes)
    stale = [v for v in graph.value_info if v.name == pool.output[0]]
    for value in stale:
        graph.value_info.remove(value)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def export(net: nn.Module, path: Path) -> None:
    example = synthetic_chest(0.5, 0.8).reshape(1, 1, SIZE, SIZE)
    # The TorchScript exporter is chosen on purpose (dynamic batch axis, opset 17, no onnxscript).
    warnings.filterwarnings("ignore", ".*legacy TorchScript-based ONNX export", DeprecationWarning)
    torch.onnx.export(
        net,
        (example,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )
    zone_means_as_reductions(path)


def verify(net: nn.Module, path: Path) -> float:
    """Largest |torch - onnxruntime| over a batch of another size (tests the dynamic batch axis).

    The batch holds random noise, a uniform grey image and synthetic chests with dark lungs,
    lungs near the decision contrast and inverted polarity, so logits of both signs are compared;
    the function also refuses weights that classify those synthetic chests the wrong way.
    """
    generator = torch.Generator().manual_seed(0)
    sample = torch.stack(
        [
            torch.rand(SIZE, SIZE, generator=generator),
            torch.full((SIZE, SIZE), 0.7),
            synthetic_chest(lung=0.45, midline=0.85),  # clearly lucent lungs
            synthetic_chest(lung=0.74, midline=0.86),  # contrast 0.12: just above the decision
            synthetic_chest(lung=0.55, midline=0.15, background=0.15),  # MONOCHROME1 left un-inverted
        ]
    ).unsqueeze(1)
    with torch.no_grad():
        expected = net(sample).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["output"], {"input": sample.numpy()})
    if actual.shape != expected.shape:
        raise SystemExit(f"ONNX output shape {actual.shape} differs from torch {expected.shape}")
    decisions = expected.argmax(axis=1).tolist()
    if decisions[1:] != [0, 1, 1, 0]:
        raise SystemExit(f"Synthetic checks classified as {decisions[1:]}, expected [0, 1, 1, 0]")
    difference = float(np.max(np.abs(actual - expected)))
    largest = float(np.max(np.abs(expected)))
    print(f"{MODEL_ID}: largest |logit| {largest:.2f}; relative difference {difference / largest:.2g}")  # noqa: T201
    return difference


def main() -> None:
    net = LungContrastNet().eval()
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
