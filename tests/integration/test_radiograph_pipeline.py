"""The 2-D radiograph path on a real chest CR: pydicom-data's ``RG1`` in three transfer syntaxes.

``RG1_UNCI.dcm``, ``RG1_J2KR.dcm`` and ``RG1_J2KI.dcm`` are one Philips PA chest CR (1955 x 1841,
15 bits, MONOCHROME1) stored uncompressed, as lossless JPEG 2000 and as lossy JPEG 2000. Despite its
name, ``RG1_UNCI.dcm`` is the *decoded lossy* file (its header says "JPEG 2000 irreversible (lossy)
10:1" and its pixels equal J2KI's), so it differs from the lossless original by up to 403 of 32767
per pixel: J2KI and UNCI must agree exactly, J2KR within a small tolerance.

The image exercises what a real radiograph brings: MONOCHROME1 polarity, a VOI window in stored
units, and a Pixel Spacing of ``0\\0`` (uncalibrated plate) with no Imager Pixel Spacing.

pydicom-data is in the ``test`` dependency group; these tests fail rather than skip without it, so
that a CI image missing it is noticed. Nothing is downloaded.
"""

from __future__ import annotations

import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.dicom.sr import ClassificationFinding, build_sr
from infergate.dicom.storage import resolve_inside
from infergate.dicom.uids import derived_uid
from infergate.dicom.volume import Volume, load_volume
from infergate.ingest import InstanceHeader, ingest_instance
from infergate.manifest import ModelPackage, load_package
from infergate.store import queries
from infergate.store.tables import JobState, Series
from tests.helpers.dicom_validation import dciodvfy_errors, dsrdump
from workers.inference import infer
from workers.pipeline import JobOutcome, WorkerContext, run_job
from workers.preprocess import prepare
from workers.runtime import OnnxRunner

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_ID = "cxr-demo-classifier"
UNCOMPRESSED, LOSSLESS, LOSSY = "RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm"
#: P(radiolucent lung fields) on RG1_UNCI with model 1.0.0 (contrast 0.241, see the model card).
EXPECTED_PROBABILITY = 0.98578


