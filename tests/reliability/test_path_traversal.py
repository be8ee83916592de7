"""Row 20 of issue 5: UIDs that try to name a path never write outside the data folder.

Hostile values (``../../x``, ``/``, a NUL followed by ``../../x``, 200 characters, ``..``) in the
SOP Instance, Series and Study Instance UIDs and in the command's Affected SOP Class/Instance UID,
sent to a real ``python -m service.scp`` process; and the same values in STOW-RS parts (File Meta
Information and dataset) and in the study of ``POST /dicomweb/studies/{study}``, sent to a real
``infergate api`` on a raw socket (so that no client tidies the path). GET path parameters are row
24's (``test_rest_abuse.py``).

Each case is refused (0xC210; an A-ABORT from pynetdicom, before any handler runs, for a command
whose SOP Class UID names no service or whose UID exceeds 64 characters; STOW-RS 0xC000 per part,
or 4xx for a hostile path), and the folder that
holds the data folder has no new file or folder outside the data folder afterwards; inside it, only
the one valid instance sent last is stored.
"""

from __future__ import annotations

import copy
import json
import socket
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from infergate.config import Settings
from infergate.dicomweb.multipart import build_multipart, multipart_content_type
from tests.data.make_series import write_ct_series
from tests.helpers.node import NodeProcess, node_env, wait_for_http
from tests.helpers.peers import LOOPBACK, free_port
from tests.helpers.raw_store import RawSender
from tests.reliability.scp_harness import ScpProcess, migrate, stored_instances

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length"),
]

HOSTILE = {
    "dot-dot": "../../x",
    "slash": "/",
    "nul": "1.2.3\x00../../x",
    "200 characters": "1." + "2" * 198,
    "parent": "..",
    "absolute": "/tmp/x",
}
CANNOT_UNDERSTAND = 0xC210
STOW_CANNOT_UNDERSTAND = 0xC000
FAST = 2.0


def _tree(folder: Path) -> set[Path]:
    """Every file and folder below ``folder`` (hidden ones included)."""
    return set(folder.rglob("*"))


def _assert_nothing_outside(parent: Path, data_dir: Path, before: set[Path]) -> None:
    new = _tree(parent) - before
    outside = sorted(str(p.relative_to(parent)) for p in new if not p.is_relative_to(data_dir))
    assert outside == [], f"written outside the data folder: {outside}"
    assert not any(p.name == "x" for p in _tree(parent.parent)), "a file named after a hostile UID exists"


def _encode(ds: Dataset) -> bytes:
    """The dataset in Explicit VR Little Endian, values as they are (hostile UIDs included)."""
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = False, True
    write_dataset(buffer, ds)
    return buffer.getvalue()


@pytest.fixture
def template(tmp_path: Path) -> Dataset:
    info = write_ct_series(tmp_path / "source", slices=1, size=16, seed=20)
    return dcmread(info.paths[0])


# --- the SCP ----------------------------------------------------------------------------------------


def _scp_cases(template: Dataset) -> list[tuple[str, str, str, bytes]]:
    """(label, command SOP Class UID, command SOP Instance UID, dataset bytes) per hostile value and place."""
    cases: list[tuple[str, str, str, bytes]] = []
    for name, value in HOSTILE.items():
        for place in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            ds = copy.deepcopy(template)
            setattr(ds, place, value)
            command_instance = value if place == "SOPInstanceUID" else str(template.SOPInstanceUID)
            cases.append((f"{name} in {place}", CTImageStorage, command_instance, _encode(ds)))
        # the command alone: the dataset is valid
        cases.append((f"{name} in AffectedSOPInstanceUID", CTImageStorage, value, _encode(template)))
        cases.append((f"{name} in AffectedSOPClassUID", value, str(template.SOPInstanceUID), _encode(template)))
    return cases


@pytest.mark.timeout(180)
def test_hostile_uids_over_dimse_write_nothing_outside(
    tmp_path: Path, scp_process: Callable[..., ScpProcess], template: Dataset
) -> None:
    parent = tmp_path / "node"
    settings: Settings = migrate(parent / "var", None)
    scp = scp_process(settings).start()
    cases = _scp_cases(template)
    aborts = {
        label for label, sop_class, sop_instance, _ in cases if sop_class != CTImageStorage or len(sop_instance) > 64
    }
    before = _tree(parent)
    sender = RawSender(scp.port, [(CTImageStorage, ExplicitVRLittleEndian)])
    answers: dict[str, int | None] = {}
    try:
        for label, sop_class, sop_instance, data in cases:
            started = time.monotonic()
            answers[label] = sender.send(sop_class, sop_instance, ExplicitVRLittleEndian, data, abstract=CTImageStorage)
            assert time.monotonic() - started < FAST, f"{label}: answered after {time.monotonic() - started:.1f} s"
        # the SCP still serves, and stores a valid instance where it belongs
        control = sender.send(CTImageStorage, str(template.SOPInstanceUID), ExplicitVRLittleEndian, _encode(template))
    finally:
        sender.close()
    for label, status in answers.items():
        if status is None:
            # pynetdicom aborts the association before any handler runs when it cannot decode the
            # command (a UID over 64 characters) or knows no service for its SOP Class UID
            assert label in aborts, f"{label}: no answer"
        else:
            assert status == CANNOT_UNDERSTAND, f"{label}: 0x{status:04X}"
    assert control == 0x0000
    assert scp.process is not None and scp.process.poll() is None
    _assert_nothing_outside(parent, settings.data_path, before)
    rows = stored_instances(settings)
    assert list(rows) == [str(template.SOPInstanceUID)]
    stored = [p for p in _tree(settings.instances_dir) if p.is_file()]
    assert stored == [rows[str(template.SOPInstanceUID)].path]
    assert stored[0].resolve().is_relative_to(settings.instances_dir.resolve())


