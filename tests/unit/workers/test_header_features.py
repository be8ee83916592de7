"""Header feature extraction and header-model inference, checked against dcm-classifier's own pipeline.

The reference is dcm-classifier 0.9.9 itself (``ProcessOneDicomStudyToVolumesMappingBase`` with
``ImageTypeClassifierBase``), run on the same files: its features and its probabilities per volume must
equal ours. It is a test dependency only; the worker never imports it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.config
import pytest
from pydicom.dataset import Dataset

from infergate.errors import InvalidInput, ModelFailed
from infergate.manifest import ModelManifest, ModelPackage, load_package
from tests.data.make_series import Orientation, write_mr_series
from tests.data.mr_sequences import ACQUISITIONS, write_acquisition
from tests.unit.workers._fakes import MODELS_DIR
from workers.features.dcm_classifier import DCM_CLASSIFIER_FEATURES, MISSING, b_value, split_volumes
from workers.header_features import (
    classify_from_headers,
    feature_extractor,
    get_extractor,
    registered_extractors,
    volume_probabilities,
)
from workers.runtime import OnnxRunner, zipmap_to_array

pytestmark = pytest.mark.filterwarnings(
    "ignore:builtin type .* has no __module__ attribute:DeprecationWarning",  # ITK's SWIG bindings
    "ignore:(?s).*(Required DICOM fields|Missing features):UserWarning",  # dcm-classifier on the invalid series
)

#: dcm-classifier's labels in the order of its ONNX output (``imagetype_to_integer_mapping``).
REFERENCE_LABELS = ["t1w", "gret2star", "t2w", "flair", "b0", "tracew", "adc", "fa", "eadc", "dwig"]
#: What dcm-classifier calls each synthetic series, volume by volume.
EXPECTED = {
    "T1w_SE": ["t1w"],
    "T1w_MPRAGE": ["t1w"],
    "T2w_TSE": ["t2w"],
    "FLAIR": ["flair"],
    "T2starw_GRE": ["gret2star"],
    "DWI": ["b0", "tracew"],
    "DWI_trace": ["tracew"],
    "ADC": ["adc"],
    "FA": ["fa"],
    "eADC": ["eadc"],
    "DWI_GE": ["dwig"],
    "unknown_sequence": ["t1w"],
    "Dixon_fat": ["fa"],
    "empty_values": ["t1w"],
}
ORIENTATIONS: tuple[Orientation, ...] = ("axial", "coronal", "sagittal")
REAL_FILES = ["MR-SIEMENS-DICOM-WithOverlays.dcm", "MR_small.dcm", "MR2_UNCR.dcm"]


@dataclass
class ReferenceVolume:
    """dcm-classifier's result for one volume; ``features`` and ``probabilities`` are None if INVALID."""

    modality: str
    features: np.ndarray | None
    probabilities: np.ndarray | None


@pytest.fixture(scope="module")
def dcm_classifier() -> Iterator[Any]:
    """The reference package; importing it sets a pydicom option, restored for the other tests."""
    before = pydicom.config.INVALID_KEY_BEHAVIOR
    try:
        module = pytest.importorskip("dcm_classifier.study_processing")
    finally:
        pydicom.config.INVALID_KEY_BEHAVIOR = before
    yield module


def run_reference(dcm_classifier: Any, folder: Path) -> dict[int, list[ReferenceVolume]]:
    """dcm-classifier's features and probabilities per volume of every series under ``folder``."""
    from dcm_classifier.dicom_config import inference_features
    from dcm_classifier.image_type_inference import ImageTypeClassifierBase

    study = dcm_classifier.ProcessOneDicomStudyToVolumesMappingBase(folder, inferer=ImageTypeClassifierBase())
    study.run_inference()
    results: dict[int, list[ReferenceVolume]] = {}
    for number, series in study.get_study_dictionary().items():
        volumes = []
        for volume in series.get_volume_list():
            info = volume.get_volume_dictionary()
            table = volume.get_modality_probabilities()
            if not info or table is None or table.empty:
                volumes.append(ReferenceVolume(volume.get_volume_modality(), None, None))
                continue
            features = np.array([float(info[name]) for name in inference_features], dtype=np.float32)
            probabilities = np.array([table[f"GUESS_ONNX_{label}"].iloc[0] for label in REFERENCE_LABELS])
            volumes.append(ReferenceVolume(volume.get_volume_modality(), features, probabilities))
        results[number] = volumes
    return results


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """Every synthetic acquisition as its own series of one study folder; name -> series number."""
    folder = tmp_path_factory.mktemp("mr-study")
    numbers = {name: number for number, name in enumerate(ACQUISITIONS, start=1)}
    for name, number in numbers.items():
        write_acquisition(folder, name, series_number=number)
    return folder, numbers


