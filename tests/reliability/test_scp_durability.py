"""Never lose a study: an acknowledged instance survives a crash of the SCP (rows 1-3 of issue 5).

* Row 1: SIGKILL at random points during 100 stores, and right after Success answers.
* Row 2: SIGKILL while a large multi-frame streams in.
* Row 3: under strace, the file's fsync, its folder's fsync and the SQL commit precede each C-STORE-RSP.

Each runs on SQLite (embedded) and on PostgreSQL (production), against ``python -m service.scp``.
"""

from __future__ import annotations

import random
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy.engine import make_url

from infergate.config import Settings
from tests.data.make_series import write_ct_series
from tests.helpers.peers import run_storescu
from tests.reliability.scp_harness import (
    SUCCESS,
    ScpProcess,
    Sender,
    assert_consistent,
    files_under,
    stored_instances,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("verbatim_sends")]

#: Fixed so that a failing run can be compared with the next one; the kill times also depend on timing.
SEED = 20261203


# --- Row 1 ------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_sigkill_at_random_points_loses_no_acknowledged_instance(
    db_settings: Settings, scp_process: Callable[..., ScpProcess], tmp_path: Path
) -> None:
    series = write_ct_series(tmp_path / "ct", slices=100, size=64, seed=1)
    scp = scp_process(db_settings).start()
    sender_rng, killer_rng = random.Random(SEED), random.Random(SEED + 1)
    acknowledged: dict[str, Path] = {}
    kills = {"during a store": 0, "right after a Success": 0}
    progress = {"attempts": 0, "store_seconds": 0.01}  # written by the sender, read by the killer
    done = threading.Event()

    def killer() -> None:
        # Let each life of the SCP start 2-16 stores, then kill at a random point of the last
        # one (receiving, decoding, writing, fsyncing, committing, answering) or just after it.
        while not done.is_set():
            base, target = progress["attempts"], killer_rng.randint(2, 16)
            while progress["attempts"] - base < target and not done.is_set():
                time.sleep(0.001)
            if done.wait(killer_rng.uniform(0.0, 1.5 * progress["store_seconds"])):
                return
            scp.restart()
            kills["during a store"] += 1

    thread = threading.Thread(target=killer, name="killer", daemon=True)
    thread.start()
    sender = Sender(scp.port, response_timeout=1.0)
    deadline = time.monotonic() + 200
    try:
        for path, uid in zip(series.paths, series.sop_instance_uids, strict=True):
            while uid not in acknowledged:
                assert time.monotonic() < deadline, f"only {len(acknowledged)} of 100 acknowledged in time: {kills}"
                progress["attempts"] += 1
                began = time.monotonic()
                status = sender.store(path)
                if status == SUCCESS:
                    acknowledged[uid] = path
                    progress["store_seconds"] = 0.8 * progress["store_seconds"] + 0.2 * (time.monotonic() - began)
                    if sender_rng.random() < 0.06:
                        scp.restart()
                        kills["right after a Success"] += 1
                elif status is None:  # the SCP died: reconnect, re-send what was not acknowledged
                    sender.connect()
                else:
                    pytest.fail(f"a crash should cost an answer, never give status {status:#06x}")
    finally:
        done.set()
        thread.join(timeout=60)
        sender.close()
    scp.kill()  # inspect the store as a crash leaves it
    assert len(acknowledged) == 100
    assert kills["during a store"] >= 5 and kills["right after a Success"] >= 1, f"too few kills: {kills}"
    assert_consistent(db_settings, acknowledged)


# --- Row 2 ------------------------------------------------------------------------------------------


def write_multiframe(path: Path, *, frames: int, size: int, seed: int = 0) -> str:
    """A large Enhanced CT multi-frame (uncompressed, noise); returns its SOP Instance UID."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"multiframe-{seed}"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[f"multiframe-study-{seed}"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"multiframe-series-{seed}"])
    ds.Modality = "CT"
    ds.PatientName = "Phantom^Multiframe"
    ds.PatientID = "PHANTOM-MF"
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = size
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4096, size=(frames, size, size), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def _resident_bytes(pid: int) -> int:
    """The process's resident memory: it grows as pynetdicom buffers an incoming dataset."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/<pid>/status")


