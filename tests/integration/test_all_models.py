"""Every shipped model through the whole node: storescu in, SEG/SR in the PACS (Orthanc), rows in SQL.

One node (``infergate up``) and one Orthanc receive a CT series, the MNI152 T1 brain as an MR
series and the real chest CR in JPEG 2000 (``RG1_J2KR.dcm`` from pydicom-data). The routing rules
send the CT to the tissue segmentation and the density classifier, every MR series to the
series-type classifier and, once it says T1-weighted, to brain extraction, and the chest CR to
the radiograph classifier.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from infergate.store.tables import Finding, Job, JobState, Measurement
from tests.data.make_mni_series import write_mni_series
from tests.data.make_series import write_ct_series
from tests.helpers.dicom_validation import dciodvfy_errors
from tests.helpers.node import NodeProcess, node_env, wait_for_http, wait_for_results
from tests.helpers.peers import Orthanc, free_port, run_storescu, wait_for_port

pytestmark = pytest.mark.integration

EXPECTED_MODELS = {"ct-tissue-seg", "ct-bone-classifier", "mr-series-type", "brain-extraction", "cxr-demo-classifier"}


def _chest_cr() -> Path:
    path = get_testdata_file("RG1_J2KR.dcm")
    assert path is not None, "pydicom-data is missing: install the test dependency group"
    return Path(path)


def test_every_shipped_model_runs_through_the_node(tmp_path: Path) -> None:
    scp_port, api_port = free_port(), free_port()
    data_dir = tmp_path / "var"
    with Orthanc(tmp_path / "orthanc") as pacs:
        env = node_env(
            data_dir=data_dir,
            scp_port=scp_port,
            api_port=api_port,
            series_quiet_seconds=3,
            pacs=f"ORTHANC@127.0.0.1:{pacs.dicom_port}",
            requeue_after_seconds=600,  # follow-up jobs and exports must be sent by the tasks themselves
        )
        node = NodeProcess(["up"], env, tmp_path / "up.log").start()
        try:
            wait_for_port("127.0.0.1", scp_port, timeout=60)
            api = f"http://127.0.0.1:{api_port}"
            wait_for_http(f"{api}/health", timeout=60)

            ct = write_ct_series(tmp_path / "ct", slices=24, size=256)
            brain = write_mni_series(tmp_path / "mr")
            cr = _chest_cr()
            for target in (ct.folder, brain.info.folder, cr):
                sent = run_storescu(target, port=scp_port, aec="INFERGATE")
                assert sent.returncode == 0, sent.stderr
            cr_study = dcmread(cr, stop_before_pixels=True).StudyInstanceUID

            ct_results = wait_for_results(api, ct.study_uid, timeout=120, jobs=2)
            mr_results = wait_for_results(api, brain.info.study_uid, timeout=180, jobs=2)
            cr_results = wait_for_results(api, cr_study, timeout=60, jobs=1)
            jobs = {
                job["model_id"]: job
                for results in (ct_results, mr_results, cr_results)
                for series in results["series"]
                for job in series["jobs"]
            }
            assert set(jobs) == EXPECTED_MODELS
            assert {job["state"] for job in jobs.values()} == {"done"}, {k: j["error"] for k, j in jobs.items()}
            assert jobs["mr-series-type"]["findings"][0]["name"] == "T1w"

            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                segs, srs = pacs.find("Instance", {"Modality": "SEG"}), pacs.find("Instance", {"Modality": "SR"})
                if len(segs) >= 2 and len(srs) >= 5:
                    break
                time.sleep(0.5)
            assert len(segs) == 2 and len(srs) == 5, (segs, srs)
            for instance_id in segs + srs:
                path = tmp_path / f"{instance_id}.dcm"
                path.write_bytes(pacs.instance_file(instance_id))
                assert dciodvfy_errors(path) == [], path
        except BaseException:
            print(node.log_text()[-20000:])  # noqa: T201
            raise
        finally:
            node.stop()

    engine = create_engine(f"sqlite:///{data_dir / 'infergate.db'}")
    with Session(engine) as session:
        assert {job.state for job in session.scalars(select(Job))} == {JobState.done}
        volumes = {m.segment_label: m.value for m in session.scalars(select(Measurement))}
        findings = {f.name for f in session.scalars(select(Finding))}
    engine.dispose()
    assert 1500 < volumes["Brain"] < 2300, volumes  # the MNI template's brain is about 1.9 L
    assert {"Soft tissue", "Bone", "Body"} <= set(volumes)
    assert "T1w" in findings and "Radiolucent lung fields" in findings