@pytest.fixture(scope="module")
def reference(dcm_classifier: Any, study: tuple[Path, dict[str, int]]) -> dict[int, list[ReferenceVolume]]:
    return run_reference(dcm_classifier, study[0])


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return load_package(MODELS_DIR / "mr-series-type")


@pytest.fixture(scope="module")
def runner() -> OnnxRunner:
    return OnnxRunner(["CPUExecutionProvider"], intra_op_threads=1)


def read_series(folder: Path) -> list[Dataset]:
    return [pydicom.dcmread(path) for path in sorted(folder.rglob("*.dcm"))]


# Agreement with dcm-classifier --------------------------------------------------------------------------------


def test_feature_list_is_dcm_classifiers(dcm_classifier: Any) -> None:
    from dcm_classifier.dicom_config import inference_features
    from dcm_classifier.image_type_inference import imagetype_to_integer_mapping

    assert list(DCM_CLASSIFIER_FEATURES) == inference_features
    assert get_extractor("dcm-classifier-v1").feature_names == DCM_CLASSIFIER_FEATURES
    assert sorted(imagetype_to_integer_mapping, key=imagetype_to_integer_mapping.__getitem__) == REFERENCE_LABELS


@pytest.mark.parametrize("name", list(EXPECTED))
def test_features_and_probabilities_equal_dcm_classifiers(
    name: str,
    study: tuple[Path, dict[str, int]],
    reference: dict[int, list[ReferenceVolume]],
    package: ModelPackage,
    runner: OnnxRunner,
) -> None:
    folder, numbers = study
    expected = reference[numbers[name]]
    assert [v.modality.removeprefix("LOW_PROBABILITY_") for v in expected] == EXPECTED[name]
    datasets = read_series(folder / name)
    features = get_extractor("dcm-classifier-v1")(datasets)
    probabilities = volume_probabilities(datasets, package, runner)
    assert features.shape == (len(expected), 28) and probabilities.shape == (len(expected), 10)
    for index, volume in enumerate(expected):
        assert volume.features is not None and volume.probabilities is not None
        mismatched = [
            (feature, float(ours), float(theirs))
            for feature, ours, theirs in zip(DCM_CLASSIFIER_FEATURES, features[index], volume.features, strict=True)
            if ours != theirs
        ]
        assert mismatched == []
        np.testing.assert_allclose(probabilities[index], volume.probabilities, rtol=0, atol=1e-6)
        assert int(np.argmax(probabilities[index])) == REFERENCE_LABELS.index(EXPECTED[name][index])


def test_series_without_a_required_value_is_refused_like_dcm_classifier(
    study: tuple[Path, dict[str, int]],
    reference: dict[int, list[ReferenceVolume]],
    package: ModelPackage,
    runner: OnnxRunner,
) -> None:
    folder, numbers = study
    assert [v.modality for v in reference[numbers["no_pixel_bandwidth"]]] == ["INVALID"]
    with pytest.raises(InvalidInput, match="PixelBandwidth"):
        classify_from_headers(read_series(folder / "no_pixel_bandwidth"), package, runner)


def test_real_vendor_headers_agree(
    dcm_classifier: Any, tmp_path: Path, package: ModelPackage, runner: OnnxRunner
) -> None:
    """Siemens, Toshiba and Philips headers from pydicom's test files (Pixel Bandwidth added where absent)."""
    from pydicom.data import get_testdata_file

    for number, name in enumerate(REAL_FILES, start=1):
        source = get_testdata_file(name, download=False)
        if source is None:
            pytest.skip(f"{name} is not installed (pydicom-data)")
        ds = pydicom.dcmread(str(source))
        ds.SeriesNumber = number  # the files share a series; dcm-classifier groups by number
        ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["header-features", name])
        ds.setdefault("PixelBandwidth", "130")
        (tmp_path / name).mkdir()
        ds.save_as(tmp_path / name / "image.dcm")
    reference = run_reference(dcm_classifier, tmp_path)
    for number, name in enumerate(REAL_FILES, start=1):
        (expected,) = reference[number]
        datasets = read_series(tmp_path / name)
        assert expected.features is not None and expected.probabilities is not None
        np.testing.assert_array_equal(get_extractor("dcm-classifier-v1")(datasets)[0], expected.features)
        np.testing.assert_allclose(classify_from_headers(datasets, package, runner), expected.probabilities, atol=1e-6)


