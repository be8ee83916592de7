"""The SCP's transport: connection limits, socket timeouts, bounded PDUs and a bounded TLS handshake.

* **Connections** (:class:`NodeServer`). TCP connections beyond twice the association limits (per address,
  in all) are refused before any thread starts: a plain connection gets an A-ASSOCIATE-RJ (2/3/2) and a
  FIN, a TLS one is closed. This bounds threads and memory under a flood of silent or half-open sockets
  and keeps a flood from one address from starving the others. The listen backlog is 128, not
  socketserver's 5, which drops SYNs in a burst.
* **Timeouts.** pynetdicom reads a PDU with blocking ``recv`` calls on a socket without timeout, so a
  peer that sends half a PDU and stops holds the association (and its slot) forever, whatever
  ``network_timeout`` says. Accepted sockets get ``scp_network_timeout_seconds`` as socket timeout: a
  stalled PDU ends in "transport closed".
* **PDU sizes** (:class:`BoundedSocket`). pynetdicom buffers a whole PDU of any declared length (up to
  4 GiB). A P-DATA-TF longer than the maximum length this node announced (``max_pdu``), or any other PDU
  over 1 MiB, is answered with A-ABORT (service provider, invalid PDU parameter value) and the connection
  is closed before its body is read.
* **TLS** (:func:`tls_context`). With a certificate configured the port speaks only TLS 1.2+ (BCP 195
  ciphers, client certificate required, PS3.15 B.9). pynetdicom does the server handshake inside the
  accept loop without a timeout, so one silent connection would stop every other TLS sender; here the
  handshake runs in the connection's own thread, bounded by ``scp_acse_timeout_seconds``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import time
from collections import deque
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from infergate import audit
from infergate.audit import Codes, Outcome, Participant
from infergate.config import Settings
from service.scp.admission import REJECT_LIMIT, Gate

log = logging.getLogger(__name__)

#: TLS 1.2 cipher suites of the BCP 195 (RFC 9325) profiles in PS3.15 B.9/B.11; TLS 1.3 suites are all allowed.
BCP195_TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
    ]
)

#: Largest PDU other than P-DATA-TF read into memory; a real A-ASSOCIATE-RQ with 128 contexts is ~200 KiB.
MAX_CONTROL_PDU_BYTES = 1024 * 1024
#: P-DATA-TF PDUs may exceed the announced maximum by this much (some peers count the PDV header).
PDATA_SLACK_BYTES = 16
#: Refused connections kept open (reading) until the peer closes, at most this long, and at most this many.
REFUSAL_LINGER_SECONDS = 2.0
MAX_HELD_REFUSALS = 512
_RJ_LIMIT_PDU = bytes([0x03, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, *REJECT_LIMIT])  # A-ASSOCIATE-RJ 2/3/2
_ABORT_INVALID_PDU = (0x02, 0x06)  # A-ABORT source service provider, reason invalid PDU parameter value


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The SCP's TLS context, or ``None`` without ``tls_cert_file``: TLS 1.2+, client certificates required.

    Raises
    ------
    ValueError
        If a file cannot be read or holds no usable certificate or key (the message names the setting).
    """
    if settings.tls_cert_file is None:
        return None
    assert settings.tls_key_file is not None and settings.tls_ca_file is not None  # Settings._tls
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    context.set_ciphers(BCP195_TLS12_CIPHERS)
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"DICOM TLS: INFERGATE_TLS_CERT_FILE/INFERGATE_TLS_KEY_FILE could not be loaded ({_why(exc)})."
        ) from None
    try:
        context.load_verify_locations(cafile=settings.tls_ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"DICOM TLS: INFERGATE_TLS_CA_FILE could not be loaded ({_why(exc)}).") from None
    if not context.cert_store_stats().get("x509_ca"):
        raise ValueError("DICOM TLS: INFERGATE_TLS_CA_FILE holds no CA certificate to check senders against.")
    return context


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or type(exc).__name__


# The server ----------------------------------------------------------------------------------------------


class BoundedSocket(AssociationSocket):
    """An ``AssociationSocket`` that refuses to read a PDU longer than the node accepts.

    pynetdicom's DUL reads each PDU as ``recv(6)`` (type and length) then ``recv(length)``; this class
    looks at the header and, before the body is read, answers an oversized PDU with A-ABORT and closes
    the connection (pynetdicom then sees a short PDU, "transport closed", and ends the association).
    """

    pdata_limit: int | None = None
    _pending: tuple[int, int] | None = None

    def recv(self, nr_bytes: int) -> bytearray:
        pending, self._pending = self._pending, None
        if pending is not None and nr_bytes == pending[1]:
            pdu_type, length = pending
            limit = self.pdata_limit if pdu_type == 0x04 else MAX_CONTROL_PDU_BYTES
            if limit is not None and length > limit:
                self._refuse(pdu_type, length, limit)
                return bytearray()
        data = super().recv(nr_bytes)
        if pending is None and nr_bytes == 6 and len(data) == 6:
            pdu_type, _, length = struct.unpack(">BBL", data)
            if 0x01 <= pdu_type <= 0x07:
                self._pending = (pdu_type, length)
        return data

    def _refuse(self, pdu_type: int, length: int, limit: int) -> None:
        log.warning(
            "PDU type 0x%02X of %d bytes is over the limit of %d; aborting the association", pdu_type, length, limit
        )
        abort = A_ABORT_RQ()
        abort.source, abort.reason_diagnostic = _ABORT_INVALID_PDU
        raw = self.socket
        if raw is None:
            return
        try:
            raw.sendall(abort.encode())
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the peer is gone already; pynetdicom closes the socket next


