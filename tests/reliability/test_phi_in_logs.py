"""Row 26: canary patient data through every path of a node logging at DEBUG, then none in its logs.

``infergate up`` (SCP, API, watcher, worker) runs at ``INFERGATE_LOG_LEVEL=DEBUG`` with a PACS to
export to. A CT series with canary patient name, ID, birth date and accession number goes in over
C-STORE, another over STOW-RS; QIDO-RS searches by those values, WADO-RS fetches metadata, a
malformed instance carrying the canaries is refused, the jobs run and export. Then the node's log
and its audit log hold none of the canaries. (The whole suite is also watched at INFO level by
tests/helpers/phi_watch.py.)
"""

from __future__ import annotations

import re
import signal
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread

from infergate.dicomweb.multipart import build_multipart, multipart_content_type
from tests.data.make_series import write_ct_series
from tests.helpers.node import NodeProcess, http_json, node_env, wait_for_http, wait_for_results
from tests.helpers.peers import LOOPBACK, free_port, run_storescu, wait_for_port
from tests.helpers.storage_scp import StorageSCP

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

NAME, PATIENT_ID, ACCESSION, BIRTH = "CANARY^Leaky^Q", "CANARY-PID-4711", "CANARYACC99", "19010203"
CANARIES = re.compile("|".join(map(re.escape, (NAME, "CANARY", PATIENT_ID, ACCESSION, BIRTH, "Leaky"))))


def _with_canaries(folder: Path) -> None:
    for path in sorted(folder.glob("*.dcm")):
        ds = dcmread(path)
        ds.PatientName, ds.PatientID, ds.AccessionNumber, ds.PatientBirthDate = NAME, PATIENT_ID, ACCESSION, BIRTH
        ds.OtherPatientIDs = PATIENT_ID
        ds.save_as(path, enforce_file_format=True)


def _post(url: str, body: bytes, content_type: str) -> int:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=60) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_no_patient_data_in_debug_logs(tmp_path: Path) -> None:
    scp_port, api_port = free_port(), free_port()
    pacs = StorageSCP().start()
    data_dir = tmp_path / "var"
    env = node_env(
        data_dir=data_dir,
        scp_port=scp_port,
        api_port=api_port,
        series_quiet_seconds=2,
        log_level="DEBUG",
        pacs=pacs.destination,
    )
    node = NodeProcess(["up"], env, tmp_path / "up.log").start()
    api = f"http://{LOOPBACK}:{api_port}"
    try:
        wait_for_port(LOOPBACK, scp_port, timeout=60)
        wait_for_http(f"{api}/health", timeout=60)

        scu = write_ct_series(tmp_path / "scu", slices=20, size=64, seed=301)
        _with_canaries(scu.folder)
        assert run_storescu(scu.folder, port=scp_port, aec="INFERGATE").returncode == 0

        stow = write_ct_series(tmp_path / "stow", slices=20, size=64, seed=302)
        _with_canaries(stow.folder)
        body, boundary = build_multipart(
            [("application/dicom", p.read_bytes()) for p in sorted(stow.folder.glob("*.dcm"))]
        )
        assert _post(f"{api}/dicomweb/studies", body, multipart_content_type("application/dicom", boundary)) == 200

        # A refused instance carrying the canaries: a bad SOP Instance UID.
        bad = dcmread(sorted(scu.folder.glob("*.dcm"))[0])
        bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = "1.2.3.not-a-uid"
        bad_folder = tmp_path / "bad"
        bad_folder.mkdir()
        bad.save_as(bad_folder / "bad.dcm", enforce_file_format=True)
        run_storescu(bad_folder, port=scp_port, aec="INFERGATE")  # refused; its status is row 19's business
        bad_body, bad_boundary = build_multipart([("application/dicom", (bad_folder / "bad.dcm").read_bytes())])
        _post(f"{api}/dicomweb/studies", bad_body, multipart_content_type("application/dicom", bad_boundary))

        for query in (
            {"PatientName": "CANARY*"},
            {"PatientID": PATIENT_ID},
            {"AccessionNumber": ACCESSION},
            {"PatientBirthDate": BIRTH},
        ):
            status, found = http_json(f"{api}/dicomweb/studies?{urllib.parse.urlencode(query)}")
            assert status == 200 and len(found) >= 1, query
        status, _ = http_json(f"{api}/dicomweb/studies/{scu.study_uid}/series/{scu.series_uid}/metadata")
        assert status == 200

        for info in (scu, stow):
            results = wait_for_results(api, info.study_uid, timeout=120, jobs=2)
            states = {job["state"] for series in results["series"] for job in series["jobs"]}
            assert states == {"done"}, results
    finally:
        node.signal_group(signal.SIGINT)
        assert node.process is not None
        node.process.wait(timeout=60)
        pacs.stop()

    log = node.log_text()
    assert "DEBUG" in log, "the node did log at DEBUG, so the check means something"
    leaks = [line for line in log.splitlines() if CANARIES.search(line)]
    audit = sorted(data_dir.rglob("audit.log"))
    for path in audit:
        leaks += [f"{path.name}: {line}" for line in path.read_text().splitlines() if CANARIES.search(line)]
    assert leaks == [], "\n".join(leaks[:20])
