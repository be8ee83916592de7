"""A job for a study held only by the PACS: the node pulls it (C-MOVE or C-GET), runs it, sends results back."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from tests.data.make_series import write_ct_series
from tests.helpers.node import NodeProcess, http_json, node_env, wait_for_http, wait_for_results
from tests.helpers.peers import Orthanc, free_port, run_storescu, wait_for_port

pytestmark = pytest.mark.integration

_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _post(url: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with _HTTP.open(request, timeout=30) as response:
        return response.status, json.loads(response.read())


@pytest.mark.parametrize("method", ["move", "get"])
def test_job_for_a_study_only_the_pacs_holds(tmp_path: Path, method: str) -> None:
    scp_port, api_port = free_port(), free_port()
    modalities = {"node": ["INFERGATE", "127.0.0.1", scp_port]}
    with Orthanc(tmp_path / "orthanc", modalities=modalities) as pacs:
        info = write_ct_series(tmp_path / "ct", slices=12, size=128)
        sent = run_storescu(info.folder, port=pacs.dicom_port, aec="ORTHANC")
        assert sent.returncode == 0, sent.stderr
        suffix = "/get" if method == "get" else ""
        env = node_env(
            data_dir=tmp_path / "var",
            scp_port=scp_port,
            api_port=api_port,
            pacs=f"ORTHANC@127.0.0.1:{pacs.dicom_port}",
            sources=f"PACS=ORTHANC@127.0.0.1:{pacs.dicom_port}{suffix}",
        )
        node = NodeProcess(["up"], env, tmp_path / "up.log").start()
        try:
            wait_for_port("127.0.0.1", scp_port, timeout=60)
            api = f"http://127.0.0.1:{api_port}"
            wait_for_http(f"{api}/health", timeout=60)
            status, body = http_json(f"{api}/api/v1/studies/{info.study_uid}/results")
            assert status == 404  # the node does not hold it

            status, retrieval = _post(
                f"{api}/api/v1/jobs",
                {"study_instance_uid": info.study_uid, "source": "PACS", "model_id": "ct-tissue-seg"},
            )
            assert status == 202 and retrieval["state"] in ("queued", "running", "done"), retrieval
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                _, retrieval = http_json(f"{api}/api/v1/retrievals/{retrieval['id']}")
                if retrieval["state"] in ("done", "failed"):
                    break
                time.sleep(0.3)
            assert retrieval["state"] == "done" and retrieval["instances"] == 12, retrieval
            assert len(retrieval["job_ids"]) == 1

            results = wait_for_results(api, info.study_uid, timeout=90, jobs=1)
            jobs = [job for series in results["series"] for job in series["jobs"]]
            assert [(job["model_id"], job["state"]) for job in jobs] == [("ct-tissue-seg", "done")], jobs
            segs = pacs.wait_for_instances(1, {"Modality": "SEG"}, timeout=30)
            srs = pacs.wait_for_instances(1, {"Modality": "SR"}, timeout=30)
            assert len(segs) == 1 and len(srs) == 1
            unknown = urllib.request.Request(
                f"{api}/api/v1/jobs",
                data=json.dumps({"study_instance_uid": info.study_uid, "source": "NOPE"}).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                _HTTP.open(unknown, timeout=30)
            assert refused.value.code == 404
        except BaseException:
            print(node.log_text()[-15000:])  # noqa: T201
            raise
        finally:
            node.stop()
