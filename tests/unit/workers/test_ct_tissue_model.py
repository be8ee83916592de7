"""The shipped rule-based ``ct-tissue-seg`` model, run through the worker's own inference path.

It is checked three ways: against a synthetic series whose tissue volumes are known exactly
(:func:`tests.data.make_series.ct_phantom_volumes_ml`), against an exact flood fill computed with
scipy (the graph approximates it with a fixed number of max-pool steps), and on the real CT slices
that pydicom-data ships offline, where only plausible anatomy can be asserted.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from scipy import ndimage

from infergate.dicom.volume import Volume, load_volume
from infergate.manifest import ModelPackage, load_package
from tests.data.make_series import (
    TISSUE_NAMES,
    ct_phantom_tissues,
    ct_phantom_volumes_ml,
    write_ct_series,
)
from tests.unit.workers._fakes import MODELS_DIR
from workers.inference import infer
from workers.postprocess import segment_volumes_ml
from workers.preprocess import prepare
from workers.runtime import OnnxRunner

PACKAGE_DIR = MODELS_DIR / "ct-tissue-seg"
#: A realistic chest matrix: 512 x 512 at 0.8 mm (410 mm field of view), 2.5 mm slices; 20 slices keep it fast.
SLICES, SIZE, SLICE_SPACING, PIXEL_SPACING = 20, 512, 2.5, 0.8
SOFT, FAT, LUNG, BONE = 1, 2, 3, 4
#: The model's rules, as its model card states them (HU).
AIR_MAX_HU, CORE_SQUARE = -500.0, 13


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return load_package(PACKAGE_DIR)


@pytest.fixture(scope="module")
def runner() -> OnnxRunner:
    return OnnxRunner(["CPUExecutionProvider"], intra_op_threads=2)


@pytest.fixture(scope="module")
def phantom(
    tmp_path_factory: pytest.TempPathFactory, package: ModelPackage, runner: OnnxRunner
) -> tuple[Volume, np.ndarray]:
    info = write_ct_series(
        tmp_path_factory.mktemp("phantom"),
        slices=SLICES,
        size=SIZE,
        slice_spacing=SLICE_SPACING,
        pixel_spacing=PIXEL_SPACING,
        seed=11,
    )
    volume = load_volume([pydicom.dcmread(path) for path in info.paths])
    output = infer(volume, package, runner)
    assert output.label_map is not None
    return volume, output.label_map


def _real_slice(name: str) -> Volume:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} needs pydicom-data, which is not installed")
    return load_volume([pydicom.dcmread(path)])


def _labels(volume: Volume, package: ModelPackage, runner: OnnxRunner) -> np.ndarray:
    output = infer(volume, package, runner)
    assert output.label_map is not None and output.label_map.shape == volume.shape
    return output.label_map


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def test_manifest_describes_a_rule_based_slice_model_with_dictionary_codes(package: ModelPackage) -> None:
    manifest = package.manifest
    assert manifest.version == "2.0.0" and "not learned" in manifest.description.lower()
    assert (manifest.accepts.dimensionality, manifest.accepts.min_slices) == (2, 1)
    expected = {
        SOFT: ("Soft tissue", codes.SCT.Tissue, codes.SCT.SoftTissue),
        FAT: ("Fat", codes.SCT.Tissue, codes.SCT.AdiposeTissue),
        LUNG: ("Lung", codes.SCT.AnatomicalStructure, codes.SCT.Lung),
        BONE: ("Bone", codes.SCT.Tissue, codes.SCT.Bone),
    }
    assert {label.value for label in manifest.labels} == set(expected) == set(TISSUE_NAMES)
    for label in manifest.labels:
        name, category, segment_type = expected[label.value]
        assert label.name == name == TISSUE_NAMES[label.value]
        for code, reference in ((label.category, category), (label.type, segment_type)):
            assert (code.value, code.scheme, code.meaning) == (reference.value, "SCT", reference.meaning)
    lung = next(label for label in manifest.labels if label.value == LUNG)
    assert lung.anatomic_region is not None and lung.anatomic_region.value == codes.SCT.Lung.value
    (body,) = manifest.volume_totals
    assert body.name == "Body" and sorted(body.labels) == [SOFT, FAT, LUNG, BONE]
    assert (body.type.value, body.type.meaning) == (codes.SCT.EntireBody.value, codes.SCT.EntireBody.meaning)


def test_phantom_truth_is_exact() -> None:
    """The analytic volumes are the truth the model is scored against: the pixels must agree with them."""
    truth = ct_phantom_volumes_ml(SLICES, SIZE, SLICE_SPACING, PIXEL_SPACING)
    tissues = ct_phantom_tissues(SLICES, SIZE)
    voxel_ml = SLICE_SPACING * PIXEL_SPACING**2 / 1000.0
    for value, name in TISSUE_NAMES.items():
        assert np.count_nonzero(tissues == value) * voxel_ml == pytest.approx(truth[name], rel=2e-3), name
    assert truth["Body"] == pytest.approx(sum(truth[name] for name in TISSUE_NAMES.values()))
    assert np.count_nonzero(tissues) * voxel_ml == pytest.approx(truth["Body"], rel=1e-3)


@pytest.mark.parametrize("name", ["Soft tissue", "Fat", "Lung", "Bone", "Body"])
def test_phantom_volumes_within_two_percent(
    phantom: tuple[Volume, np.ndarray], package: ModelPackage, name: str
) -> None:
    volume, label_map = phantom
    volumes = segment_volumes_ml(label_map, volume.spacing, package.manifest.labels)
    totals = {total.name: total.labels for total in package.manifest.volume_totals}
    values = {label.name: [label.value] for label in package.manifest.labels} | totals
    measured = sum(volumes[value] for value in values[name])
    truth = ct_phantom_volumes_ml(SLICES, SIZE, SLICE_SPACING, PIXEL_SPACING)[name]
    assert measured == pytest.approx(truth, rel=0.02), f"{name}: {measured:.1f} mL, truth {truth:.1f} mL"


def test_phantom_labels_overlap_the_truth(phantom: tuple[Volume, np.ndarray]) -> None:
    _, label_map = phantom
    truth = ct_phantom_tissues(SLICES, SIZE)
    for value, name in TISSUE_NAMES.items():
        dice = _dice(label_map == value, truth == value)
        assert dice >= 0.95, f"{name}: Dice {dice:.3f}"
    assert _dice(label_map > 0, truth > 0) >= 0.99


def _exact_body(image: np.ndarray, air_max: float) -> np.ndarray:
    """The model's body rule with true connected components (scipy), on the model grid."""
    square = np.ones((3, 3), dtype=bool)
    dense = ndimage.binary_opening(image >= np.float32(air_max), structure=square, border_value=0)
    components, _ = ndimage.label(~dense, structure=square)
    edge = np.unique(np.concatenate([components[0], components[-1], components[:, 0], components[:, -1]]))
    enclosed = ~np.isin(components, edge[edge > 0])
    core = ndimage.binary_erosion(enclosed, structure=np.ones((CORE_SQUARE, CORE_SQUARE)), border_value=0)
    return ndimage.binary_propagation(core, structure=square, mask=enclosed)