class NodeRequestHandler(RequestHandler):
    """One connection: the association runs in its own thread and this one waits for it to end."""

    server: NodeServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        assert sock is not None
        # pynetdicom constructs the AssociationSocket itself (and queues Evt5 in its constructor), so the
        # subclass is applied to that instance rather than constructing a second socket.
        sock.__class__ = BoundedSocket
        cast(BoundedSocket, sock).pdata_limit = self.server.pdata_limit
        return assoc

    def handle(self) -> None:
        assoc = self._create_association()
        self.server.gate.opened(assoc, str(self.client_address[0]))
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()
        self.server.gate.finish(assoc)


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with connection limits, socket timeouts and a bounded TLS handshake."""

    daemon_threads = True  # shutdown() does not wait for open associations (their threads are daemons too)
    #: listen() backlog; socketserver's 5 drops SYNs in a burst, delaying every sender by 1-3 s retransmits.
    request_queue_size = 128

    def __init__(self, *args: Any, gate: Gate, **kwargs: Any) -> None:
        self.gate = gate
        self._refused: deque[tuple[socket.socket, float]] = deque()
        kwargs["request_handler"] = NodeRequestHandler
        super().__init__(*args, **kwargs)
        max_pdu = self.ae.maximum_pdu_size  # what each A-ASSOCIATE-AC announces
        self.pdata_limit = max_pdu + PDATA_SLACK_BYTES if max_pdu else None
        self.acse_timeout = self.ae.acse_timeout
        self.network_timeout = self.ae.network_timeout

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock = cast(socket.socket, self.socket)
        client, address = sock.accept()
        if self.ssl_context is not None:  # handshake later, in the connection's thread
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        why = self.gate.connect(host)
        if why is None:
            return True
        if not isinstance(request, ssl.SSLSocket):
            self._answer_refused(request)
        write, suppressed = self.gate.alert_allowed(host, "connection limit")
        if write:
            more = f"; {suppressed} more since the last record" if suppressed else ""
            log.warning("connection from %s refused: %s%s", host, why, more)
            self.gate.auditor.emit(
                audit.security_alert(
                    participants=(
                        Participant(user_id=host, is_requestor=True, network_access_point=host),
                        self.gate.auditor.node(),
                    ),
                    event_type=Codes.USE_OF_RESTRICTED_FUNCTION,
                    outcome=Outcome.MINOR_FAILURE,
                    description=f"connection refused: {why}{more}",
                )
            )
        return False  # socketserver now shuts down (FIN after the RJ) and closes the request socket

    def _answer_refused(self, request: socket.socket) -> None:
        """Send A-ASSOCIATE-RJ (transient) on a refused plain connection and keep a duplicate descriptor open
        for a moment, reading what the peer sends, so that the close is a FIN after the RJ, not a RST that
        makes the peer's kernel discard the RJ (a peer sends its A-ASSOCIATE-RQ right after connecting)."""
        try:
            request.setblocking(False)
            request.send(_RJ_LIMIT_PDU)
            held = request.dup()
        except OSError:
            return
        if len(self._refused) >= MAX_HELD_REFUSALS:
            self._refused.popleft()[0].close()
        self._refused.append((held, time.monotonic() + REFUSAL_LINGER_SECONDS))

    def service_actions(self) -> None:
        """Called by ``serve_forever`` between requests and at least every 0.5 s: close lingering refusals."""
        super().service_actions()
        now = time.monotonic()
        for _ in range(len(self._refused)):
            held, deadline = self._refused.popleft()
            try:
                while held.recv(65536):
                    pass
                closed = True  # end of stream: the peer closed
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            if closed or now >= deadline:
                held.close()
            else:
                self._refused.append((held, deadline))

    def server_close(self) -> None:
        super().server_close()
        while self._refused:
            self._refused.popleft()[0].close()

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.gate.disconnect(str(client_address[0]))
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        host = str(client_address[0])
        try:
            if isinstance(request, ssl.SSLSocket) and not self._handshake(request, host):
                self.shutdown_request(request)
                return
            request.settimeout(self.network_timeout)
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        finally:
            self.gate.disconnect(host)

    def _handshake(self, request: ssl.SSLSocket, host: str) -> bool:
        request.settimeout(self.acse_timeout)
        try:
            request.do_handshake()
            return True
        except (ssl.SSLError, OSError) as exc:
            why = getattr(exc, "reason", None) or type(exc).__name__
        log.warning("TLS handshake with %s failed: %s", host, why)
        write, suppressed = self.gate.alert_allowed(host, "TLS handshake")
        if write:
            more = f"; {suppressed} more since the last record" if suppressed else ""
            self.gate.auditor.emit(
                audit.security_alert(
                    participants=(
                        Participant(user_id=host, is_requestor=True, network_access_point=host),
                        self.gate.auditor.node(),
                    ),
                    event_type=Codes.NODE_AUTHENTICATION,
                    outcome=Outcome.MINOR_FAILURE,
                    description=f"TLS handshake failed: {why}{more}",
                )
            )
        return False
