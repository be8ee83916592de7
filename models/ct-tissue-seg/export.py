"""Build, export and verify the ``ct-tissue-seg`` rule-based CT tissue model.

Run from the repository root with the ``export`` extra installed (torch 2.13.0, onnx)::

    python models/ct-tissue-seg/export.py

Nothing here is learned. :class:`TissueRules` is a small torch module made only of fixed operations
(comparisons with Hounsfield-unit thresholds, max-pooling for morphology, products of masks); it is
written in torch rather than numpy so that the same rules run inside the worker as an ordinary ONNX
graph, through the same preprocessing, sliding-window and SEG/SR code as a trained network. The
script writes ``model.onnx`` and ``manifest.json`` (with the ONNX file's SHA-256) next to itself and
prints the largest difference between PyTorch and ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from infergate.manifest import ModelManifest

HERE = Path(__file__).resolve().parent
MODEL_ID = HERE.name
VERSION = "2.0.0"

# Intensities ------------------------------------------------------------------------------------------------
#: The manifest's window maps -1000..2000 HU onto 0..1. Everything below -1000 HU (the -2048 or -3024 HU
#: many scanners store outside the reconstruction circle) becomes -1000, i.e. plain air.
WINDOW_LOW_HU, WINDOW_HIGH_HU = -1000.0, 2000.0
#: Below this a voxel is air for the body outline (near the midpoint of air, -1000, and fat, about -100).
AIR_MAX_HU = -500.0
#: Inside the body, below this is "Lung": aerated lung (about -900 to -600), airways, and other enclosed gas.
#: It sits near the midpoint between lung (-800) and soft tissue (40), so partial-volume edges split evenly.
LUNG_MAX_HU = -400.0
#: Adipose tissue, -190 to -30 HU: the range CT body-composition studies commonly use.
FAT_MIN_HU, FAT_MAX_HU = -190.0, -30.0
#: At and above this a voxel is "Bone": cortical and dense cancellous bone, but also iodinated contrast,
#: calcification and metal, which rules on HU alone cannot tell apart.
BONE_MIN_HU = 250.0

# Geometry and morphology (in voxels of the model grid) ------------------------------------------------------
#: In-plane spacing (mm) the worker resamples each slice to; 512 x 512 at 0.8 mm becomes 273 x 273.
TARGET_SPACING_MM = 1.5
#: Steps of geodesic dilation that flood the outside air from the image edge. Each step advances one voxel
#: (8-connected), so the fill is exact when every outside-air voxel is within 160 steps (240 mm) of the edge
#: along an air path; for air further away (a deep, narrow pocket) the body outline is too large.
FILL_STEPS = 160
#: Side of the square that opens non-air before the fill: removes structures at most 2 voxels (3 mm) thick -
#: table shells, head-holder straps, tubes, clothing - so that air they enclose is reached by the fill.
OUTLINE_OPENING = 3
#: A region counts as body only if a 13-voxel square (19.5 mm) fits inside it somewhere, or it is connected
#: to such a core: removes thicker table parts and other objects beside the patient.
CORE_SQUARE = 13
#: Geodesic dilation steps that grow the body back from those cores (60 mm: limbs, nose and ears attached
#: to the core by up to that distance are kept).
RECONSTRUCTION_STEPS = 40
#: Lung clean-up: opening and closing with a 3-voxel square drop gas pockets under 4.5 mm and fill vessels
#: and fissures up to about 3 mm, so that "Lung" is the organ's region rather than only its aerated voxels.
LUNG_CLEANUP = 3
#: Fat (opening and closing) and bone (opening only) clean-up with a 2-voxel square: drops single voxels and
#: one-voxel lines that noise or partial volume push across a threshold (e.g. the fat-range rim where lung
#: meets soft tissue), fills pinholes in fat, and keeps any fat plane or bone at least 3 mm thick.
TISSUE_CLEANUP = 2

CLASS_NAMES = ("background", "Soft tissue", "Fat", "Lung", "Bone")


def hu_to_unit(hu: float) -> float:
    """A HU value after the manifest's window, i.e. in the network's input units.

    Thresholds are converted once here, so that the graph compares its input with constants and
    does no arithmetic on it: ONNX Runtime and PyTorch then agree exactly, voxel for voxel.
    """
    return (hu - WINDOW_LOW_HU) / (WINDOW_HIGH_HU - WINDOW_LOW_HU)


def _square_pool(mask: torch.Tensor, size: int, pool: str) -> torch.Tensor:
    """Max- or mean-pool over a ``size``-voxel square around each voxel; same output size as ``mask``.

    Odd squares are centred. Even squares cannot be: the window of voxel ``i`` is ``i + B`` for
    erosion (mean) and ``i - B`` for dilation (max), with ``B = {0, 1}`` per axis for ``size`` 2,
    which is what opening and closing by the same square need. Squares above 3 are done as a row
    then a column pass, the same square at a fraction of the cost. Max-pooling pads with -inf
    (neutral, as masks are non-negative); mean-pooling counts the padding as zeros
    (``count_include_pad``), i.e. as voxels outside the mask.
    """
    half = size // 2
    if size <= 3:
        passes = [((size, size), (half, half))]
    else:
        passes = [((1, size), (0, half)), ((size, 1), (half, 0))]
    for kernel, padding in passes:
        if pool == "max":
            mask = F.max_pool2d(mask, kernel, stride=1, padding=padding)
        else:
            mask = F.avg_pool2d(mask, kernel, stride=1, padding=padding, count_include_pad=True)
    if size % 2 == 0:  # one extra row and column: keep the windows anchored as the docstring says
        mask = mask[..., 1:, 1:] if pool == "mean" else mask[..., :-1, :-1]
    return mask


def dilate(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Binary dilation by a ``size``-voxel square: max-pooling is dilation."""
    return _square_pool(mask, size, "max") if size > 1 else mask


