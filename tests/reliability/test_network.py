"""The SCP against hostile or broken peers (issue 5, rows 4b, 17, 18 and 22), each bounded in time.

The SCP runs as a real ``infergate scp`` process on loopback; raw sockets play the broken peers
(``tests/helpers/dul.py`` writes their PDUs byte by byte), DCMTK and pynetdicom the well-behaved ones. A
flood comes from 127.0.0.2 and the well-behaved senders from 127.0.0.1, so that "other senders are
unaffected" is checked with the per-address limits in force.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select

from infergate.config import Settings
from infergate.dicom.receive import StoreContext
from infergate.ingest import InstanceHeader, ingest_instance
from infergate.store.migrate import upgrade
from infergate.store.session import make_engine, make_session_factory
from infergate.store.tables import Instance
from service.scp.ae import start_server
from tests.data.make_series import write_ct_series
from tests.helpers.dul import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    ScpProcess,
    associate_rq,
    connect,
    descriptions,
    p_data,
    pdu_header,
    read_pdu,
    reject_codes,
    release_rq,
    wait_closed,
)
from tests.helpers.peers import LOOPBACK, free_port, run_echoscu, run_storescu

pytestmark = pytest.mark.integration

FLOOD_HOST = "127.0.0.2"
TIMEOUT = 3.0  # the SCP's ACSE and network timeouts in these tests
MAX_ASSOCIATIONS, PER_HOST = 8, 4
MAX_PDU = 16384
CALLING_AES = "STORESCU,ECHOSCU,RAW,FLOOD"


@pytest.fixture(scope="module")
def scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScpProcess]:
    process = ScpProcess.start(
        tmp_path_factory.mktemp("scp"),
        allowed_calling_aes=CALLING_AES,
        scp_allowed_networks="127.0.0.1,127.0.0.2/32",
        scp_max_associations=MAX_ASSOCIATIONS,
        scp_max_associations_per_host=PER_HOST,
        scp_acse_timeout_seconds=TIMEOUT,
        scp_network_timeout_seconds=TIMEOUT,
        scp_dimse_timeout_seconds=10,
        max_pdu=MAX_PDU,
        min_free_bytes=1,
    )
    try:
        yield process
    finally:
        process.stop()
        if not process.alive():
            print(process.process.log_text()[-6000:])  # noqa: T201 - shown when a test failed


def _settle(scp: ScpProcess, threads: int, timeout: float = 3 * TIMEOUT + 10) -> int:
    """Wait until the SCP's thread count is back to ``threads`` (+2); returns the count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if scp.threads() <= threads + 2:
            break
        time.sleep(0.2)
    return scp.threads()


def _pynetdicom_echo(port: int, *, calling: str, called: str = "INFERGATE", source: str = LOOPBACK) -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = 10
    assoc = ae.associate(LOOPBACK, port, ae_title=called, bind_address=(source, 0))
    if assoc.is_established:
        assoc.release()
    return assoc


def _rejection(assoc: Any) -> tuple[int, int, int]:
    assert assoc.is_rejected, "the association was not rejected"
    primitive = assoc.acceptor.primitive
    return primitive.result, primitive.result_source, primitive.diagnostic


# Row 22: unknown AE or address --------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_unknown_calling_ae_called_ae_or_address_is_rejected_stores_nothing_and_is_audited(
    scp: ScpProcess, tmp_path: Path
) -> None:
    before = len(scp.audit())
    assert _rejection(_pynetdicom_echo(scp.port, calling="INTRUDER")) == (1, 1, 3)
    assert _rejection(_pynetdicom_echo(scp.port, calling="ECHOSCU", called="NOT-US")) == (1, 1, 7)
    assert _rejection(_pynetdicom_echo(scp.port, calling="ECHOSCU", source="127.0.0.3")) == (1, 1, 1)

    info = write_ct_series(tmp_path / "ct", slices=3, size=32, seed=22)
    sent = run_storescu(info.folder, port=scp.port, aet="INTRUDER", timeout=60)
    assert sent.returncode != 0
    assert "Association Rejected" in sent.stderr or "rejected" in sent.stderr.lower(), sent.stderr
    assert not (scp.data_dir / "instances" / info.study_uid).exists()
    engine = make_engine(Settings(data_dir=scp.data_dir))
    with make_session_factory(engine)() as session:
        uids = set(session.scalars(select(Instance.sop_instance_uid)).all())
    assert not uids & set(info.sop_instance_uids)
    engine.dispose()

    records = scp.audit()[before:]
    rejected = [
        r for r in records if "association rejected" in r["EventIdentification"].get("EventOutcomeDescription", "")
    ]
    reasons = " | ".join(descriptions(rejected))
    assert len(rejected) == 4, reasons
    assert reasons.count("calling AE title not allowed") == 2
    assert "called AE title not recognised" in reasons and "'NOT-US'" in reasons
    assert "peer address not allowed" in reasons
    for record in rejected:
        event = record["EventIdentification"]
        assert event["EventID"]["csd-code"] == "110114" and event["EventOutcomeIndicator"] == 4
        assert event["EventTypeCode"][0]["csd-code"] == "110122"
        requestor = record["ActiveParticipant"][0]
        assert requestor["UserIsRequestor"] is True and requestor["NetworkAccessPointTypeCode"] == "2"
        assert requestor["NetworkAccessPointID"] in ("127.0.0.1", "127.0.0.3")
    assert {r["ActiveParticipant"][0]["UserID"] for r in rejected} == {"INTRUDER", "ECHOSCU"}
    assert "Phantom" not in scp.audit_log.read_text()  # the patient's name never reaches the audit log


