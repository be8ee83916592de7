"""dicomweb-client against the node's REST API process: STOW-RS then WADO-RS, over real HTTP.

The API runs as ``infergate api`` (``python -m service.api``) configured only by ``INFERGATE_*``
variables, on PostgreSQL, exactly as in production; dicomweb-client is the user agent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from dicomweb_client import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame

from infergate.config import Settings
from infergate.store.migrate import upgrade
from infergate.store.session import make_engine
from tests.data.make_series import SeriesInfo, write_ct_series
from tests.helpers.node import NodeProcess, node_env, wait_for_http
from tests.helpers.peers import LOOPBACK, free_port

pytestmark = pytest.mark.integration

EXPLICIT = "1.2.840.10008.1.2.1"
RLE = "1.2.840.10008.1.2.5"


@pytest.fixture
def api(make_settings: Callable[..., Settings], pg_url: str, tmp_path: Path) -> Iterator[str]:
    """The API process on a free port; yields its DICOMweb base URL."""
    settings = make_settings(database_url=pg_url)
    engine = make_engine(settings)
    upgrade(engine)
    engine.dispose()
    port = free_port()
    env = node_env(data_dir=settings.data_path, database_url=pg_url, api_host=LOOPBACK, api_port=port)
    process = NodeProcess(["api"], env, tmp_path / "api.log").start()
    try:
        wait_for_http(f"http://{LOOPBACK}:{port}/health", timeout=60)
        yield f"http://{LOOPBACK}:{port}/dicomweb"
    finally:
        process.stop()


def _uids(response: Dataset, sequence: str) -> list[str]:
    return [str(item.ReferencedSOPInstanceUID) for item in response.get(sequence, [])]


def test_store_and_retrieve_with_dicomweb_client(api: str, tmp_path: Path) -> None:
    ct: SeriesInfo = write_ct_series(tmp_path / "ct", slices=3, size=32, seed=21)
    rle: SeriesInfo = write_ct_series(
        tmp_path / "rle", slices=2, size=32, seed=22, study_uid=ct.study_uid, transfer_syntax=RLE
    )
    client = DICOMwebClient(url=api)

    stored = client.store_instances([dcmread(p) for p in ct.paths + rle.paths])
    assert _uids(stored, "ReferencedSOPSequence") == ct.sop_instance_uids + rle.sop_instance_uids
    assert "FailedSOPSequence" not in stored
    # dicomweb-client sends "Host: 127.0.0.1" without the port (web.py sets the header itself), and
    # the node builds its URLs from the Host header (RFC 7230 5.4), so only the path can be compared.
    assert stored.RetrieveURL.endswith(f"/dicomweb/studies/{ct.study_uid}")

    original = dcmread(ct.paths[1])
    instance = client.retrieve_instance(ct.study_uid, ct.series_uid, ct.sop_instance_uids[1])
    assert instance.SOPInstanceUID == original.SOPInstanceUID and instance.PixelData == original.PixelData

    series = client.retrieve_series(ct.study_uid, rle.series_uid)
    assert [ds.SOPInstanceUID for ds in series] == rle.sop_instance_uids
    assert all(ds.file_meta.TransferSyntaxUID == EXPLICIT for ds in series), "decoded to the default syntax"
    assert np.array_equal(series[0].pixel_array, dcmread(rle.paths[0]).pixel_array)

    metadata = client.retrieve_instance_metadata(ct.study_uid, ct.series_uid, ct.sop_instance_uids[1])  # one object
    assert metadata["00080018"]["Value"] == [ct.sop_instance_uids[1]]
    bulk_uri = api + metadata["7FE00010"]["BulkDataURI"].split("/dicomweb", 1)[1]  # the port, as above
    assert client.retrieve_bulkdata(bulk_uri, media_types=[("application/octet-stream", EXPLICIT)]) == [
        original.PixelData
    ]

    frames = client.retrieve_instance_frames(
        ct.study_uid,
        ct.series_uid,
        ct.sop_instance_uids[1],
        frame_numbers=[1],
        media_types=[("application/octet-stream", EXPLICIT)],
    )
    assert frames == [original.PixelData]
    rle_original = dcmread(rle.paths[1])
    decoded = client.retrieve_instance_frames(
        ct.study_uid,
        rle.series_uid,
        rle.sop_instance_uids[1],
        frame_numbers=[1],
        media_types=[("application/octet-stream", EXPLICIT)],
    )
    assert decoded == [rle_original.pixel_array.astype("<u2").tobytes()]
    as_stored = client.retrieve_instance_frames(
        ct.study_uid, rle.series_uid, rle.sop_instance_uids[1], frame_numbers=[1], media_types=["image/dicom-rle"]
    )
    assert as_stored == [get_frame(rle_original.PixelData, 0, number_of_frames=1)]

    with pytest.raises(requests.HTTPError) as refused:
        client.store_instances([dcmread(ct.paths[0])], study_instance_uid="1.2.826.0.1.3680043.8.498.77")
    assert refused.value.response.status_code == 409
    with pytest.raises(requests.HTTPError) as missing:
        client.retrieve_instance(ct.study_uid, ct.series_uid, "1.2.826.0.1.3680043.8.498.78")
    assert missing.value.response.status_code == 404
