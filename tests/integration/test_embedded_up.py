"""``infergate up`` on the embedded defaults (SQLite, filesystem broker), end to end.

A 100-slice 512x512 CT series sent with dcmtk storescu must yield a SEG and an SR listed by the
REST API within the quiet period + 60 s, both passing dciodvfy; Ctrl-C stops every part.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.data.make_series import write_ct_series
from tests.helpers.dicom_validation import dciodvfy_errors
from tests.helpers.node import NodeProcess, http_json, node_env, wait_for_http, wait_for_results
from tests.helpers.peers import free_port, run_echoscu, run_storescu, wait_for_port

pytestmark = pytest.mark.integration

QUIET_SECONDS = 5.0


def test_up_receives_series_and_produces_valid_seg_and_sr(tmp_path: Path) -> None:
    scp_port, api_port = free_port(), free_port()
    data_dir = tmp_path / "var"
    node = NodeProcess(
        ["up"],
        node_env(data_dir=data_dir, scp_port=scp_port, api_port=api_port, series_quiet_seconds=QUIET_SECONDS),
        tmp_path / "up.log",
    ).start()
    try:
        wait_for_port("127.0.0.1", scp_port, timeout=60)
        api = f"http://127.0.0.1:{api_port}"
        wait_for_http(f"{api}/health", timeout=60)
        echo = run_echoscu(scp_port, "INFERGATE")
        assert echo.returncode == 0, echo.stderr

        info = write_ct_series(tmp_path / "ct", slices=100, size=512)
        sent = run_storescu(info.folder, port=scp_port, aec="INFERGATE")
        assert sent.returncode == 0, sent.stderr
        last_response = time.monotonic()

        results = wait_for_results(api, info.study_uid, timeout=QUIET_SECONDS + 60, jobs=2)
        elapsed = time.monotonic() - last_response
        jobs = {job["model_id"]: job for series in results["series"] for job in series["jobs"]}
        assert {job["state"] for job in jobs.values()} == {"done"}, jobs
        seg_job = jobs["ct-tissue-seg"]
        kinds = {obj["kind"]: obj for obj in seg_job["result_objects"]}
        assert set(kinds) == {"SEG", "SR"}
        assert {m["segment_label"] for m in seg_job["measurements"]} == {"Soft tissue", "Fat", "Lung", "Bone", "Body"}
        assert all(m["unit"] == "mL" and m["value"] > 0 for m in seg_job["measurements"])
        classifier = jobs["ct-bone-classifier"]
        assert [obj["kind"] for obj in classifier["result_objects"]] == ["SR"]
        assert len(classifier["findings"]) == 2

        result_files = sorted((data_dir / "results").rglob("*.dcm"))
        assert len(result_files) == 3
        for path in result_files:
            assert dciodvfy_errors(path) == [], path

        status, detail = http_json(f"{api}/api/v1/jobs/{seg_job['id']}")
        assert status == 200 and detail["state"] == "done"
        print(f"results listed {elapsed:.1f} s after the last C-STORE response")  # noqa: T201
    except BaseException:
        print(node.log_text()[-20000:])  # noqa: T201
        raise
    finally:
        node.signal_group(signal.SIGINT)  # what Ctrl-C in a terminal does
        assert node.process is not None
        code = node.process.wait(timeout=40)
    assert code == 0, node.log_text()[-5000:]
