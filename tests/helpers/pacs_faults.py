"""PACS that fail in chosen ways, for the export reliability tests (loopback only).

* :class:`RejectingPACS` answers every A-ASSOCIATE-RQ with an A-ASSOCIATE-RJ of a chosen result
  (1 rejected-permanent, 2 rejected-transient), source and reason, and counts the associations asked for.
* :class:`ForwardingPACS` is a pynetdicom storage SCP in front of a real Orthanc: each C-STORE is stored in
  Orthanc (``POST /instances``) before it is answered, and a hook runs between Orthanc's Success and the
  C-STORE response, which is where a test injects a crash of the sender.
* :func:`stop_process_group` freezes a process group (SIGSTOP) and waits until every member is stopped.

The statuses of :class:`tests.helpers.storage_scp.StorageSCP` cover the failure statuses (0xA900, 0xC000).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.transport import ThreadedAssociationServer

from tests.helpers.peers import LOOPBACK, Orthanc, free_port

__all__ = ["ForwardingPACS", "RejectingPACS", "stop_process_group"]


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        data += chunk
    return data


@dataclass
class RejectingPACS:
    """Rejects every association with A-ASSOCIATE-RJ (``result``, ``source``, ``reason``), PS3.8 9.3.4.

    ``associations`` holds the monotonic time of every A-ASSOCIATE-RQ received.
    """

    ae_title: str
    result: int
    source: int
    reason: int
    port: int = field(default_factory=free_port)
    associations: list[float] = field(default_factory=list)
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None

    def start(self) -> RejectingPACS:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, self.port))
        sock.listen(8)
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name=f"reject-{self.ae_title}", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        sock = self._sock
        while sock is not None and self._sock is sock:
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    pdu_type, _, length = struct.unpack(">BBI", _read_exactly(conn, 6))
                    _read_exactly(conn, length)
                except (OSError, ConnectionError, struct.error):
                    continue
                if pdu_type != 0x01:  # not an A-ASSOCIATE-RQ
                    continue
                self.associations.append(time.monotonic())
                conn.sendall(struct.pack(">BBIBBBB", 0x03, 0, 4, 0, self.result, self.source, self.reason))
                try:
                    conn.recv(1)  # let the requestor close first
                except OSError:
                    pass

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@{LOOPBACK}:{self.port}"


@dataclass
class ForwardingPACS:
    """A storage SCP that stores every object in ``orthanc`` before answering it.

    ``after_store(sop_instance_uid)`` runs once Orthanc has stored the object and before the C-STORE
    response is sent; ``answered`` is set each time a response has been written to the socket after it.
    ``received`` lists the SOP Instance UIDs of every C-STORE, in order, repeats included.
    """

    orthanc: Orthanc
    ae_title: str = "PACS"
    port: int = field(default_factory=free_port)
    after_store: Callable[[str], None] | None = None
    received: list[str] = field(default_factory=list)
    answered: threading.Event = field(default_factory=threading.Event)
    _answering: bool = False
    _server: ThreadedAssociationServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _on_store(self, event: Event) -> int:
        uid = str(event.dataset.SOPInstanceUID)
        with self._lock:
            self.received.append(uid)
        answer = json.loads(self.orthanc.request("POST", "/instances", event.encoded_dataset(), "application/dicom"))
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            return 0xA700
        if self.after_store is not None:
            self.after_store(uid)
        self._answering = True
        return 0x0000

    def _on_pdu_sent(self, event: Event) -> None:
        if self._answering and isinstance(event.pdu, P_DATA_TF):
            self._answering = False
            self.answered.set()

    def start(self) -> ForwardingPACS:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(
            (LOOPBACK, self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_PDU_SENT, self._on_pdu_sent)],
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@{LOOPBACK}:{self.port}"


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        if int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _state(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def stop_process_group(pgid: int, timeout: float = 5.0) -> None:
    """SIGSTOP every process of group ``pgid`` and wait until the kernel shows each one stopped.

    Raises
    ------
    TimeoutError
        If a member was still running after ``timeout`` seconds.
    """
    os.killpg(pgid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        running = [pid for pid in _group_members(pgid) if _state(pid) not in ("T", "t", "X", "Z")]
        if not running:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes {running} of group {pgid} did not stop within {timeout} s")
        time.sleep(0.005)