def test_reference_header_is_the_first_image_along_the_normal(dcm_classifier: Any, tmp_path: Path) -> None:
    """dcm-classifier reads the first file in GDCM's order, not in Instance Number order."""
    for number, orientation in enumerate(ORIENTATIONS, start=1):
        info = write_mr_series(tmp_path / orientation, slices=5, size=16, orientation=orientation, series_number=number)
        for index, (path, instance) in enumerate(zip(info.paths, [3, 1, 5, 2, 4], strict=True)):
            ds = pydicom.dcmread(path)
            ds.PixelBandwidth, ds.SAR, ds.InstanceNumber = "130", str(index + 1), instance
            ds.save_as(path)
    reference = run_reference(dcm_classifier, tmp_path)
    for number, orientation in enumerate(ORIENTATIONS, start=1):
        (expected,) = reference[number]
        datasets = read_series(tmp_path / orientation)[::-1]
        assert expected.features is not None
        ours = get_extractor("dcm-classifier-v1")(datasets)[0]
        assert ours[DCM_CLASSIFIER_FEATURES.index("SAR")] == expected.features[DCM_CLASSIFIER_FEATURES.index("SAR")]


# The shipped package ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [("T1w_MPRAGE", "T1w"), ("FLAIR", "FLAIR"), ("T2w_TSE", "T2w")])
def test_shipped_model_names_the_series_type(
    name: str, expected: str, study: tuple[Path, dict[str, int]], package: ModelPackage, runner: OnnxRunner
) -> None:
    probabilities = classify_from_headers(read_series(study[0] / name), package, runner)
    assert probabilities.shape == (10,) and probabilities.dtype == np.float64
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    assert package.manifest.classes[int(np.argmax(probabilities))].name == expected
    assert probabilities.max() > 0.75


def test_diffusion_series_is_what_its_weighted_volumes_are(
    study: tuple[Path, dict[str, int]], package: ModelPackage, runner: OnnxRunner
) -> None:
    """b=0 + b=1000 trace volumes: dcm-classifier calls the series "tracew", and so does the mean here."""
    datasets = read_series(study[0] / "DWI")
    assert [len(volume) for volume in split_volumes(datasets)] == [3, 3]
    assert [float(volume[0].DiffusionBValue) for volume in split_volumes(datasets)] == [0.0, 1000.0]
    per_volume = volume_probabilities(datasets, package, runner)
    names = [c.name for c in package.manifest.classes]
    assert [names[i] for i in per_volume.argmax(axis=1)] == ["DWI_b0", "DWI_trace"]
    np.testing.assert_allclose(classify_from_headers(datasets, package, runner), per_volume[1])


def test_other_multi_volume_series_get_the_mean(tmp_path: Path, package: ModelPackage, runner: OnnxRunner) -> None:
    paths = write_acquisition(tmp_path, "T2w_TSE", series_number=1)
    second = write_acquisition(tmp_path / "echo2", "T2w_TSE", series_number=1)  # same positions and series
    for path in second:
        ds = pydicom.dcmread(path)
        ds.EchoTime, ds.InstanceNumber, ds.AcquisitionTime = "20", ds.InstanceNumber + 3, "101800"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(path)])
        ds.save_as(path)
    datasets = [pydicom.dcmread(path) for path in paths + second]
    per_volume = volume_probabilities(datasets, package, runner)
    assert per_volume.shape == (2, 10)
    np.testing.assert_allclose(classify_from_headers(datasets, package, runner), per_volume.mean(axis=0))


def test_manifest_classes_follow_the_model_output(package: ModelPackage) -> None:
    manifest = package.manifest
    assert manifest.input == "header_features" and manifest.feature_extractor == "dcm-classifier-v1"
    assert [c.index for c in manifest.classes] == list(range(10))
    codes = {(c.code.scheme, c.code.value) for c in manifest.classes}
    assert len(codes) == 10 and ("DCM", "110804") in codes  # T1 Weighted MR Signal Intensity
    assert all(c.code.scheme in {"DCM", "99INFERGATE"} for c in manifest.classes)


# Inputs the worker must refuse ---------------------------------------------------------------------------------


def test_wrong_modality_and_bad_arguments_are_refused(
    study: tuple[Path, dict[str, int]], package: ModelPackage, runner: OnnxRunner
) -> None:
    datasets = read_series(study[0] / "T1w_SE")
    for ds in datasets:
        ds.Modality = "CT"
    with pytest.raises(InvalidInput, match="modalities"):
        classify_from_headers(datasets, package, runner)
    with pytest.raises(InvalidInput, match="at least one"):
        classify_from_headers([], package, runner)
    with pytest.raises(TypeError, match='"datasets"'):
        classify_from_headers(datasets[0], package, runner)  # type: ignore[arg-type]


