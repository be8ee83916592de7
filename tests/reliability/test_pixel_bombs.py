"""Row 21 of issue 5: pixel and decompression bombs are refused before anything is allocated.

The bombs (``tests/helpers/bombs.py``) are valid DICOM structures, so the SCP stores the pixel ones
as it must: native Pixel Data under headers of 65535 x 65535 and 40000 x 40000; 3000 slices of
1024 x 1024 (3.1e9 voxels, above ``INFERGATE_MAX_VOLUME_VOXELS``); JPEG baseline, JPEG-LS and
JPEG 2000 codestreams whose SOF0 / SOF55 / SIZ declare 65535 x 65535 under a 64 x 64 header (a
decoder allocates what the codestream declares); a 64 x 64 RLE image whose runs decode to 2 GiB.
A Deflated Explicit VR Little Endian dataset that inflates to 2 GiB is refused at both doors, the
C-STORE handler and STOW-RS.

"No OOM kill" is made observable: the worker-side code runs in a child process whose address space
is capped (``RLIMIT_AS``) at 1 GiB above what it holds after its imports, so a bomb allocation
would fail loudly (MemoryError, a decoder's error) instead of succeeding lazily; every case must
end instead in the node's own refusal, whose message the test checks. End to end, the pixel bombs
go through a real ``python -m service.scp`` process, get a job each, and each job, run by
``run_job`` with a real ``WorkerContext`` in such a capped child, ends ``failed`` with the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import select

from infergate.config import Settings
from infergate.store import queries
from infergate.store.session import make_engine, make_session_factory
from infergate.store.tables import Job, JobState, Series
from tests.helpers.bombs import pixel_bombs
from tests.helpers.raw_store import RawSender, dataset_of
from tests.reliability.scp_harness import ScpProcess, migrate

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
REFUSED = "refused before decoding"
HEADROOM = 1024**3
MODEL = "ct-bone-classifier"


def _run_capped(*args: str, timeout: float = 120) -> dict[str, dict[str, Any]]:
    """``python -m tests.helpers.bombs ARGS`` with its address space capped; its reports by case."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.helpers.bombs", "--headroom", str(HEADROOM), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"the capped child died with {result.returncode}:\n{result.stderr[-4000:]}"
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {report.pop("case"): report for report in reports}


@pytest.mark.timeout(240)
def test_bombs_are_refused_before_allocation(tmp_path: Path) -> None:
    paths = pixel_bombs(tmp_path)
    reports = _run_capped("load", str(next(iter(paths.values())).parent))
    assert reports["cap"]["proof"] == "MemoryError", "the address-space cap does not hold: the test would prove nothing"
    expected = {
        "native 65535 x 65535": "INFERGATE_MAX_VOLUME_VOXELS",
        "native 40000 x 40000": "holds 8192 bytes",
        "3000 slices of 1024 x 1024": "3145728000 voxels",
        "JPEG 2000 SIZ 65535 x 65535": "codestream declares 65535 x 65535",
        "JPEG 2000 65535 x 65535 in both": "INFERGATE_MAX_VOLUME_VOXELS",
        "JPEG-LS SOF55 65535 x 65535": "codestream declares 65535 x 65535",
        "JPEG SOF0 65535 x 65535": "codestream declares 65535 x 65535",
        "RLE runs to 2 GiB": "compressed frame of 33554496 bytes",
    }
    for case, fragment in expected.items():
        report = reports[case]
        assert report["outcome"] == "InvalidInput", f"{case}: {report}"
        assert fragment in report["message"] and REFUSED in report["message"], f"{case}: {report['message']}"
    stow = reports["deflate bomb to STOW-RS"]
    assert stow["outcome"] == "returned" and "CANNOT_UNDERSTAND" in stow["message"], stow
    assert "decompression bomb" in stow["message"], stow
    handler = reports["deflate bomb to the C-STORE handler"]
    assert handler["message"] == str(0xC210), handler
    assert any("decompression bomb" in line for line in handler["log"]), handler
    # Nothing near a bomb's size was ever held: the child's peak stays far below the cap's headroom.
    assert int(reports["peak"]["message"]) < 2 * HEADROOM


@pytest.mark.timeout(240)
def test_bomb_jobs_fail_with_the_reason(tmp_path: Path, scp_process: Callable[..., ScpProcess]) -> None:
    settings: Settings = migrate(tmp_path / "var", None)
    scp = scp_process(settings).start()
    paths = {name: path for name, path in pixel_bombs(tmp_path).items() if name != "native 1024"}
    sends = []
    for name, path in paths.items():
        ds = dcmread(path, stop_before_pixels=True)
        sends.append((name, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID), path))
    sender = RawSender(scp.port, [(sop_class, syntax) for _, sop_class, _, syntax, _ in sends], timeout=60)
    try:
        for name, sop_class, sop_instance, syntax, path in sends:
            status = sender.send(sop_class, sop_instance, syntax, dataset_of(path.read_bytes()))
            assert status == 0x0000, f"{name}: the SCP answered {status}; a bomb is a valid structure, stored as sent"
    finally:
        sender.close()
    assert scp.process is not None and scp.process.poll() is None
    engine = make_engine(settings)
    factory = make_session_factory(engine)
    try:
        with factory() as session, session.begin():
            series_ids = list(session.scalars(select(Series.id)))
            job_ids = [queries.create_job(session, series_id, MODEL, "1") for series_id in series_ids]
        assert len(job_ids) == len(paths) and None not in job_ids
        reports = _run_capped("jobs", str(settings.data_path), *(str(job_id) for job_id in job_ids))
        with factory() as session:
            jobs = {job.id: (job.state, job.error, job.attempts) for job in session.scalars(select(Job))}
    finally:
        engine.dispose()
    for job_id in job_ids:
        assert job_id is not None
        assert reports[str(job_id)] == {"outcome": "returned", "message": "'failed'"}, reports[str(job_id)]
        state, error, attempts = jobs[job_id]
        assert state == JobState.failed and attempts == 1, (state, attempts)
        assert error is not None and error.startswith("InvalidInput: ") and REFUSED in error, error