@pytest.mark.timeout(240)
def test_sigkill_mid_dataset_leaves_nothing_and_a_resend_works(
    db_settings: Settings, scp_process: Callable[..., ScpProcess], tmp_path: Path
) -> None:
    big = tmp_path / "multiframe.dcm"
    uid = write_multiframe(big, frames=256, size=512)  # 128 MiB
    size = big.stat().st_size
    scp = scp_process(db_settings).start()
    resident_before = _resident_bytes(scp.pid)
    command = ["storescu", "-v", "-aet", "RELIABILITY", "-aec", "INFERGATE", "127.0.0.1", str(scp.port), str(big)]
    sender = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(
            lambda: _resident_bytes(scp.pid) - resident_before > size // 3,
            timeout=60,
            what="a third of the dataset",
            interval=0.002,
        )
        streamed = _resident_bytes(scp.pid) - resident_before
        scp.kill()
        output, _ = sender.communicate(timeout=60)
    finally:
        if sender.poll() is None:
            sender.kill()
    assert streamed < size, "the dataset had fully arrived before the kill"
    assert "Received Store Response (Success)" not in output, output
    assert sender.returncode != 0, output
    assert stored_instances(db_settings) == {}
    # Nothing in the instance tree, and no partial or temporary file anywhere in the data folder
    # (the database, broker and audit files of the node are not instances).
    leftovers = {
        path
        for path in files_under(db_settings.data_path)
        if path.is_relative_to(db_settings.instances_dir) or path.suffix in (".dcm", ".tmp") or path.name[0] == "."
    }
    assert leftovers == set(), f"left behind: {sorted(str(p) for p in leftovers)}"

    scp.start()
    resent = run_storescu([big], port=scp.port, aet="RELIABILITY", extra_args=["-v"], timeout=120)
    assert resent.returncode == 0 and "Received Store Response (Success)" in resent.stderr + resent.stdout, (
        resent.stderr
    )
    assert_consistent(db_settings, {uid: big})


# --- Row 3 ------------------------------------------------------------------------------------------


@dataclass
class Syscall:
    """One system call of the strace log, with the line numbers of its start and its return."""

    tid: int
    name: str
    text: str  # the arguments and result, joined across <unfinished ...> / <... resumed>
    start: int
    end: int
    result: str = ""


_LINE = re.compile(r"^(\d+)\s+(.*)$")
_START = re.compile(r"^(\w+)\((.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_RESULT = re.compile(r"\)\s+=\s+(-?\d+|\?)(.*)$")


def parse_strace(text: str) -> list[Syscall]:
    """``strace -f -o`` output as calls in the order they started (``tid name(args) = result``)."""
    calls: list[Syscall] = []
    pending: dict[tuple[int, str], Syscall] = {}
    for number, raw in enumerate(text.splitlines()):
        match = _LINE.match(raw)
        if not match:
            continue
        tid, rest = int(match.group(1)), match.group(2)
        resumed = _RESUMED.match(rest)
        if resumed:
            call = pending.pop((tid, resumed.group(1)), None)
            if call is None:
                continue
            call.text += resumed.group(2)
        else:
            started = _START.match(rest)
            if not started:
                continue  # signals, exits
            call = Syscall(tid, started.group(1), started.group(2), number, number)
            calls.append(call)
            if rest.endswith("<unfinished ...>"):
                call.text = call.text.removesuffix("<unfinished ...>")
                pending[(tid, call.name)] = call
                continue
        call.end = number
        result = _RESULT.search(call.text)
        call.result = result.group(1) if result else ""
    return calls


def _fd_path(call: Syscall) -> str:
    """``/path`` of a call's first argument ``7</path>``."""
    match = re.match(r"\d+<(.*?)>", call.text)
    return match.group(1) if match else ""