def erode(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Binary erosion by a ``size``-voxel square; outside the image counts as not in the mask.

    A voxel stays when the mean over its square, padding included as zeros, is 1; so a region
    touching the image edge is eroded from that side too. Means of 0/1 values step by at least
    ``1 / size**2``, so comparing with ``1 - 0.5 / size**2`` is exact despite rounding.
    """
    if size <= 1:
        return mask
    return (_square_pool(mask, size, "mean") > 1.0 - 0.5 / size**2).float()


def opening(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Erosion then dilation: the union of all squares that fit in the mask; thinner parts vanish."""
    return dilate(erode(mask, size), size)


def closing(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Dilation then erosion: fills holes and gaps narrower than the square; convex shapes are unchanged."""
    return erode(dilate(mask, size), size)


def geodesic_dilation(marker: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Grow ``marker`` inside ``mask`` by one voxel (8-connected) per step, ``steps`` times.

    This is flood fill (morphological reconstruction) with a fixed number of steps, since ONNX has no
    connected-component operator: it equals the exact fill once ``steps`` exceeds the longest path
    needed.
    """
    for _ in range(steps):
        marker = F.max_pool2d(marker, 3, stride=1, padding=1) * mask
    return marker


class TissueRules(nn.Module):
    """Label CT slices as background, soft tissue, fat, lung or bone by HU thresholds and morphology.

    Input ``(N, 1, H, W)``: windowed CT slices (:func:`hu_to_unit`). Output ``(N, 5, H, W)``: one-hot
    scores for background and the four labels, so the worker's ``argmax`` picks exactly the rule's
    class. Steps, per slice:

    1. non-air (>= ``AIR_MAX_HU``), opened to drop thin non-patient objects;
    2. outside air: the remaining air flooded from the image edge (:func:`geodesic_dilation`);
    3. body: everything else, restricted to regions with a ``CORE_SQUARE`` core (or attached to one);
    4. inside the body: lung (< ``LUNG_MAX_HU``), bone (>= ``BONE_MIN_HU``) and fat (``FAT_MIN_HU``
       to ``FAT_MAX_HU``), each cleaned by opening/closing, in that order of precedence; soft
       tissue is the rest of the body (skin, muscle, organs, fluid, brain, partial-volume edges).

    It works slice by slice on purpose: a 3-D fill seeded at the first and last slice would flow
    into the trachea and lungs wherever the scan starts or ends inside the chest, and through the
    nose and mouth into the airways.
    """

    def __init__(self) -> None:
        super().__init__()
        thresholds = {
            "air_max": hu_to_unit(AIR_MAX_HU),
            "lung_max": hu_to_unit(LUNG_MAX_HU),
            "fat_min": hu_to_unit(FAT_MIN_HU),
            "fat_max": hu_to_unit(FAT_MAX_HU),
            "bone_min": hu_to_unit(BONE_MIN_HU),
        }
        for name, value in thresholds.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))

    def _threshold(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        assert isinstance(value, torch.Tensor)
        return value

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """Mask of everything inside the patient outline (steps 1-3)."""
        air = 1.0 - opening((x >= self._threshold("air_max")).float(), OUTLINE_OPENING)
        edge = 1.0 - erode(torch.ones_like(x), 3)  # the outermost rows and columns
        outside = geodesic_dilation(edge * air, air, FILL_STEPS)
        enclosed = 1.0 - outside
        return geodesic_dilation(erode(enclosed, CORE_SQUARE), enclosed, RECONSTRUCTION_STEPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        body = self.body(x)
        low = (x < self._threshold("lung_max")).float() * body
        lung = closing(opening(low, LUNG_CLEANUP), LUNG_CLEANUP) * body
        dense = (x >= self._threshold("bone_min")).float() * body
        bone = opening(dense, TISSUE_CLEANUP) * (1.0 - lung)
        fatty = (x >= self._threshold("fat_min")).float() * (x < self._threshold("fat_max")).float() * body
        fat = closing(opening(fatty, TISSUE_CLEANUP), TISSUE_CLEANUP) * body * (1.0 - lung) * (1.0 - bone)
        soft = body * (1.0 - lung) * (1.0 - bone) * (1.0 - fat)
        return torch.cat([1.0 - body, soft, fat, lung, bone], dim=1)


def _code(value: str, meaning: str) -> dict[str, str]:
    return {"value": value, "scheme": "SCT", "meaning": meaning}


def manifest(sha256: str) -> dict[str, Any]:
    """The package manifest; codes and meanings as in pydicom's SNOMED CT concept dictionary."""
    tissue = _code("85756007", "Tissue")
    lung = _code("39607008", "Lung")
    width = WINDOW_HIGH_HU - WINDOW_LOW_HU
    return {
        "id": MODEL_ID,
        "version": VERSION,
        "name": "CT tissue segmentation (rule-based)",
        "description": (
            "Rule-based, not learned: labels each CT slice's body (inside the outline of the patient) as "
            f"lung (< {LUNG_MAX_HU:.0f} HU), fat ({FAT_MIN_HU:.0f} to {FAT_MAX_HU:.0f} HU), bone "
            f"(>= {BONE_MIN_HU:.0f} HU) or soft tissue (the rest), with morphological clean-up. "
            "Demonstration and research only; not for clinical use."
        ),
        "task": "segmentation",
        "file": "model.onnx",
        "sha256": sha256,
        "input_name": "input",
        "output_name": "output",
        "accepts": {"modalities": ["CT"], "dimensionality": 2, "min_slices": 1},
        "preprocess": {
            "target_spacing": [TARGET_SPACING_MM, TARGET_SPACING_MM],
            "interpolation": "linear",
            "intensity": "window",
            "window": {"center": WINDOW_LOW_HU + width / 2.0, "width": width},
            "batch_size": 1,
        },
        "postprocess": {"activation": "none"},
        "labels": [
            {
                "value": 1,
                "name": "Soft tissue",
                "category": tissue,
                "type": _code("87784001", "Soft tissue"),
                "color": [230, 160, 120],
            },
            {
                "value": 2,
                "name": "Fat",
                "category": tissue,
                "type": _code("55603005", "Fat"),
                "color": [250, 220, 90],
            },
            {
                "value": 3,
                "name": "Lung",
                "category": _code("91723000", "Anatomical Structure"),
                "type": lung,
                "anatomic_region": lung,
                "color": [120, 180, 240],
            },
            {
                "value": 4,
                "name": "Bone",
                "category": tissue,
                "type": _code("272673000", "Bone"),
                "color": [240, 240, 210],
            },
        ],
        "volume_totals": [{"name": "Body", "labels": [1, 2, 3, 4], "type": _code("38266002", "Entire body")}],
        "measurements": ["volume"],
    }


def export(net: nn.Module, path: Path) -> None:
    """Write ``net`` as ONNX opset 17 with dynamic batch, height and width."""
    example = torch.full((1, 1, 48, 40), hu_to_unit(-1000.0))
    spatial = {0: "batch", 2: "height", 3: "width"}
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


def verification_input() -> torch.Tensor:
    """Two noisy slices of another shape than the export example: a body with fat, lungs and bone.

    Random noise alone would exercise the thresholds but not the fill and the clean-up, which only
    do something on connected shapes.
    """
    generator = torch.Generator().manual_seed(0)
    rows, columns = torch.meshgrid(torch.linspace(-1, 1, 120), torch.linspace(-1, 1, 150), indexing="ij")
    hu = torch.full((120, 150), -1000.0)
    body = (rows / 0.8) ** 2 + (columns / 0.9) ** 2 <= 1.0
    hu[body] = -100.0
    hu[(rows / 0.7) ** 2 + (columns / 0.8) ** 2 <= 1.0] = 40.0
    hu[((rows / 0.5) ** 2 + ((columns.abs() - 0.4) / 0.25) ** 2) <= 1.0] = -850.0
    hu[(rows - 0.55) ** 2 + columns**2 <= 0.1**2] = 700.0
    slices = hu.expand(2, 1, 120, 150) + 40.0 * torch.randn(2, 1, 120, 150, generator=generator)
    return ((slices - WINDOW_LOW_HU) / (WINDOW_HIGH_HU - WINDOW_LOW_HU)).clamp(0.0, 1.0)


def verify(net: nn.Module, path: Path) -> float:
    """Largest |torch - onnxruntime| on :func:`verification_input` (also tests the dynamic axes)."""
    sample = verification_input()
    with torch.no_grad():
        expected = net(sample).numpy()
    if not all((expected[:, k] > 0).any() for k in range(len(CLASS_NAMES))):
        raise SystemExit("the verification input should contain every class")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["output"], {"input": sample.numpy()})
    if actual.shape != expected.shape:
        raise SystemExit(f"ONNX output shape {actual.shape} differs from torch {expected.shape}")
    return float(np.max(np.abs(actual - expected)))


def main() -> None:
    net = TissueRules().eval()
    onnx_path = HERE / "model.onnx"
    export(net, onnx_path)
    difference = verify(net, onnx_path)
    print(f"{MODEL_ID}: max |torch - onnxruntime| = {difference:.3g}")
    if difference > 0.0:
        raise SystemExit("ONNX Runtime disagrees with torch")
    sha256 = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    content = manifest(sha256)
    ModelManifest.model_validate(content)  # refuse to write a manifest the worker would reject
    (HERE / "manifest.json").write_text(json.dumps(content, indent=2) + "\n")
    size = onnx_path.stat().st_size
    print(f"{MODEL_ID}: wrote {onnx_path.name} ({size} bytes, sha256 {sha256})")


if __name__ == "__main__":
    main()
