"""The 2-D radiograph path on synthetic CR/DX images: polarity, VOI, aspect-preserving resize, model.

Each synthetic image is built in memory with just the attributes the path reads, so that every
expected value can be computed by hand from the Standard: MONOCHROME1 displays its lowest value as
white (PS3.3 C.7.6.3.1.2), the linear VOI window of PS3.3 C.11.2.1.2.1, and a ``fit`` resize keeps
the physical aspect ratio (pixels times spacing). The real chest CR is in
``tests/integration/test_radiograph_pipeline.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation

from infergate.dicom.sr import ClassificationFinding, build_sr
from infergate.dicom.uids import derived_uid
from infergate.dicom.volume import Volume, load_volume
from infergate.errors import InvalidInput
from infergate.manifest import ModelPackage, Preprocess, load_package
from tests.helpers.dicom_validation import dciodvfy_errors, dsrdump
from tests.unit.dicom._synthetic import make_image, make_series
from tests.unit.workers._fakes import MODELS_DIR
from workers.inference import infer
from workers.preprocess import PreparedInput, prepare
from workers.runtime import OnnxRunner

MODEL_ID = "cxr-demo-classifier"
BITS = 12
TOP = 2**BITS - 1


def radiograph(
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = (2048.0, 4096.0),
    **attributes: Any,
) -> Dataset:
    """A 12-bit DX image without patient geometry holding ``stored``; ``attributes`` are set last."""
    ds = make_image(
        np.asarray(stored, dtype=np.uint16),
        modality="DX",
        position=None,
        orientation=None,
        pixel_spacing=None,
        slope=None,
        intercept=None,
        photometric=photometric,
    )
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.BitsStored, ds.HighBit = BITS, BITS - 1
    ds.BodyPartExamined = "CHEST"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """The VOI linear function (PS3.3 C.11.2.1.2.1) mapped onto [0, 1]."""
    return np.clip((np.asarray(x, dtype=np.float64) - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def prepared(ds: Dataset, **preprocess: Any) -> PreparedInput:
    """``prepare`` on a one-image volume; the grid defaults to the image's own shape (no resampling)."""
    settings: dict[str, Any] = {"target_shape": [int(ds.Rows), int(ds.Columns)], "intensity": "voi"}
    settings.update(preprocess)
    return prepare(load_volume([ds]), Preprocess.model_validate(settings), 2)


def ramp(rows: int = 8, columns: int = 16) -> np.ndarray:
    """Stored values rising along the columns from 0 to the top of the 12-bit range."""
    return np.tile(np.linspace(0, TOP, columns).round(), (rows, 1)).astype(np.uint16)


# --- polarity and VOI -------------------------------------------------------------------------


def test_monochrome1_is_inverted_so_that_denser_is_brighter() -> None:
    stored = ramp()
    m2 = prepared(radiograph(stored, photometric="MONOCHROME2")).array[0]
    m1 = prepared(radiograph(stored, photometric="MONOCHROME1")).array[0]
    # MONOCHROME2: the lowest stored value is displayed black; MONOCHROME1: it is displayed white.
    assert m2[0, 0] == pytest.approx(0.0, abs=1e-3) and m2[0, -1] == pytest.approx(1.0, abs=1e-3)
    assert m1[0, 0] == pytest.approx(1.0, abs=1e-3) and m1[0, -1] == pytest.approx(0.0, abs=1e-3)
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_voi_window_is_applied_where_the_image_defines_it(photometric: str) -> None:
    """An off-centre window on a MONOCHROME1 image must stay where the modality values put it.

    Applying Window Center to the loader's inverted values would shift it to ``TOP - center``;
    the window below is far from the middle of the range, so such a shift would be visible.
    """
    center, width = 1000.0, 800.0
    stored = ramp(columns=64)
    out = prepared(radiograph(stored, photometric=photometric, window=(center, width))).array[0]
    displayed = linear_window(stored, center, width)
    expected = displayed if photometric == "MONOCHROME2" else 1.0 - displayed
    np.testing.assert_allclose(out, expected, atol=2e-3)
    assert out.min() == pytest.approx(0.0) and out.max() == pytest.approx(1.0)


def test_voi_window_is_in_modality_units() -> None:
    """Window Center/Width apply after Rescale Slope/Intercept (PS3.4 N.2.1.1, the grayscale pipeline)."""
    stored = ramp(columns=64)
    ds = radiograph(stored, window=(3000.0, 2000.0), RescaleSlope="2", RescaleIntercept="-1000")
    out = prepared(ds).array[0]
    np.testing.assert_allclose(out, linear_window(2.0 * stored - 1000.0, 3000.0, 2000.0), atol=2e-3)