@pytest.mark.parametrize("source", ["phantom", "693_UNCI.dcm", "explicit_VR-UN.dcm"])
def test_fixed_step_outline_equals_an_exact_flood_fill(
    source: str, phantom: tuple[Volume, np.ndarray], package: ModelPackage, runner: OnnxRunner
) -> None:
    volume = phantom[0] if source == "phantom" else _real_slice(source)
    prepared = prepare(volume, package.manifest.preprocess, 2)
    image = prepared.array[volume.shape[0] // 2]
    window = package.manifest.preprocess.window
    assert window is not None
    air_max = (AIR_MAX_HU - (window.center - window.width / 2.0)) / window.width
    scores = runner.run(package, image[np.newaxis, np.newaxis])
    assert scores.shape == (1, 5, *image.shape)
    assert set(np.unique(scores)) <= {0.0, 1.0} and np.all(scores.sum(axis=1) == 1.0)  # one-hot
    body = scores[0, 0] == 0.0
    np.testing.assert_array_equal(body, _exact_body(image, air_max))


def _outside_air(hu: np.ndarray) -> np.ndarray:
    """Source pixels of air connected to the image edge (exact, at full resolution)."""
    components, _ = ndimage.label(hu < AIR_MAX_HU, structure=np.ones((3, 3), dtype=bool))
    edge = np.unique(np.concatenate([components[0], components[-1], components[:, 0], components[:, -1]]))
    return np.isin(components, edge[edge > 0])


def _rays(label_map: np.ndarray, centre: tuple[int, int], count: int = 8) -> list[list[int]]:
    """Runs of labels met walking straight from ``centre`` to the image edge, in ``count`` directions."""
    rays = []
    for angle in np.linspace(0.0, 2.0 * np.pi, count, endpoint=False):
        steps = np.arange(max(label_map.shape))
        rows = np.rint(centre[0] - steps * np.sin(angle)).astype(int)
        columns = np.rint(centre[1] + steps * np.cos(angle)).astype(int)
        inside = (rows >= 0) & (rows < label_map.shape[0]) & (columns >= 0) & (columns < label_map.shape[1])
        values = label_map[rows[inside], columns[inside]]
        rays.append([int(v) for i, v in enumerate(values) if i == 0 or v != values[i - 1]])
    return rays


def test_real_head_slice_finds_skull_brain_and_outside(package: ModelPackage, runner: OnnxRunner) -> None:
    """pydicom-data's 512 x 512 head CT (one slice): brain inside a bone ring, air and head holder outside."""
    volume = _real_slice("693_UNCI.dcm")
    assert volume.shape == (1, 512, 512)  # a single image: accepted, no fake second slice needed
    label_map = _labels(volume, package, runner)[0]
    hu = volume.array[0]
    body = label_map > 0
    assert ndimage.label(body, structure=np.ones((3, 3)))[1] == 1
    assert 0.2 < body.mean() < 0.5
    # outside air (and the -3000 HU beyond the reconstruction circle) is background, but for edge voxels
    assert np.mean(body[_outside_air(hu)]) < 0.01
    assert np.count_nonzero((hu >= AIR_MAX_HU) & ~body) > 1000  # the head holder's straps are dropped
    bone_share = np.mean(label_map[body] == BONE)
    assert 0.1 < bone_share < 0.4 and np.mean(label_map[body] == LUNG) < 0.01
    assert hu[label_map == BONE].mean() > 400 and -30 < hu[label_map == SOFT].mean() < 80
    centre = tuple(int(round(c)) for c in ndimage.center_of_mass(body))
    row, column = centre
    brain = label_map[row - 20 : row + 21, column - 20 : column + 21]
    assert np.mean(brain == SOFT) > 0.95
    # walking outwards from the brain: soft tissue, then the skull, then (after the scalp) outside air
    rays = _rays(label_map, (row, column))
    crossing_skull = [ray for ray in rays if ray[0] == SOFT and BONE in ray and ray[-1] == 0]
    assert len(crossing_skull) >= 7, rays


def test_real_abdominal_slice_keeps_the_patient_and_drops_the_table(package: ModelPackage, runner: OnnxRunner) -> None:
    """pydicom's abdominal CT slice (``PANCREAS``, image upside down): fat, spine, bowel gas, and a table."""
    volume = _real_slice("explicit_VR-UN.dcm")
    assert volume.datasets[0].Modality == "CT"
    label_map = _labels(volume, package, runner)[0]
    hu = volume.array[0]
    body = label_map > 0
    assert ndimage.label(body, structure=np.ones((3, 3)))[1] == 1
    # the table's two curved shells lie in the first 100 rows (flipped image), the patient below them
    assert np.count_nonzero(hu[:100] >= AIR_MAX_HU) > 1000 and not body[:100].any()
    assert 0.2 < body.mean() < 0.5 and np.mean(body[_outside_air(hu)]) < 0.01
    shares = {value: np.mean(label_map[body] == value) for value in TISSUE_NAMES}
    assert 0.15 < shares[FAT] < 0.5  # subcutaneous and visceral fat
    assert 0.005 < shares[BONE] < 0.1  # vertebra and ribs (and contrast in the aorta)
    assert shares[LUNG] < 0.1  # no lung at this level; bowel gas is what the rule labels "Lung"
    assert shares[SOFT] > 0.4
    assert -130 < hu[label_map == FAT].mean() < -60 and hu[label_map == BONE].mean() > 300


def _export_module() -> ModuleType:
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("ct_tissue_seg_export", PACKAGE_DIR / "export.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_graph_equals_the_torch_rules(package: ModelPackage, runner: OnnxRunner) -> None:
    """The ONNX file is what ``export.py`` builds: identical outputs on a synthetic and a real slice."""
    import torch

    export = _export_module()
    net = export.TissueRules().eval()
    real = prepare(_real_slice("693_UNCI.dcm"), package.manifest.preprocess, 2).array[:, np.newaxis]
    for batch in (export.verification_input().numpy(), real):
        with torch.no_grad():
            expected = net(torch.from_numpy(np.ascontiguousarray(batch))).numpy()
        np.testing.assert_array_equal(runner.run(package, batch), expected)
    assert Path(package.onnx_path).stat().st_size < 1_000_000
