"""Network settings shared by our SCP and SCU.

pynetdicom has no TCP_NODELAY option; without it, Nagle's algorithm and delayed ACKs hold each
small PDU back and loopback transfers of CT images ran about 25x slower. Both sides set it from an
``EVT_CONN_OPEN`` handler, which runs as soon as the socket is connected.
"""

from __future__ import annotations

import socket

from pynetdicom import _config, evt
from pynetdicom.events import Event


def quiet_identifiers() -> None:
    """Keep patient identifiers out of pynetdicom's logs (it logs C-FIND/C-MOVE identifiers by default)."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False


def set_tcp_nodelay(event: Event) -> None:
    """``EVT_CONN_OPEN`` handler: disable Nagle's algorithm on the association's socket."""
    dul_socket = event.assoc.dul.socket
    raw = getattr(dul_socket, "socket", None) if dul_socket is not None else None
    if raw is not None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


NODELAY_HANDLER = (evt.EVT_CONN_OPEN, set_tcp_nodelay)