@pytest.mark.timeout(60)
def test_a_stored_study_is_audited_once_per_association(scp: ScpProcess, tmp_path: Path) -> None:
    before = len(scp.audit())
    info = write_ct_series(tmp_path / "ct", slices=4, size=32, seed=104)
    sent = run_storescu(info.folder, port=scp.port, timeout=60)
    assert sent.returncode == 0, sent.stderr
    time.sleep(0.3)  # the Logout is written as the association thread ends
    records = [r for r in scp.audit()[before:] if r["ActiveParticipant"][0]["UserID"] == "STORESCU"]
    kinds = [
        (
            r["EventIdentification"]["EventID"]["csd-code"],
            r["EventIdentification"].get("EventTypeCode", [{}])[0].get("csd-code"),
        )
        for r in records
    ]
    assert kinds == [("110114", "110122"), ("110104", None), ("110114", "110123")], kinds
    transferred = records[1]
    assert transferred["EventIdentification"]["EventActionCode"] == "C"
    assert transferred["EventIdentification"]["EventOutcomeIndicator"] == 0
    (study,) = transferred["ParticipantObjectIdentification"]
    assert study["ParticipantObjectID"] == info.study_uid
    assert study["ParticipantObjectDescription"]["SOPClass"] == [
        {"UID": "1.2.840.10008.5.1.4.1.1.2", "NumberOfInstances": 4}
    ]
    roles = [p["RoleIDCode"][0]["csd-code"] for p in transferred["ActiveParticipant"]]
    assert roles == ["110153", "110152"]  # the sender is the source, this node the destination
    assert "Phantom" not in scp.audit_log.read_text()


# Row 17: idle, slow, half-open peers ---------------------------------------------------------------------


def _established(port: int) -> socket.socket:
    sock = connect(port)
    sock.sendall(associate_rq("RAW"))
    answer = read_pdu(sock, 10)
    assert answer is not None and answer[0] == A_ASSOCIATE_AC, answer
    return sock


