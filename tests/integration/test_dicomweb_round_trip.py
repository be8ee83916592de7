"""The DICOMweb round trip with dicomweb-client, unchanged, against ``infergate up``.

STOW a CT series → QIDO finds it → the jobs run → QIDO finds the SEG and SR in the same study →
WADO-RS retrieves them, their metadata and a SEG frame.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from tests.data.make_series import write_ct_series
from tests.helpers.node import NodeProcess, node_env, wait_for_http, wait_for_results
from tests.helpers.peers import free_port, wait_for_port

pytestmark = pytest.mark.integration

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.34"


def test_stow_qido_job_qido_wado(tmp_path: Path) -> None:
    scp_port, api_port = free_port(), free_port()
    env = node_env(data_dir=tmp_path / "var", scp_port=scp_port, api_port=api_port, series_quiet_seconds=2)
    node = NodeProcess(["up"], env, tmp_path / "up.log").start()
    try:
        wait_for_port("127.0.0.1", scp_port, timeout=60)
        api = f"http://127.0.0.1:{api_port}"
        wait_for_http(f"{api}/health", timeout=60)
        client = DICOMwebClient(url=f"{api}/dicomweb")

        info = write_ct_series(tmp_path / "ct", slices=12, size=128)
        response = client.store_instances([dcmread(path) for path in info.paths])
        assert len(response.ReferencedSOPSequence) == 12 and "FailedSOPSequence" not in response

        found = client.search_for_series(search_filters={"StudyInstanceUID": info.study_uid, "Modality": "CT"})
        assert [s["0020000E"]["Value"][0] for s in found] == [info.series_uid]

        results = wait_for_results(api, info.study_uid, timeout=90, jobs=2)
        assert {job["state"] for series in results["series"] for job in series["jobs"]} == {"done"}

        produced = {}
        for sop_class in (SEG, SR):
            instances = client.search_for_instances(
                study_instance_uid=info.study_uid, search_filters={"SOPClassUID": sop_class}
            )
            produced[sop_class] = [
                (i["0020000E"]["Value"][0], i["00080018"]["Value"][0]) for i in instances
            ]
        assert len(produced[SEG]) == 1 and len(produced[SR]) == 2  # segmentation SR + classifier SR

        seg_series, seg_instance = produced[SEG][0]
        seg = client.retrieve_instance(info.study_uid, seg_series, seg_instance)
        assert seg.SOPClassUID == SEG and seg.StudyInstanceUID == info.study_uid
        metadata = client.retrieve_instance_metadata(info.study_uid, seg_series, seg_instance)
        assert metadata["00080016"]["Value"] == [SEG] and "BulkDataURI" in metadata["7FE00010"]
        (frame,) = client.retrieve_instance_frames(
            info.study_uid,
            seg_series,
            seg_instance,
            frame_numbers=[1],
            media_types=[("application/octet-stream", "1.2.840.10008.1.2.1")],
        )
        assert len(frame) == (seg.Rows * seg.Columns + 7) // 8  # one BINARY frame, bit-packed
        for sr_series, sr_instance in produced[SR]:
            sr = client.retrieve_instance(info.study_uid, sr_series, sr_instance)
            assert sr.SOPClassUID == SR and sr.ContentSequence
    except BaseException:
        print(node.log_text()[-15000:])  # noqa: T201
        raise
    finally:
        node.stop()