# --- STOW-RS ----------------------------------------------------------------------------------------


def _part10(ds: Dataset, *, meta_instance: str | None = None) -> bytes:
    """A Part 10 file whose File Meta Information names ``meta_instance`` (default: the dataset's)."""
    meta = Dataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = meta_instance if meta_instance is not None else ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    buffer = BytesIO()
    buffer.write(bytes(128) + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=False)  # type: ignore[arg-type]
    return buffer.getvalue() + _encode(ds)


def _post(port: int, path: str, files: list[bytes]) -> tuple[int, dict[str, Any], float]:
    """A STOW-RS request on a raw socket: the path reaches the node byte for byte."""
    body, boundary = build_multipart([("application/dicom", f) for f in files])
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {LOOPBACK}:{port}",
        "Connection: close",
        f"Content-Type: {multipart_content_type('application/dicom', boundary)}",
        "Accept: application/dicom+json",
        f"Content-Length: {len(body)}",
    ]
    started = time.monotonic()
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    elapsed = time.monotonic() - started
    status_line, _, rest = raw.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    try:
        parsed = json.loads(payload) if payload.strip()[:1] in (b"{", b"[") else {}
    except ValueError:
        parsed = {}
    return int(status_line.split()[1]), parsed, elapsed


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[int, Settings, Path]]:
    parent = tmp_path / "node"
    settings = migrate(parent / "var", None)
    port = free_port()
    env = node_env(data_dir=settings.data_path, api_host=LOOPBACK, api_port=port)
    process = NodeProcess(["api"], env, tmp_path / "api.log").start()
    try:
        wait_for_http(f"http://{LOOPBACK}:{port}/health", timeout=60)
        yield port, settings, parent
    finally:
        process.stop()


_HOSTILE_PATHS = {
    "encoded dot-dot": "..%2F..%2Fx",
    "encoded slash": "%2F",
    "dot-dot": "../../x",
    "encoded dots": "%2e%2e%2f%2e%2e%2fx",
    "parent": "..",
    "nul": "1.2.3%00",
    "nul then dot-dot": "1.2.3%00..%2F..%2Fx",
    "200 characters": "1." + "2" * 198,
}
_FAILED, _REASON = "00081198", "00081197"


def _reasons(body: dict[str, Any]) -> list[int]:
    return [item[_REASON]["Value"][0] for item in body.get(_FAILED, {}).get("Value", [])]


@pytest.mark.timeout(180)
def test_hostile_uids_over_stow_write_nothing_outside(api: tuple[int, Settings, Path], template: Dataset) -> None:
    port, settings, parent = api
    before = _tree(parent)
    valid = _part10(template)
    # hostile study in the path, with a valid instance in the body
    for name, study in _HOSTILE_PATHS.items():
        status, body, elapsed = _post(port, f"/dicomweb/studies/{study}", [valid])
        # 4xx, or 307 where Starlette redirects ".../studies//" to the collection (nothing stored)
        assert 400 <= status < 500 or status == 307, f"{name}: {status} {body}"
        assert elapsed < FAST
    # hostile UIDs in the parts, one request per value; every part fails, none is stored
    for name, value in HOSTILE.items():
        parts = []
        for place in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            ds = copy.deepcopy(template)
            setattr(ds, place, value)
            parts.append(_part10(ds))
        parts.append(_part10(template, meta_instance=value))  # the File Meta Information alone
        for path in ("/dicomweb/studies", f"/dicomweb/studies/{template.StudyInstanceUID}"):
            status, body, elapsed = _post(port, path, parts)
            assert status == 409, f"{name} to {path}: {status} {body}"
            reasons = _reasons(body)
            assert len(reasons) == len(parts), f"{name}: {body}"
            assert set(reasons) == {STOW_CANNOT_UNDERSTAND}, f"{name}: {reasons}"
            assert elapsed < FAST
    status, _, _ = _post(port, f"/dicomweb/studies/{template.StudyInstanceUID}", [valid])
    assert status == 200
    _assert_nothing_outside(parent, settings.data_path, before)
    rows = stored_instances(settings)
    assert list(rows) == [str(template.SOPInstanceUID)]
    stored = [p for p in _tree(settings.instances_dir) if p.is_file()]
    assert stored == [rows[str(template.SOPInstanceUID)].path]
