"""Raw DICOM Upper Layer peers and a real ``infergate scp`` process, for the network reliability tests.

The PDU builders write bytes by hand (PS3.8 9.3) so that a test can send exactly what a broken or hostile
peer would: truncated PDUs, wrong lengths, unknown types. :class:`ScpProcess` runs ``infergate scp
--no-watcher`` with a migrated SQLite database and a file audit log, and reads the process's memory and
thread count from ``/proc``.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infergate.config import Settings
from infergate.store.migrate import upgrade
from infergate.store.session import make_engine
from tests.helpers.node import NodeProcess, node_env
from tests.helpers.peers import LOOPBACK, free_port

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF = 0x01, 0x02, 0x03, 0x04
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x05, 0x06, 0x07


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16, b" ")


def associate_rq(
    calling: str = "RAW",
    called: str = "INFERGATE",
    *,
    max_length: int = 16384,
    abstract_syntax: str = VERIFICATION,
    declared_length: int | None = None,
    context_item_length: int | None = None,
) -> bytes:
    """An A-ASSOCIATE-RQ proposing one presentation context; lengths can be overridden to lie."""
    context_body = bytes([1, 0, 0, 0]) + _item(0x30, abstract_syntax.encode()) + _item(0x40, IMPLICIT_VR_LE.encode())
    context = _item(0x20, context_body)
    if context_item_length is not None:
        context = struct.pack(">BBH", 0x20, 0, context_item_length) + context_body
    user_info = _item(0x50, _item(0x51, struct.pack(">L", max_length)) + _item(0x52, b"1.2.3.4"))
    body = (
        struct.pack(">HH", 1, 0)
        + _ae(called)
        + _ae(calling)
        + bytes(32)
        + _item(0x10, APPLICATION_CONTEXT.encode())
        + context
        + user_info
    )
    length = len(body) if declared_length is None else declared_length
    return struct.pack(">BBL", A_ASSOCIATE_RQ, 0, length) + body


def pdu_header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def p_data(context_id: int, payload: bytes, *, last: bool = True, command: bool = True) -> bytes:
    """A P-DATA-TF with one PDV item."""
    control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    pdv = struct.pack(">LBB", len(payload) + 2, context_id, control) + payload
    return pdu_header(P_DATA_TF, len(pdv)) + pdv


def release_rq() -> bytes:
    return pdu_header(A_RELEASE_RQ, 4) + bytes(4)


def read_pdu(sock: socket.socket, timeout: float) -> tuple[int, bytes] | None:
    """The next PDU as (type, body), or ``None`` when the peer closed (or reset) the connection."""
    sock.settimeout(timeout)
    try:
        header = _read_exactly(sock, 6)
        if header is None:
            return None
        pdu_type, _, length = struct.unpack(">BBL", header)
        body = _read_exactly(sock, length)
        return None if body is None else (pdu_type, body)
    except (ConnectionResetError, BrokenPipeError):
        return None


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(65536, size - len(data)))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def reject_codes(body: bytes) -> tuple[int, int, int]:
    """(result, source, diagnostic) of an A-ASSOCIATE-RJ body."""
    return body[1], body[2], body[3]


def wait_closed(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the peer closed ``sock`` (reading and discarding whatever it sends), or ``None``."""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except TimeoutError:
            return None
        except OSError:
            return time.monotonic() - start
    return None


def connect(port: int, *, source: str = LOOPBACK, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection((LOOPBACK, port), timeout=timeout, source_address=(source, 0))


@dataclass
class ScpProcess:
    """A running ``infergate scp --no-watcher``."""

    process: NodeProcess
    port: int
    data_dir: Path
    audit_log: Path

    @classmethod
    def start(cls, folder: Path, *, ready_timeout: float = 60.0, **settings: Any) -> ScpProcess:
        folder.mkdir(parents=True, exist_ok=True)
        data_dir = folder / "var"
        engine = make_engine(Settings(data_dir=data_dir))
        upgrade(engine)
        engine.dispose()
        port = free_port()
        audit_log = folder / "audit.log"
        values: dict[str, Any] = {"data_dir": data_dir, "scp_port": port, "audit_log": audit_log}
        values.update(settings)
        process = NodeProcess(["scp", "--no-watcher"], node_env(**values), folder / "scp.log").start()
        scp = cls(process=process, port=port, data_dir=data_dir, audit_log=audit_log)
        scp.wait_ready(ready_timeout)
        return scp

    def wait_ready(self, timeout: float) -> None:
        """Wait for the "listening" log line (a probe connection would itself show up in the audit log)."""
        deadline = time.monotonic() + timeout
        while "listening on" not in self.process.log_text():
            assert self.process.process is not None
            if self.process.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the SCP did not start:\n{self.process.log_text()[-3000:]}")
            time.sleep(0.1)

    def status(self, field: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def rss_kib(self) -> int:
        return self.status("VmRSS")

    def threads(self) -> int:
        return self.status("Threads")

    def alive(self) -> bool:
        assert self.process.process is not None
        return self.process.process.poll() is None

    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line]

    def stop(self) -> None:
        self.process.stop()


def descriptions(records: list[dict[str, Any]]) -> list[str]:
    return [r["EventIdentification"].get("EventOutcomeDescription", "") for r in records]