def test_voi_lut_sequence_wins_over_the_window() -> None:
    """A VOI LUT, when present, is what the modality chose for display (PS3.3 C.11.2.1.1)."""
    stored = ramp(columns=64)
    table = np.round(np.sqrt(np.arange(TOP + 1) / TOP) * TOP).astype(np.uint16)  # brightens the darks
    ds = radiograph(stored, window=(100.0, 50.0))  # a window that would clip nearly everything
    item = Dataset()
    item.LUTDescriptor = [TOP + 1, 0, BITS]
    item.LUTData = table.tolist()
    ds.VOILUTSequence = pydicom.Sequence([item])
    out = prepared(ds).array[0]
    np.testing.assert_allclose(out, table[stored] / TOP, atol=1e-6)


# --- pixel spacing of projection images ------------------------------------------------------


def test_zero_pixel_spacing_of_an_uncalibrated_plate_reads_as_absent() -> None:
    """Some CR readers write ``0\\0``; it means "unknown", like a missing attribute (tolerant reading)."""
    stored = ramp()
    assert load_volume([radiograph(stored, PixelSpacing=["0", "0"])]).spacing == (1.0, 1.0, 1.0)
    both = radiograph(stored, PixelSpacing=["0", "0"], ImagerPixelSpacing=["0.15", "0.2"])
    assert load_volume([both]).spacing == pytest.approx((1.0, 0.15, 0.2))
    with pytest.raises(InvalidInput, match="non-positive pixel spacing"):
        load_volume([radiograph(stored, PixelSpacing=["-0.1", "0.1"])])


# --- resize keeping the aspect ratio ----------------------------------------------------------


def _vertical_gradient(rows: int, columns: int) -> np.ndarray:
    return np.tile((1000 + 25 * np.arange(rows))[:, np.newaxis], (1, columns)).astype(np.uint16)


@pytest.mark.parametrize(
    ("shape", "content"),
    [((40, 80), (slice(16, 48), slice(0, 64))), ((80, 40), (slice(0, 64), slice(16, 48)))],
    ids=["landscape", "portrait"],
)
def test_fit_keeps_the_aspect_ratio_and_pads_evenly_with_the_minimum(
    shape: tuple[int, int], content: tuple[slice, slice]
) -> None:
    rows, columns = shape
    result = prepared(
        radiograph(_vertical_gradient(rows, columns), window=None),
        target_shape=[64, 64],
        resize="fit",
        intensity="none",
    )
    image = result.array[0]
    assert result.content is not None and tuple(result.content[1:]) == content
    inside = image[content]
    padding = np.ones(image.shape, dtype=bool)
    padding[content] = False
    assert inside.shape[0] / inside.shape[1] == pytest.approx(rows / columns)
    np.testing.assert_array_equal(image[padding], inside.min())  # padded with the darkest value
    np.testing.assert_allclose(inside.std(axis=1), 0.0, atol=1e-3)  # rows stay rows: no shear
    assert np.all(np.diff(inside[:, 0]) > 0)  # the gradient runs top to bottom, undistorted


def test_fit_uses_the_physical_aspect_ratio() -> None:
    """40 rows of 0.2 mm by 80 columns of 0.1 mm is a square: no padding at all."""
    ds = radiograph(_vertical_gradient(40, 80), window=None, ImagerPixelSpacing=[0.2, 0.1])
    result = prepared(ds, target_shape=[64, 64], resize="fit", intensity="none")
    assert result.content is None or tuple(result.content[1:]) == (slice(0, 64), slice(0, 64))
    assert result.array.shape == (1, 64, 64)


# --- the shipped demonstration model ---------------------------------------------------------


@pytest.fixture(scope="module")
def runner() -> OnnxRunner:
    return OnnxRunner(["CPUExecutionProvider"], intra_op_threads=2)


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return load_package(MODELS_DIR / MODEL_ID)


def chest(rows: int = 300, columns: int = 260) -> np.ndarray:
    """A crude frontal chest in MONOCHROME2 stored values: air, body, two lungs, mediastinum.

    Densities follow a radiograph: the lungs (air-filled) are dark, the spine and mediastinum
    bright, the soft tissue of the chest wall in between; the field is slightly portrait, like a
    35 x 43 cm cassette.
    """
    y, x = np.mgrid[0:rows, 0:columns]
    v, u = y / (rows - 1), x / (columns - 1)
    image = np.full((rows, columns), 300.0)  # air outside the body
    image[np.abs(u - 0.5) < 0.45] = 2600.0  # body and chest wall
    for centre in (0.29, 0.71):
        image[((u - centre) / 0.15) ** 2 + ((v - 0.38) / 0.3) ** 2 <= 1.0] = 1200.0  # lungs
    image[(np.abs(u - 0.5) < 0.08) & (v < 0.75)] = 3300.0  # spine and mediastinum
    image[v > 0.72] = np.maximum(image[v > 0.72], 2900.0)  # diaphragm and abdomen
    return image.round().astype(np.uint16)