@pytest.mark.timeout(120)
def test_silent_half_open_and_stalled_peers_are_timed_out_and_freed(scp: ScpProcess) -> None:
    threads = scp.threads()
    peers: dict[str, socket.socket] = {}
    peers["silent"] = connect(scp.port)  # TCP connection, nothing sent
    peers["half A-ASSOCIATE-RQ"] = connect(scp.port)
    rq = associate_rq("RAW")
    peers["half A-ASSOCIATE-RQ"].sendall(rq[: len(rq) // 2])
    peers["stalled P-DATA-TF"] = _established(scp.port)
    peers["stalled P-DATA-TF"].sendall(pdu_header(0x04, 1000) + b"\x00" * 100)  # 100 of 1000 bytes, then silence
    peers["idle association"] = _established(scp.port)
    peers["stalled PDU header"] = _established(scp.port)
    peers["stalled PDU header"].sendall(b"\x04\x00\x00")  # half of a PDU header

    # Another sender is served while they all hang.
    echo = run_echoscu(scp.port, "INFERGATE", timeout=30)
    assert echo.returncode == 0, echo.stderr

    closed_after: dict[str, float | None] = {}
    waiters = [
        threading.Thread(target=lambda n=name, s=sock: closed_after.__setitem__(n, wait_closed(s, 3 * TIMEOUT + 10)))
        for name, sock in peers.items()
    ]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join()
    for sock in peers.values():
        sock.close()
    for name, seconds in closed_after.items():
        # each is closed by the SCP within its timeout (ARTIM, socket or idle timer) plus scheduling slack
        assert seconds is not None and seconds < 2 * TIMEOUT + 3, (name, closed_after)
    assert _settle(scp, threads) <= threads + 2, "association threads were not freed"
    assert scp.alive()


# Row 17: association flood -------------------------------------------------------------------------------


def _flood(port: int, count: int, *, with_request: bool) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((FLOOD_HOST, 0))
        sock.settimeout(10)
        sock.connect((LOOPBACK, port))
        socks.append(sock)
    if with_request:
        rq = associate_rq("FLOOD")
        for sock in socks:
            try:
                sock.sendall(rq)
            except OSError:
                pass  # already refused
    return socks


def _outcomes(socks: list[socket.socket], timeout: float) -> Counter[str]:
    """What each flood connection got: AC, RJ r/s/d, closed (no PDU) or silence."""
    outcomes: Counter[str] = Counter()
    selector = selectors.DefaultSelector()
    buffers: dict[socket.socket, bytearray] = {}
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        buffers[sock] = bytearray()
    deadline = time.monotonic() + timeout
    while buffers and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.2):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                chunk = sock.recv(4096)
            except (ConnectionResetError, BlockingIOError):
                chunk = b""
            buffer = buffers[sock]
            buffer += chunk
            if len(buffer) >= 6 or not chunk:
                if len(buffer) >= 10 and buffer[0] == A_ASSOCIATE_RJ:
                    outcomes["RJ " + "/".join(map(str, reject_codes(bytes(buffer[6:10]))))] += 1
                elif len(buffer) >= 6 and buffer[0] == A_ASSOCIATE_AC:
                    outcomes["AC"] += 1
                elif not chunk:
                    outcomes["closed"] += 1
                else:
                    continue
                selector.unregister(sock)
                del buffers[sock]
    outcomes["no answer"] += len(buffers)
    selector.close()
    return outcomes


@pytest.mark.timeout(180)
def test_association_flood_gets_transient_rejects_memory_stays_bounded_and_others_are_served(
    scp: ScpProcess, tmp_path: Path
) -> None:
    threads, rss = scp.threads(), scp.rss_kib()
    info = write_ct_series(tmp_path / "ct", slices=5, size=32, seed=17)
    requesting = _flood(scp.port, 100, with_request=True)
    silent = _flood(scp.port, 100, with_request=False)
    try:
        outcomes = _outcomes(requesting, timeout=20)
        # The flood got at most the per-address limit of associations; the rest were rejected as transient.
        assert outcomes["AC"] <= PER_HOST, outcomes
        assert outcomes["RJ 2/3/2"] >= 80, outcomes
        assert set(outcomes) <= {"AC", "RJ 2/3/2", "closed", "no answer"}, outcomes
        assert outcomes["no answer"] == 0, outcomes
        peak_threads, peak_rss = scp.threads(), scp.rss_kib()

        # While the flood holds its associations and sockets, a sender from another address is served.
        sent = run_storescu(info.folder, port=scp.port, timeout=60)
        assert sent.returncode == 0, sent.stderr
        assert len(list((scp.data_dir / "instances" / info.study_uid).rglob("*.dcm"))) == 5
    finally:
        for sock in silent + requesting:
            sock.close()
    assert peak_threads <= threads + 4 * 2 * PER_HOST + 8, (threads, peak_threads)
    assert peak_rss - rss < 64 * 1024, f"RSS grew by {(peak_rss - rss) // 1024} MiB"
    assert _settle(scp, threads) <= threads + 2

    # Refusals are audited, and rate-limited per address: the flood cannot fill the disk with records.
    flood = [r for r in scp.audit() if r["ActiveParticipant"][0].get("NetworkAccessPointID") == FLOOD_HOST]
    assert 1 <= len(flood) <= 3 * 20 + 2 * PER_HOST + 4, len(flood)
    assert any("association rejected (transient): association limit reached" in d for d in descriptions(flood))
    assert any("connection refused: connection limit per address" in d for d in descriptions(flood))
    assert run_echoscu(scp.port, "INFERGATE", timeout=30).returncode == 0


# Row 18: oversized and malformed PDUs --------------------------------------------------------------------


def _stream(sock: socket.socket, total: int) -> int:
    """Send up to ``total`` junk bytes until the peer stops reading; returns the bytes sent."""
    chunk, sent = b"\xa5" * 65536, 0
    sock.settimeout(5)
    try:
        while sent < total:
            sent += sock.send(chunk)
    except OSError:
        pass
    return sent


def _ends_in_abort_or_close(sock: socket.socket) -> str:
    answer = read_pdu(sock, 3 * TIMEOUT)
    if answer is None:
        return "closed"
    assert answer[0] == A_ABORT, f"expected A-ABORT, got PDU type {answer[0]:#x}"
    assert wait_closed(sock, 3 * TIMEOUT) is not None
    return "A-ABORT"


class _RssProbe:
    """Samples the SCP's RSS every 20 ms while a case runs; ``peak`` in KiB."""

    def __init__(self, scp: ScpProcess) -> None:
        self.scp, self.peak, self._stop = scp, scp.rss_kib(), threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.scp.rss_kib())
            time.sleep(0.02)

    def __enter__(self) -> _RssProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.timeout(180)