def test_malformed_required_values_are_named(study: tuple[Path, dict[str, int]]) -> None:
    datasets = read_series(study[0] / "T1w_SE")[:1]
    datasets[0].add_new(0x00180081, "LO", "fifteen")  # Echo Time as text, as a broken writer might send it
    del datasets[0].ImageOrientationPatient
    with pytest.raises(InvalidInput, match="ImageOrientationPatient, EchoTime"):
        get_extractor("dcm-classifier-v1")(datasets)


def test_b_value_conventions() -> None:
    ds = Dataset()
    assert b_value(ds) == MISSING
    ds.DiffusionBValue = 996.0
    assert b_value(ds) == 1000.0  # rounded to 10
    ds.DiffusionBValue = 6000.0
    assert b_value(ds) == MISSING  # implausible
    ge = Dataset()
    ge.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x39, "IS", ["1000000500", "8", "0", "0"])
    assert b_value(ge) == 500.0


# Registry and runners -----------------------------------------------------------------------------------------


def test_unknown_extractor_is_a_model_failure(package: ModelPackage, runner: OnnxRunner) -> None:
    assert "dcm-classifier-v1" in registered_extractors()
    with pytest.raises(ModelFailed, match="'no-such-extractor'.*dcm-classifier-v1"):
        get_extractor("no-such-extractor")
    data = package.manifest.model_dump() | {"feature_extractor": "no-such-extractor"}
    other = ModelPackage(manifest=ModelManifest.model_validate(data), folder=package.folder)
    with pytest.raises(ModelFailed, match="no-such-extractor"):
        classify_from_headers([Dataset()], other, runner)


def test_names_are_registered_once() -> None:
    with pytest.raises(ValueError, match="already registered"):
        feature_extractor("dcm-classifier-v1", ["x"])(lambda datasets: np.zeros((1, 1)))
    with pytest.raises(ValueError, match='"features"'):
        feature_extractor("test-empty", [])


class LogitRunner:
    """Returns fixed logits, or a wrongly shaped output, for every volume."""

    def __init__(self, row: Sequence[float]) -> None:
        self.row = np.asarray(row, dtype=np.float32)

    def run(self, package: ModelPackage, batch: np.ndarray) -> np.ndarray:
        return np.tile(self.row, (batch.shape[0], 1))


def test_logits_get_a_softmax_and_malformed_outputs_fail(
    study: tuple[Path, dict[str, int]], package: ModelPackage
) -> None:
    datasets = read_series(study[0] / "T1w_SE")
    data = package.manifest.model_dump()
    data["postprocess"] = {"activation": "none"}
    logits_package = ModelPackage(manifest=ModelManifest.model_validate(data), folder=package.folder)
    row = [0.0] * 9 + [np.log(9.0)]
    probabilities = classify_from_headers(datasets, logits_package, LogitRunner(row))
    assert probabilities[9] == pytest.approx(0.5)
    with pytest.raises(ModelFailed, match="shape"):
        classify_from_headers(datasets, package, LogitRunner([0.5, 0.5]))
    with pytest.raises(ModelFailed, match="outside"):
        classify_from_headers(datasets, package, LogitRunner([2.0] + [0.0] * 9))


def test_zipmap_rows_become_columns_in_class_order(package: ModelPackage) -> None:
    manifest = package.manifest
    rows = [{9: 0.5, 0: 0.25, **{k: 0.25 / 8 for k in range(1, 9)}}]
    array = zipmap_to_array(rows, manifest)
    assert array.shape == (1, 10) and array[0, 0] == 0.25 and array[0, 9] == 0.5
    by_name = [{c.name: float(c.index == 3) for c in manifest.classes}]
    assert int(np.argmax(zipmap_to_array(by_name, manifest))) == 3
    with pytest.raises(ModelFailed, match="do not match"):
        zipmap_to_array([{0: 1.0, 1: 0.0}], manifest)


def test_onnx_runner_selects_the_probability_output(package: ModelPackage, runner: OnnxRunner) -> None:
    output = runner.run(package, np.zeros((2, 28), dtype=np.float32))
    assert output.shape == (2, 10) and output.dtype == np.float32
    np.testing.assert_allclose(output.sum(axis=1), 1.0, atol=1e-5)