def check_durable_before_response(
    calls: list[Syscall], uid: str, *, scp_port: int, pg_port: int | None, folder: Path
) -> None:
    """The order for one instance: file fsync, link, folder fsync, commit, then the C-STORE-RSP."""
    links = [c for c in calls if c.name in ("linkat", "link") and f'"{uid}.dcm"' in c.text and c.result == "0"]
    assert len(links) == 1, f"{uid}: {len(links)} successful links"
    link = links[0]
    fd = re.search(r'"/proc/self/fd/(\d+)"', link.text)
    assert fd is not None, f"{uid}: not linked from an unnamed file: {link.text}"
    file_fsyncs = [
        c
        for c in calls
        if c.tid == link.tid
        and c.name in ("fsync", "fdatasync")
        and c.text.startswith(f"{fd.group(1)}<")
        and c.end < link.start
        and c.result == "0"
    ]
    assert file_fsyncs, f"{uid}: the file was not fsync'd before it got its name"
    folder_fsyncs = [
        c
        for c in calls
        if c.tid == link.tid and c.name == "fsync" and _fd_path(c) == str(folder) and c.start > link.end
    ]
    assert folder_fsyncs, f"{uid}: the folder was not fsync'd after the link"
    folder_fsync = folder_fsyncs[0]
    if pg_port is None:
        commits = [
            c
            for c in calls
            if c.tid == link.tid
            and c.name in ("fsync", "fdatasync")
            and _fd_path(c).endswith("infergate.db-wal")
            and c.start > folder_fsync.end
        ]
        assert commits, f"{uid}: no fsync of SQLite's WAL (the commit) after the folder's"
        committed = commits[0].end
    else:
        sends = [
            c
            for c in calls
            if c.tid == link.tid
            and c.name == "sendto"
            and f":{pg_port}]>" in c.text
            and "COMMIT" in c.text
            and c.start > folder_fsync.end
        ]
        assert sends, f"{uid}: no COMMIT sent to PostgreSQL after the folder's fsync"
        socket = sends[0].text.split(",", 1)[0]
        replies = [
            c
            for c in calls
            if c.tid == link.tid
            and c.name == "recvfrom"
            and c.text.startswith(socket)
            and "COMMIT" in c.text
            and c.start > sends[0].end
        ]
        assert replies, f"{uid}: PostgreSQL's reply to COMMIT was not read"
        committed = replies[0].end
    responses = [
        c
        for c in calls
        if c.name == "sendto" and f"TCP:[127.0.0.1:{scp_port}->" in c.text and uid in c.text and c.start > link.end
    ]
    assert responses, f"{uid}: no C-STORE-RSP found"
    response = responses[0]
    assert file_fsyncs[-1].end < link.start, f"{uid}: the file got its name before its fsync returned"
    assert link.end < folder_fsync.start, f"{uid}: the folder was fsync'd before the link"
    assert folder_fsync.end < committed, f"{uid}: the commit came before the folder's fsync"
    assert committed < response.start, f"{uid}: the C-STORE-RSP was sent before the commit was durable"


@pytest.mark.timeout(240)
def test_file_folder_and_commit_are_durable_before_each_response(
    db_settings: Settings, scp_process: Callable[..., ScpProcess], tmp_path: Path
) -> None:
    series = write_ct_series(tmp_path / "ct", slices=50, size=64, seed=3)
    trace = tmp_path / "scp.strace"
    scp = scp_process(db_settings, strace_log=trace).start()
    sender = Sender(scp.port)
    try:
        statuses = [sender.store(path) for path in series.paths]
    finally:
        sender.close()
    scp.stop()
    assert statuses == [SUCCESS] * 50
    url = db_settings.database_url
    pg_port = make_url(url).port or 5432 if url else None
    calls = parse_strace(trace.read_text(errors="replace"))
    folder = db_settings.instances_dir / series.study_uid / series.series_uid
    for uid in series.sop_instance_uids:
        check_durable_before_response(calls, uid, scp_port=scp.port, pg_port=pg_port, folder=folder)
    assert_consistent(db_settings, dict(zip(series.sop_instance_uids, series.paths, strict=True)))
