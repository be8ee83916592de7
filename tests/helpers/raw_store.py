"""A C-STORE SCU that sends any bytes, under any command UIDs: the hostile peer of the reliability suite.

pynetdicom's ``send_c_store`` decodes, checks and re-encodes what it sends; a fuzzing or hostile peer
needs the opposite: the dataset bytes exactly as given (truncated, with bad VRs, another transfer
syntax than the context's), and command-set UIDs that need not be UIDs at all (``../../x``, NUL, 200
characters). :class:`RawSender` builds the C-STORE-RQ itself and sends it over an association whose
presentation contexts it proposes. Loopback only.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable
from io import BytesIO
from types import SimpleNamespace

from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContextTuple

from infergate.dicom.receive import StoreContext, handle_store

__all__ = ["RawSender", "dataset_of", "store_in_process"]

LOOPBACK = "127.0.0.1"


class RawSender:
    """Associate once with ``contexts`` ((SOP Class, Transfer Syntax) pairs), then send raw C-STOREs.

    :meth:`send` answers the response's status, or None when no response came (the association
    was aborted or timed out); a new association is made on the next call.
    """

    def __init__(
        self,
        port: int,
        contexts: Iterable[tuple[str, str]],
        *,
        called: str = "INFERGATE",
        calling: str = "HOSTILE",
        timeout: float = 15.0,
    ) -> None:
        self.port, self.called = port, called
        self.ae = AE(ae_title=calling)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout
        self.ae.connection_timeout = 2.0
        for sop_class, syntax in dict.fromkeys(contexts):
            self.ae.add_requested_context(sop_class, syntax)
        self.assoc: Association | None = None
        self._message_id = 0

    def connect(self, timeout: float = 30.0) -> Association:
        deadline = time.monotonic() + timeout
        while self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate(LOOPBACK, self.port, ae_title=self.called)
            if self.assoc.is_established:
                # Without TCP_NODELAY each small request waits out the peer's delayed ACK (~40 ms).
                sock = self.assoc.dul.socket.socket  # type: ignore[union-attr]
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no association with {LOOPBACK}:{self.port} within {timeout} s")
            time.sleep(0.05)
        return self.assoc

    def send(
        self, sop_class: str, sop_instance: str, syntax: str, data: bytes, *, abstract: str | None = None
    ) -> int | None:
        """One C-STORE-RQ with these command UIDs and ``data`` as its dataset, on the context of
        (``abstract`` or ``sop_class``, ``syntax``)."""
        assoc = self.connect()
        context = next(
            (
                cx
                for cx in assoc.accepted_contexts
                if cx.abstract_syntax == (abstract or sop_class) and cx.transfer_syntax[0] == syntax
            ),
            None,
        )
        if context is None:
            raise ValueError(f"no accepted presentation context for {abstract or sop_class} in {syntax}")
        self._message_id = self._message_id % 0xFFFF + 1
        request = C_STORE()
        request.MessageID = self._message_id
        request.Priority = 0x0002
        # Past pynetdicom's setters, which refuse UIDs over 64 characters: a hostile peer is not so polite.
        request._affected_sop_class_uid = UID(sop_class)
        request._affected_sop_instance_uid = UID(sop_instance)
        request.DataSet = BytesIO(data)
        assoc._reactor_checkpoint.clear()
        try:
            while not assoc._is_paused:
                time.sleep(0.0001)
            assert context.context_id is not None
            assoc.dimse.send_msg(request, context.context_id)
            _, response = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        status = getattr(response, "Status", None)
        if status is None:
            assoc.abort()
            return None
        return int(status)

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.ae.shutdown()


_IN_PROCESS_ASSOC = SimpleNamespace(
    requestor=SimpleNamespace(ae_title="HOSTILE"), acceptor=SimpleNamespace(ae_title="INFERGATE")
)


def store_in_process(ctx: StoreContext, sop_class: str, sop_instance: str, syntax: str, data: bytes) -> int:
    """Call the SCP's C-STORE handler as pynetdicom would, without a network: the fuzzer's fast path.

    An exception is answered 0xC211, as pynetdicom answers a handler that raises.
    """
    request = C_STORE()
    request.MessageID = 1
    request.Priority = 0x0002
    request._affected_sop_class_uid = UID(sop_class)
    request._affected_sop_instance_uid = UID(sop_instance)
    request.DataSet = BytesIO(data)
    context = PresentationContextTuple(1, UID(sop_class), UID(syntax))
    event = Event(_IN_PROCESS_ASSOC, evt.EVT_C_STORE, {"request": request, "context": context})  # type: ignore[arg-type]
    try:
        result = handle_store(event, ctx)
    except Exception:  # noqa: BLE001 - what pynetdicom's handler wrapper does
        return 0xC211
    return result if isinstance(result, int) else int(result.Status)


def dataset_of(part10: bytes) -> bytes:
    """The dataset of a Part 10 file: what follows its File Meta Information group."""
    if part10[128:132] != b"DICM" or part10[132:138] != b"\x02\x00\x00\x00UL":
        raise ValueError("not a Part 10 file with a File Meta Information Group Length")
    return part10[144 + int.from_bytes(part10[140:144], "little") :]
