"""The shipped ``mr-series-type`` model from stored Part 10 files to a valid DICOM SR.

Pipeline-level: the files are read back as :func:`workers.pipeline.load_series` reads them, the
package is loaded with its SHA-256 verified, ONNX Runtime runs the real model, and the probabilities
go into the TID 1500 report through :func:`infergate.dicom.sr.build_sr`, which dicom3tools and DCMTK
then check. (The node-level path, C-STORE to routing to a Celery worker, is covered with the node.)
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from infergate.dicom.sr import ClassificationFinding, build_sr
from infergate.dicom.uids import derived_uid
from infergate.manifest import load_package
from tests.data.mr_sequences import write_acquisition
from tests.helpers.dicom_validation import dciodvfy_errors, dsrdump
from tests.unit.workers._fakes import MODELS_DIR
from workers.header_features import classify_from_headers
from workers.runtime import OnnxRunner

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("acquisition", "expected", "code"),
    [
        ("T1w_MPRAGE", "T1w", '(110804,DCM,"T1 Weighted MR Signal Intensity")'),
        ("FLAIR", "FLAIR", '(MRST-FLAIR,99INFERGATE,"T2 Weighted FLAIR MR Signal Intensity")'),
        ("DWI", "DWI_trace", '(MRST-TRACEW,99INFERGATE,"Trace Weighted Diffusion MR Signal Intensity")'),
    ],
)
def test_series_type_is_reported_in_a_valid_sr(acquisition: str, expected: str, code: str, tmp_path: Path) -> None:
    paths = write_acquisition(tmp_path / "in", acquisition, series_number=7, slices=4, size=32)
    datasets = [dcmread(path) for path in paths]
    package = load_package(MODELS_DIR / "mr-series-type")
    manifest = package.manifest

    probabilities = classify_from_headers(datasets, package, OnnxRunner(["CPUExecutionProvider"]))
    top = manifest.classes[int(np.argmax(probabilities))]
    assert top.name == expected
    findings = [ClassificationFinding(c, float(probabilities[c.index])) for c in manifest.classes]
    sr = build_sr(
        datasets,
        manifest,
        seg=None,
        measurements=[],
        findings=findings,
        series_instance_uid=derived_uid("mr-series-type-test", acquisition, "series"),
        sop_instance_uid=derived_uid("mr-series-type-test", acquisition, "instance"),
        series_number=9002,
    )
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)

    assert dciodvfy_errors(path) == []
    dump = dsrdump(path)
    assert f'CODE:(,,"Image Type")={code}' in dump  # the class, as the value of the finding concept
    report = hd.sr.srread(path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [c.name for c in manifest.classes]
    reported = {g.tracking_identifier: g.get_measurements()[0].value for g in groups}
    assert reported[expected] == pytest.approx(float(probabilities.max()))
    assert len(groups[0].source_images) == len(paths)