def _probabilities(volume: Volume, package: ModelPackage, runner: OnnxRunner) -> np.ndarray:
    output = infer(volume, package, runner)
    assert output.probabilities is not None and output.probabilities.shape == (2,)
    assert output.probabilities.sum() == pytest.approx(1.0)
    return output.probabilities


def test_shipped_package_is_a_2d_radiograph_classifier(package: ModelPackage) -> None:
    manifest = package.manifest
    assert manifest.task == "classification" and manifest.accepts.dimensionality == 2
    assert set(manifest.accepts.modalities) == {"CR", "DX"}
    assert manifest.preprocess.intensity == "voi" and manifest.preprocess.resize == "fit"
    assert manifest.preprocess.target_shape == [256, 256]
    assert "demonstration" in manifest.name.lower() and "not for clinical use" in manifest.description.lower()
    assert manifest.positive_class == 1 and manifest.threshold == 0.5


def test_lucent_lungs_are_found_whatever_the_photometric_interpretation(
    package: ModelPackage, runner: OnnxRunner
) -> None:
    """The same anatomy stored as MONOCHROME1 (values and window reflected) gives the same answer."""
    stored = chest()
    m2 = _probabilities(load_volume([radiograph(stored)]), package, runner)
    reflected = radiograph(TOP - stored, photometric="MONOCHROME1", window=(TOP - 2048.0, 4096.0))
    m1 = _probabilities(load_volume([reflected]), package, runner)
    assert m2[1] > 0.95
    np.testing.assert_allclose(m1, m2, atol=1e-4)


@pytest.mark.parametrize(
    "case",
    ["uniform", "polarity-reversed"],
)
def test_no_lucent_lungs_without_the_pattern(package: ModelPackage, runner: OnnxRunner, case: str) -> None:
    """A featureless image, or a chest whose MONOCHROME1 inversion was skipped, is class 0."""
    stored = np.full((300, 260), 2600, np.uint16) if case == "uniform" else (TOP - chest()).astype(np.uint16)
    probabilities = _probabilities(load_volume([radiograph(stored)]), package, runner)
    assert probabilities[0] > 0.95


def test_non_radiographs_are_refused(package: ModelPackage, runner: OnnxRunner) -> None:
    volume = load_volume(make_series(np.zeros((1, 16, 16), np.float32), modality="CT"))
    with pytest.raises(InvalidInput, match="accepts modalities"):
        infer(volume, package, runner)


# --- the SR of a radiograph -------------------------------------------------------------------


def computed_radiograph(**attributes: Any) -> Dataset:
    """A CR with the patient and study attributes an SR copies; ``attributes`` are set last."""
    ds = radiograph(chest())
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.Modality = "CR"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Synthetic^Chest", "SYN0002", "", "O"
    ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = derived_uid("test-cr", "study"), "1", ""
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20240101", "120000", ""
    ds.SeriesInstanceUID, ds.SeriesNumber = derived_uid("test-cr", "series"), 1
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(derived_uid("test-cr", "instance"))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("attributes", "spacing_described"),
    [
        ({"PatientOrientation": ["L", "F"], "ImagerPixelSpacing": ["0.1", "0.1"]}, True),
        ({"PatientOrientation": ["L", "F"]}, False),  # Imager Pixel Spacing is optional in a CR
        ({"PatientOrientation": "", "ImagerPixelSpacing": ["0.1", "0.1"]}, False),  # Type 2C, empty
    ],
    ids=["calibrated", "no-imager-pixel-spacing", "empty-patient-orientation"],
)
def test_sr_of_a_computed_radiograph_is_valid(
    tmp_path: Path, package: ModelPackage, runner: OnnxRunner, attributes: dict[str, Any], spacing_described: bool
) -> None:
    """highdicom reads TID 1603's optional descriptors unconditionally; build_sr must not fail on a CR without them."""
    ds = computed_radiograph(**attributes)
    manifest = package.manifest
    output = infer(load_volume([ds]), package, runner)
    assert output.probabilities is not None
    findings = [ClassificationFinding(c, float(output.probabilities[c.index])) for c in manifest.classes]
    sr = build_sr(
        [ds],
        manifest,
        seg=None,
        measurements=[],
        findings=findings,
        series_instance_uid=derived_uid("test-cr", "sr-series"),
        sop_instance_uid=derived_uid("test-cr", "sr-instance"),
        series_number=9002,
    )
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    dump = dsrdump(path)
    assert '"Modality")=(CR,DCM,"Computed Radiography")' in dump
    assert ('"Horizontal Pixel Spacing")="0.1"' in dump) is spacing_described
