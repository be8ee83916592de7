"""The real peers the other integration tests rely on: Orthanc, its Lua routing, DICOMweb and DCMTK."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.data.make_series import write_ct_series
from tests.helpers.peers import (
    DICOMWEB_PLUGIN,
    LOOPBACK,
    ORTHANC_BINARY,
    Orthanc,
    port_is_listening,
    run_echoscu,
    run_storescu,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (ORTHANC_BINARY.exists() and DICOMWEB_PLUGIN.exists() and shutil.which("storescu")),
        reason="needs Debian packages orthanc, orthanc-dicomweb and dcmtk",
    ),
]


def _port_is_free(port: int) -> bool:
    """Nothing listens, and a server could bind the port again (with SO_REUSEADDR, as servers do)."""
    if port_is_listening(port):
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def test_orthanc_receives_a_ct_series_from_storescu_and_stops_cleanly(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "ct", slices=10, size=512, seed=3)
    pacs = Orthanc(tmp_path / "orthanc", aet="PACS")
    with pacs:
        assert run_echoscu(pacs.dicom_port, "PACS").returncode == 0
        sent = run_storescu(series.folder, port=pacs.dicom_port, aec="PACS")
        assert sent.returncode == 0, sent.stderr + pacs.log_text()

        instances = pacs.find("Instance", {"SeriesInstanceUID": series.series_uid})
        assert len(instances) == 10
        stored = pydicom.dcmread(pydicom.filebase.DicomBytesIO(pacs.instance_file(instances[0])))
        assert stored.SOPInstanceUID in series.sop_instance_uids
        assert pacs.instance_tags(instances[0])["Modality"] == "CT"
        # the DICOMweb plugin answers QIDO-RS for the study
        assert b"CT CHEST" in pacs.request("GET", f"/dicom-web/studies/{series.study_uid}/series")
        ports = (pacs.http_port, pacs.dicom_port)
    assert not pacs.running
    assert all(_port_is_free(port) for port in ports)
    assert "Orthanc has stopped" in pacs.log_text()


REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_AUTOROUTE = REPO_ROOT / "docker" / "orthanc" / "autoroute.lua"


@pytest.mark.parametrize("script", ["generated", "docker"])
def test_lua_autoroute_forwards_images_but_not_what_the_node_sends(tmp_path: Path, script: str) -> None:
    """Both the helper's generated script and docker/orthanc/autoroute.lua (the compose PACS) route alike.

    A second Orthanc plays the inference node (AE INFERGATE), so the routing is tested without infergate.
    """
    series = write_ct_series(tmp_path / "ct", slices=3, size=64, seed=4)
    with Orthanc(tmp_path / "node", aet="INFERGATE", dicomweb=False) as node:
        modalities: dict[str, list[str | int]] = {"infergate": ["INFERGATE", LOOPBACK, node.dicom_port]}
        if script == "generated":
            routing: dict[str, Any] = {"autoroute_to": "infergate", "autoroute_skip_calling_aet": "INFERGATE"}
        else:
            routing = {"extra_config": {"LuaScripts": [str(DOCKER_AUTOROUTE)]}}
        with Orthanc(tmp_path / "pacs", aet="PACS", modalities=modalities, dicomweb=False, **routing) as pacs:
            assert run_storescu(series.folder, port=pacs.dicom_port, aec="PACS").returncode == 0
            assert len(node.wait_for_instances(3, timeout=30)) == 3

            from_node = write_ct_series(tmp_path / "from-node", slices=2, size=64, seed=5)
            sent = run_storescu(from_node.folder, port=pacs.dicom_port, aet="INFERGATE", aec="PACS")
            assert sent.returncode == 0
            assert len(pacs.find("Instance", {"SeriesInstanceUID": from_node.series_uid})) == 2
            # the scripts only read Modality, so a CT image relabelled as SEG stands in for a result object
            seg_like = pydicom.dcmread(series.paths[0])
            seg_like.Modality = "SEG"
            seg_like.SeriesInstanceUID = seg_like.SOPInstanceUID = (
                seg_like.file_meta.MediaStorageSOPInstanceUID
            ) = pydicom.uid.generate_uid(entropy_srcs=["test_peers", "seg-like"])
            seg_like.save_as(tmp_path / "seg-like.dcm")
            assert run_storescu([tmp_path / "seg-like.dcm"], port=pacs.dicom_port, aec="PACS").returncode == 0
            # Lua handles stored instances in order: once a later marker arrived, skipped ones would have too
            marker = write_ct_series(tmp_path / "marker", slices=1, size=64, seed=6)
            assert run_storescu(marker.folder, port=pacs.dicom_port, aec="PACS").returncode == 0
            node.wait_for_instances(1, {"SeriesInstanceUID": marker.series_uid}, timeout=30)
            assert node.find("Instance", {"SeriesInstanceUID": from_node.series_uid}) == []
            assert node.find("Instance", {"Modality": "SEG"}) == []
