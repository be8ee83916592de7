"""OHIF, configured with the node as its DICOMweb data source, lists the study and shows its SEG and SR.

``infergate up`` (embedded: SQLite, filesystem broker) allows CORS from the origin OHIF is served at, as a
hospital deployment of OHIF on its own host would need; a small CT series arrives over DICOM, ct-tissue-seg
and ct-bone-classifier turn it into a SEG and two SRs, and headless Chromium walks OHIF's study list and viewer
(see tests/helpers/ohif_browser.py). Screenshots go to ``artifacts/`` at the repository root, which CI keeps.

OHIF's prebuilt app comes from npm (``scripts/ohif/fetch.sh``, cached in ``.cache/ohif``) and the browser is
Debian's chromium (``scripts/test.sh`` installs it): when either is missing the test fails, it does not skip.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from tests.data.make_series import write_ct_series
from tests.helpers.node import NodeProcess, node_env, wait_for_http, wait_for_results
from tests.helpers.ohif_browser import check_study
from tests.helpers.ohif_server import OhifServer, fetch_ohif
from tests.helpers.peers import LOOPBACK, free_port, run_storescu, wait_for_port

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "artifacts"
QUIET_SECONDS = 2.0


def _segment_names(model_id: str) -> list[str]:
    manifest = json.loads((REPO_ROOT / "models" / model_id / "manifest.json").read_text())
    return [label["name"] for label in manifest["labels"]]


@pytest.mark.timeout(300)
def test_ohif_lists_the_study_with_its_seg_and_sr(tmp_path: Path) -> None:
    dist = fetch_ohif()
    scp_port, api_port = free_port(), free_port()
    api = f"http://{LOOPBACK}:{api_port}"
    dicomweb = f"{api}/dicomweb"
    with OhifServer(dist, dicomweb) as ohif:
        env = node_env(
            data_dir=tmp_path / "var",
            scp_port=scp_port,
            api_port=api_port,
            series_quiet_seconds=QUIET_SECONDS,
            cors_origins=ohif.origin,
        )
        node = NodeProcess(["up"], env, tmp_path / "up.log").start()
        try:
            wait_for_port(LOOPBACK, scp_port, timeout=60)
            wait_for_http(f"{api}/health", timeout=60)
            info = write_ct_series(tmp_path / "ct", slices=32, size=128)
            sent = run_storescu(info.folder, port=scp_port, aec="INFERGATE")
            assert sent.returncode == 0, sent.stderr
            results = wait_for_results(api, info.study_uid, timeout=QUIET_SECONDS + 90, jobs=2)
            jobs = {job["model_id"]: job for series in results["series"] for job in series["jobs"]}
            assert {job["state"] for job in jobs.values()} == {"done"}, jobs
            # The job's own preview, kept beside the viewer's screenshots for a person to compare.
            preview_url = jobs["ct-tissue-seg"]["preview_url"]
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(preview_url, timeout=30) as answer:
                preview = answer.read()
            assert preview.startswith(b"\x89PNG\r\n\x1a\n")
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "preview-ct-tissue-seg.png").write_bytes(preview)

            report = check_study(
                ohif.origin,
                dicomweb,
                info.study_uid,
                screenshots=ARTIFACTS,
                prefix="ohif",
                modalities=("CT", "SEG", "SR"),
                segments=_segment_names("ct-tissue-seg"),
            )
        except BaseException:
            print(node.log_text()[-20000:])  # noqa: T201
            raise
        finally:
            node.stop()
    assert sorted(report.series_modalities) == ["CT", "SEG", "SR", "SR"]  # segmentation SR + classifier SR
    assert [path.name for path in report.screenshots] == ["ohif-study-list.png", "ohif-viewer.png", "ohif-seg.png"]
    print(f"OHIF check took {report.seconds:.1f} s; screenshots in {ARTIFACTS}")  # noqa: T201