def rg1_path(name: str) -> Path:
    """Path of a pydicom-data file; fails (never skips, never downloads) when it is not installed."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.fail(
            f"{name} not found: the real chest CR comes from PyPI pydicom-data, which is in the test "
            "dependency group (pip install --group test, or pip install pydicom-data)."
        )
    return Path(str(path))


def rg1(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(rg1_path(name))


@pytest.fixture(scope="module")
def runner() -> OnnxRunner:
    return OnnxRunner(["CPUExecutionProvider"], intra_op_threads=2)


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return load_package(REPO_ROOT / "models" / MODEL_ID)


@pytest.fixture(scope="module")
def volumes() -> dict[str, Volume]:
    return {name: load_volume([rg1(name)]) for name in (UNCOMPRESSED, LOSSLESS, LOSSY)}


def test_rg1_brings_the_attributes_the_path_must_handle() -> None:
    """Guards the premises of the other tests: if pydicom-data changes these, they must be revisited."""
    datasets = {name: rg1(name) for name in (UNCOMPRESSED, LOSSLESS, LOSSY)}
    syntaxes = {name: ds.file_meta.TransferSyntaxUID for name, ds in datasets.items()}
    assert syntaxes == {
        UNCOMPRESSED: pydicom.uid.ExplicitVRLittleEndian,
        LOSSLESS: pydicom.uid.JPEG2000Lossless,
        LOSSY: pydicom.uid.JPEG2000,
    }
    for ds in datasets.values():
        assert (ds.Modality, ds.BodyPartExamined, ds.ViewPosition) == ("CR", "CHEST", "PA")
        assert ds.PhotometricInterpretation == "MONOCHROME1"
        assert (ds.Rows, ds.Columns, ds.BitsStored, ds.PixelRepresentation) == (1955, 1841, 15, 0)
        assert [float(v) for v in ds.PixelSpacing] == [0.0, 0.0] and "ImagerPixelSpacing" not in ds
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (15000.0, 30000.0)
        assert "VOILUTSequence" not in ds and "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds


def test_volume_is_one_inverted_slice_with_the_default_spacing(volumes: dict[str, Volume]) -> None:
    """``0\\0`` Pixel Spacing means "not calibrated": read as absent, not refused."""
    stored = rg1(UNCOMPRESSED).pixel_array
    volume = volumes[UNCOMPRESSED]
    assert volume.shape == (1, 1955, 1841)
    assert volume.spacing == (1.0, 1.0, 1.0)
    top = 2**15 - 1
    np.testing.assert_array_equal(volume.array[0], top - stored.astype(np.float32))


def test_pixels_of_the_three_syntaxes(volumes: dict[str, Volume]) -> None:
    np.testing.assert_array_equal(volumes[LOSSY].array, volumes[UNCOMPRESSED].array)
    difference = np.abs(volumes[LOSSLESS].array - volumes[UNCOMPRESSED].array)
    assert 0 < difference.max() <= 403  # UNCI is the lossy file decoded, J2KR the lossless original


def test_model_input_is_fitted_centred_and_displayed_as_the_modality_intended(
    volumes: dict[str, Volume], package: ModelPackage
) -> None:
    prepared = prepare(volumes[UNCOMPRESSED], package.manifest.preprocess, 2)
    image = prepared.array[0]
    assert image.shape == (256, 256)
    # 1955 x 1841 scaled to 256 rows keeps 241 columns, centred: 7 padding columns left, 8 right.
    assert prepared.content is not None and tuple(prepared.content[1:]) == (slice(0, 256), slice(7, 248))
    assert 0.0 <= image.min() and image.max() <= 1.0
    np.testing.assert_array_equal(image[:, :7], image[:, 7:248].min())
    np.testing.assert_array_equal(image[:, 248:], image[:, 7:248].min())
    # Displayed as the window intends (lungs dark, spine white): the lung bands are darker than
    # the midline band, which is what the model measures.
    rows = slice(32, 144)
    midline = image[rows, 112:144].mean()
    lungs = np.concatenate([image[rows, 48:96], image[rows, 160:208]], axis=1).mean()
    assert midline - lungs == pytest.approx(0.241, abs=0.005)


def test_probabilities_agree_across_transfer_syntaxes(
    volumes: dict[str, Volume], package: ModelPackage, runner: OnnxRunner
) -> None:
    probabilities = {}
    for name, volume in volumes.items():
        output = infer(volume, package, runner)
        assert output.probabilities is not None
        probabilities[name] = output.probabilities
    reference = probabilities[UNCOMPRESSED]
    assert reference[1] == pytest.approx(EXPECTED_PROBABILITY, abs=1e-4)
    assert reference.sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(probabilities[LOSSY], reference)
    np.testing.assert_allclose(probabilities[LOSSLESS], reference, atol=1e-4)


def test_skipping_the_monochrome1_inversion_would_flip_the_answer(package: ModelPackage, runner: OnnxRunner) -> None:
    """The same pixels labelled MONOCHROME2 show white lungs: the model must then say "no"."""
    ds = rg1(UNCOMPRESSED)
    ds.PhotometricInterpretation = "MONOCHROME2"
    output = infer(load_volume([ds]), package, runner)
    assert output.probabilities is not None and output.probabilities[1] < 0.01


@pytest.mark.parametrize("name", [UNCOMPRESSED, LOSSLESS])
def test_sr_of_the_finding_is_valid(
    tmp_path: Path, volumes: dict[str, Volume], package: ModelPackage, runner: OnnxRunner, name: str
) -> None:
    manifest = package.manifest
    volume = volumes[name]
    output = infer(volume, package, runner)
    assert output.probabilities is not None and manifest.threshold is not None
    findings = [
        ClassificationFinding(
            class_label=c,
            probability=float(output.probabilities[c.index]),
            positive=(float(output.probabilities[c.index]) >= manifest.threshold)
            if c.index == manifest.positive_class
            else None,
        )
        for c in manifest.classes
    ]
    sr = build_sr(
        volume.datasets,
        manifest,
        seg=None,
        measurements=[],
        findings=findings,
        series_instance_uid=derived_uid("test-radiograph", name, "series"),
        sop_instance_uid=derived_uid("test-radiograph", name, "instance"),
        series_number=9002,
    )
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    dump = dsrdump(path)
    assert '"Radiographic anatomy")=(112084,DCM,"Lucency")' in dump
    assert '"Presence of property")=(121053,DCM,"Present")' in dump
    assert '"Modality")=(CR,DCM,"Computed Radiography")' in dump
    assert "Pixel Spacing" not in dump  # not invented for an uncalibrated plate
    report = hd.sr.srread(path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [c.name for c in manifest.classes]
    assert groups[1].get_measurements()[0].value == pytest.approx(EXPECTED_PROBABILITY, abs=1e-4)
    source = volume.datasets[0]
    assert [s.referenced_sop_instance_uid for s in groups[1].source_images] == [source.SOPInstanceUID]
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID


def _ingest(settings: Settings, factory: sessionmaker[Session], path: Path) -> int:
    ds = pydicom.dcmread(path)
    header = InstanceHeader.from_dataset(
        ds,
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
    )
    ingest_instance(factory, settings.data_path, header, path.read_bytes(), calling_ae="CR", called_ae="INFERGATE")
    with factory() as session:
        series_id = session.scalar(select(Series.id))
    assert series_id is not None
    return series_id


@pytest.mark.parametrize("name", [UNCOMPRESSED, LOSSLESS])
def test_job_on_the_received_radiograph_records_the_finding(
    db_settings: Settings, session_factory: sessionmaker[Session], name: str
) -> None:
    """The worker's own path: stored file -> job -> SR on disk and finding rows in SQL."""
    series_id = _ingest(db_settings, session_factory, rg1_path(name))
    with session_factory() as session, session.begin():
        job_id = queries.create_job(session, series_id, MODEL_ID, "1.0.0")
    assert job_id is not None
    ctx = WorkerContext(settings=db_settings, factory=session_factory, runner=OnnxRunner(["CPUExecutionProvider"]))
    started = time.perf_counter()
    assert run_job(ctx, job_id) == (JobOutcome.done, None)
    assert time.perf_counter() - started < 30.0  # about 0.1 s uncompressed, 0.6 s JPEG 2000 here
    with session_factory() as session:
        job = queries.job_with_results(session, job_id)
        assert job is not None and job.state == JobState.done
        findings = {f.name: f for f in job.findings}
        assert set(findings) == {"No radiolucent lung fields", "Radiolucent lung fields"}
        positive = findings["Radiolucent lung fields"]
        assert (positive.code_scheme, positive.code_value) == ("DCM", "112084")
        assert positive.positive is True
        assert positive.probability == pytest.approx(EXPECTED_PROBABILITY, abs=1e-4)
        assert findings["No radiolucent lung fields"].positive is None
        (sr_object,) = job.result_objects
        assert sr_object.kind == "SR"
        assert dciodvfy_errors(resolve_inside(db_settings.data_path, sr_object.path)) == []