def test_oversized_and_malformed_pdus_are_aborted_with_memory_bounded(scp: ScpProcess) -> None:
    baseline = scp.rss_kib()
    results: dict[str, str] = {}
    with _RssProbe(scp) as probe:
        # 1. A peer that says it can receive 4 GiB PDUs, then declares a 4 GiB P-DATA-TF and streams 64 MiB.
        sock = connect(scp.port)
        sock.sendall(associate_rq("RAW", max_length=0xFFFFFFFF))
        assert (answer := read_pdu(sock, 10)) is not None and answer[0] == A_ASSOCIATE_AC
        sock.sendall(pdu_header(0x04, 0xFFFFFFFF))
        _stream(sock, 64 * 1024 * 1024)
        results["P-DATA-TF of 2^32-1 bytes"] = _ends_in_abort_or_close(sock)
        sock.close()

        # 2. A P-DATA-TF just over the negotiated maximum (16 KiB): refused before its body is read.
        sock = _established(scp.port)
        sock.sendall(pdu_header(0x04, MAX_PDU + 4096) + b"\x00" * (MAX_PDU + 4096))
        results["P-DATA-TF over max_pdu"] = _ends_in_abort_or_close(sock)
        sock.close()

        # 3. An A-ASSOCIATE-RQ declaring 2^32-1 bytes, streaming 32 MiB.
        sock = connect(scp.port)
        sock.sendall(associate_rq("RAW", declared_length=0xFFFFFFFF))
        _stream(sock, 32 * 1024 * 1024)
        results["A-ASSOCIATE-RQ of 2^32-1 bytes"] = _ends_in_abort_or_close(sock)
        sock.close()

        # 4. An unknown PDU type.
        sock = connect(scp.port)
        sock.sendall(pdu_header(0x0F, 16) + bytes(16))
        results["unknown PDU type 0x0F"] = _ends_in_abort_or_close(sock)
        sock.close()

        # 5. An unknown PDU type inside an association.
        sock = _established(scp.port)
        sock.sendall(pdu_header(0x0F, 16) + bytes(16))
        results["unknown PDU type in an association"] = _ends_in_abort_or_close(sock)
        sock.close()

        # 6. A-ASSOCIATE-RQ whose presentation-context item claims more bytes than the PDU holds.
        sock = connect(scp.port)
        sock.sendall(associate_rq("RAW", context_item_length=0xFFF0))
        results["item length past the PDU"] = _ends_in_abort_or_close(sock)
        sock.close()

        # 7. A-ASSOCIATE-RQ whose PDU length is shorter than its items.
        sock = connect(scp.port)
        rq = associate_rq("RAW")
        sock.sendall(rq[:2] + (len(rq) - 6 - 40).to_bytes(4, "big") + rq[6:-40])
        results["items past the PDU length"] = _ends_in_abort_or_close(sock)
        sock.close()

        # 8. A P-DATA-TF whose PDV item claims more than the PDU holds.
        sock = _established(scp.port)
        pdv = (1_000_000).to_bytes(4, "big") + bytes([1, 0x03]) + b"\x00" * 32
        sock.sendall(pdu_header(0x04, len(pdv)) + pdv)
        results["PDV length past the PDU"] = _ends_in_abort_or_close(sock)
        sock.close()

    assert all(outcome in ("A-ABORT", "closed") for outcome in results.values()), results
    assert results["P-DATA-TF of 2^32-1 bytes"] == "A-ABORT", results
    assert results["P-DATA-TF over max_pdu"] == "A-ABORT", results
    # Memory stays bounded: nothing near the 64 + 32 MiB streamed, let alone the 4 GiB declared, was buffered.
    assert probe.peak - baseline < 24 * 1024, f"RSS peaked {(probe.peak - baseline) // 1024} MiB above baseline"
    assert scp.alive()
    echo = run_echoscu(scp.port, "INFERGATE", timeout=30)
    assert echo.returncode == 0, echo.stderr


@pytest.mark.timeout(60)
def test_a_well_formed_raw_association_still_works(scp: ScpProcess) -> None:
    """The raw peer is itself correct: a C-ECHO over it succeeds (so the aborts above are about the faults)."""
    sock = _established(scp.port)
    sock.sendall(p_data(1, _echo_command()))
    answer = read_pdu(sock, 10)
    assert answer is not None and answer[0] == 0x04, answer
    # the C-ECHO-RSP's Status (0000,0900) US 0x0000: tag, length 2, value 0
    assert b"\x00\x00\x00\x09\x02\x00\x00\x00\x00\x00" in answer[1], answer[1].hex()
    sock.sendall(release_rq())
    assert (reply := read_pdu(sock, 10)) is not None and reply[0] == 0x06
    sock.close()


def _echo_command() -> bytes:
    from pydicom.dataset import Dataset
    from pynetdicom.dsutils import encode

    ds = Dataset()
    ds.AffectedSOPClassUID = "1.2.840.10008.1.1"
    ds.CommandField = 0x0030
    ds.MessageID = 1
    ds.CommandDataSetType = 0x0101
    body = encode(ds, True, True)
    assert body is not None
    group_length = Dataset()
    group_length.CommandGroupLength = len(body)
    head = encode(group_length, True, True)
    assert head is not None
    return head + body


# Row 4b: free-space watermark ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_below_the_free_space_watermark_associations_are_rejected_transient_and_nothing_is_deleted(
    tmp_path: Path,
) -> None:
    from service.scp.ae import free_bytes

    data_dir = tmp_path / "node" / "var"
    settings = Settings(data_dir=data_dir)
    engine = make_engine(settings)
    upgrade(engine)
    factory = make_session_factory(engine)
    info = write_ct_series(tmp_path / "ct", slices=3, size=32)
    for path in info.paths:  # a study received earlier
        ds = dcmread(path)
        header = InstanceHeader.from_dataset(
            ds,
            sop_class_uid=ds.SOPClassUID,
            sop_instance_uid=ds.SOPInstanceUID,
            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        )
        ingest_instance(factory, settings.data_path, header, path.read_bytes(), calling_ae="CT", called_ae="INFERGATE")
    stored = sorted(settings.instances_dir.rglob("*.dcm"))
    assert len(stored) == 3

    # The watermark is 1 GiB above what the volume has free now: "storage with little free space".
    watermark = free_bytes(settings.instances_dir) + 1024**3
    scp = ScpProcess.start(tmp_path / "node", min_free_bytes=watermark)
    try:
        assert _rejection(_pynetdicom_echo(scp.port, calling="ECHOSCU")) == (2, 3, 2)
        new = write_ct_series(tmp_path / "ct2", slices=2, size=32, seed=5)
        sent = run_storescu(new.folder, port=scp.port, timeout=60)
        assert sent.returncode != 0 and "reject" in sent.stderr.lower(), sent.stderr
        assert scp.alive()
    finally:
        scp.stop()
    assert sorted(settings.instances_dir.rglob("*.dcm")) == stored  # nothing deleted, nothing new
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 3
    engine.dispose()
    rejected = [d for d in descriptions(scp.audit()) if "free-space watermark" in d]
    assert len(rejected) == 2 and all("transient" in d for d in rejected), descriptions(scp.audit())
    assert "below the free-space watermark" in scp.process.log_text()


@pytest.mark.timeout(60)
def test_free_space_falling_below_the_watermark_rejects_new_associations_only(tmp_path: Path) -> None:
    """In one running SCP: admitted while above the watermark; once free space drops, new associations get
    A-ASSOCIATE-RJ 2/3/2 while the open one carries on."""
    settings = Settings(data_dir=tmp_path / "var", scp_port=free_port(), min_free_bytes=10**9)
    engine = make_engine(settings)
    upgrade(engine)
    free = {"bytes": 5 * 10**9}
    server = start_server(
        settings,
        StoreContext(factory=make_session_factory(engine), data_root=settings.data_path),
        free_space=lambda: free["bytes"],
    )
    try:
        ae = AE(ae_title="ECHOSCU")
        ae.add_requested_context(Verification)
        open_assoc = ae.associate(LOOPBACK, settings.scp_port, ae_title="INFERGATE")
        assert open_assoc.is_established
        free["bytes"] = 10**9 - 1
        assert _rejection(_pynetdicom_echo(settings.scp_port, calling="ECHOSCU")) == (2, 3, 2)
        assert open_assoc.send_c_echo().Status == 0x0000
        open_assoc.release()
        free["bytes"] = 10**9  # back at the watermark: accepted again
        assert _pynetdicom_echo(settings.scp_port, calling="ECHOSCU").is_released
    finally:
        server.shutdown()
        engine.dispose()
