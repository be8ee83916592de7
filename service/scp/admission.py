"""Admission and audit of the SCP's associations: the :class:`Gate` and its pynetdicom event handlers.

pynetdicom has no user hook that answers an A-ASSOCIATE-RQ; its own checks (calling/called AE, the number
of association threads) are fixed. :func:`admit`, an ``EVT_REQUESTED`` handler, therefore does what
pynetdicom's acceptor does for its own rejections (``ACSE._negotiate_as_acceptor``): ``acse.send_reject``,
trigger ``EVT_REJECTED``, ``assoc.kill()``. ``Association.run_reactor`` then skips negotiation because
``is_rejected`` is set (it checks for exactly this case after ``EVT_REQUESTED``), and ``kill()`` waits until
the A-ASSOCIATE-RJ is sent and the connection closed, so no thread outlives the rejection. If the check
itself fails, the association is rejected as transient (pynetdicom would log the error and accept).

The checks, in order: allowed networks, calling AE, called AE (rejected-permanent 1/1/1, 1/1/3, 1/1/7),
the free-space watermark, the association limit and the per-address limit (rejected-transient 2/3/2,
local-limit-exceeded: the sender keeps the study and retries). Nothing is deleted to make room.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE

from infergate import audit, metrics
from infergate.audit import Auditor, Outcome, Participant
from infergate.config import Settings
from infergate.dicom.receive import StoreContext, handle_store

log = logging.getLogger(__name__)

#: Refusals audited per address and kind each minute before the rest are only counted.
ALERT_BURST = 20
ALERT_WINDOW_SECONDS = 60.0

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_ADDRESS = (0x01, 0x01, 0x01)  # permanent, service user, no reason given
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user, called AE title not recognised
REJECT_LIMIT = (0x02, 0x03, 0x02)  # transient, service provider (presentation), local limit exceeded


def free_bytes(path: Path) -> int:
    """Bytes available to this process on the file system holding ``path`` (its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


# The gate: admission, limits, per-association records and their audit ------------------------------------


@dataclass
class _Record:
    """What the gate knows of one connection."""

    host: str
    calling_ae: str = ""
    requested: bool = False
    admitted: bool = False
    refusal: _Refusal | None = None
    ending: str = "closed"
    done: bool = False
    studies: dict[str, Counter[str]] = field(default_factory=dict)
    refused_instances: int = 0


@dataclass(frozen=True)
class _Refusal:
    """An A-ASSOCIATE-RJ: its (result, source, diagnostic), the reason (also the rate-limit key), details."""

    codes: tuple[int, int, int]
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.reason} ({self.detail})" if self.detail else self.reason


@dataclass
class _Alerts:
    window_start: float
    sent: int = 0
    suppressed: int = 0


class Gate:
    """Admission and bookkeeping of the SCP's connections; its handlers are bound with ``[gate]``.

    ``free_space`` returns the free bytes of the data folder (a parameter so that tests can lower it).
    """

    def __init__(self, settings: Settings, auditor: Auditor, *, free_space: Callable[[], int] | None = None) -> None:
        self.auditor = auditor
        self.ae_title = settings.ae_title
        self.networks = [ipaddress.ip_network(item, strict=False) for item in settings.scp_allowed_networks]
        self.calling_aes = frozenset(settings.allowed_calling_aes)
        self.require_called_ae = settings.scp_require_called_ae
        self.min_free_bytes = settings.min_free_bytes
        self.max_associations = settings.scp_max_associations
        self.max_per_host = settings.scp_max_associations_per_host
        self.max_connections = 2 * settings.scp_max_associations
        self.max_connections_per_host = 2 * settings.scp_max_associations_per_host
        self.free_space = free_space or partial(free_bytes, settings.instances_dir)
        self._lock = threading.Lock()
        self._records: weakref.WeakKeyDictionary[Association, _Record] = weakref.WeakKeyDictionary()
        self._connections: Counter[str] = Counter()
        self._alerts: dict[tuple[str, str], _Alerts] = {}

    # connections (called by NodeServer in the accept loop and the connection threads)
    def connect(self, host: str) -> str | None:
        """Count a new TCP connection from ``host``; returns why it is refused, or ``None``."""
        with self._lock:
            if sum(self._connections.values()) >= self.max_connections:
                return f"connection limit ({self.max_connections}) reached"
            if self._connections[host] >= self.max_connections_per_host:
                return f"connection limit per address ({self.max_connections_per_host}) reached"
            self._connections[host] += 1
            return None

    def disconnect(self, host: str) -> None:
        with self._lock:
            self._connections[host] -= 1
            if self._connections[host] <= 0:
                del self._connections[host]

    def opened(self, assoc: Association, host: str) -> None:
        with self._lock:
            self._records[assoc] = _Record(host=host)

    def record(self, assoc: Association) -> _Record:
        with self._lock:
            record = self._records.get(assoc)
            if record is None:  # an association not made by NodeServer (e.g. a test's own server)
                record = self._records[assoc] = _Record(host=_peer_host(assoc))
            return record

    # admission
    def decide(self, assoc: Association, calling_ae: str, called_ae: str) -> _Refusal | None:
        """Why ``assoc`` is rejected, or ``None`` after admitting it (counted against the limits)."""
        record = self.record(assoc)
        record.requested, record.calling_ae = True, calling_ae
        if self.networks and not _in_networks(record.host, self.networks):
            return _Refusal(REJECT_ADDRESS, "peer address not allowed")
        if self.calling_aes and calling_ae not in self.calling_aes:
            return _Refusal(REJECT_CALLING_AE, "calling AE title not allowed")
        if self.require_called_ae and called_ae != self.ae_title:
            return _Refusal(REJECT_CALLED_AE, "called AE title not recognised")
        if self.min_free_bytes:
            try:
                free = self.free_space()
            except OSError as exc:
                return _Refusal(REJECT_LIMIT, "free space unknown", f"{type(exc).__name__} reading the data folder")
            if free < self.min_free_bytes:
                return _Refusal(
                    REJECT_LIMIT,
                    "storage below the free-space watermark",
                    f"{free} of {self.min_free_bytes} bytes free",
                )
        with self._lock:
            live = [r for a, r in self._records.items() if r.admitted and not r.done and a.is_alive()]
            if len(live) >= self.max_associations:
                return _Refusal(REJECT_LIMIT, "association limit reached", f"{self.max_associations} in all")
            if sum(1 for r in live if r.host == record.host) >= self.max_per_host:
                return _Refusal(REJECT_LIMIT, "association limit reached", f"{self.max_per_host} per address")
            record.admitted = True
        return None

    # stored instances
    def count_store(self, assoc: Association, study_uid: str | None, sop_class: str) -> None:
        record = self.record(assoc)
        with self._lock:
            if study_uid is None:
                record.refused_instances += 1
            else:
                record.studies.setdefault(study_uid, Counter())[sop_class] += 1

    # audit
    def peer(self, assoc: Association, record: _Record) -> Participant:
        return Participant(user_id=record.calling_ae or "(none)", is_requestor=True, network_access_point=record.host)

    def node(self, assoc: Association) -> Participant:
        return self.auditor.node(address=_local_host(assoc))

    def alert_allowed(self, host: str, kind: str) -> tuple[bool, int]:
        """Rate limit of refusal records: (whether to write this one, how many were suppressed before it)."""
        now = time.monotonic()
        with self._lock:
            if len(self._alerts) > 4096:  # forget quiet addresses
                self._alerts = {k: v for k, v in self._alerts.items() if now - v.window_start < ALERT_WINDOW_SECONDS}
            state = self._alerts.setdefault((host, kind), _Alerts(window_start=now))
            if now - state.window_start >= ALERT_WINDOW_SECONDS:
                state.window_start, state.sent = now, 0
            if state.sent >= ALERT_BURST:
                state.suppressed += 1
                return False, 0
            state.sent += 1
            suppressed, state.suppressed = state.suppressed, 0
            return True, suppressed

    def finish(self, assoc: Association, ending: str | None = None) -> None:
        """Write the end-of-association records once: the transfer summary and the Logout."""
        record = self.record(assoc)
        with self._lock:
            if ending is not None:
                record.ending = ending
            if record.done:
                return
            record.done = True
            studies = {uid: dict(classes) for uid, classes in record.studies.items()}
        if not record.admitted:
            if not record.requested:
                log.info("connection from %s closed before an association was requested", record.host)
            return
        released = record.ending == "released"
        stored = sum(sum(classes.values()) for classes in studies.values())
        if studies or record.refused_instances:
            outcome = Outcome.SUCCESS if released and not record.refused_instances else Outcome.MINOR_FAILURE
            self.auditor.emit(
                audit.instances_transferred(
                    source=self.peer(assoc, record),
                    destination=self.node(assoc),
                    studies=studies,
                    action=audit.Action.CREATE,
                    outcome=outcome,
                    description=f"{stored} instances stored, {record.refused_instances} refused; "
                    f"association {record.ending}",
                )
            )
        self.auditor.emit(
            audit.user_authentication(
                user=self.peer(assoc, record),
                node=self.node(assoc),
                outcome=Outcome.SUCCESS if released else Outcome.MINOR_FAILURE,
                login=False,
                description=f"association {record.ending}",
            )
        )


def _in_networks(host: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _peer_host(assoc: Association) -> str:
    try:
        return assoc.requestor.address
    except ValueError:
        return "unknown"


def _local_host(assoc: Association) -> str | None:
    try:
        return assoc.acceptor.address
    except ValueError:
        return None


def _tls_summary(assoc: Association) -> str:
    raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if not isinstance(raw, ssl.SSLSocket):
        return "no TLS"
    common_name = "?"
    subject: Any = (raw.getpeercert() or {}).get("subject", ())
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                common_name = str(value)
    return f"{raw.version()}, client certificate CN={common_name}"


# Event handlers (bound with [gate]) ----------------------------------------------------------------------


def admit(event: Event, gate: Gate) -> None:
    """``EVT_REQUESTED``: reject the association (see the module docstring) unless the gate admits it."""
    assoc = event.assoc
    request = cast(A_ASSOCIATE, assoc.requestor.primitive)
    try:
        refusal = gate.decide(
            assoc, str(request.calling_ae_title or "").strip(), str(request.called_ae_title or "").strip()
        )
    except Exception as exc:  # noqa: BLE001 - pynetdicom would log it and accept: fail closed instead
        log.error("admission check failed (%s); rejecting the association as transient", type(exc).__name__)
        refusal = _Refusal(REJECT_LIMIT, "admission check failed", type(exc).__name__)
    if refusal is None:
        return
    gate.record(assoc).refusal = refusal
    assoc.acse.send_reject(*refusal.codes)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def audit_accepted(event: Event, gate: Gate) -> None:
    """``EVT_ACCEPTED``: 110114 Login, success."""
    assoc = event.assoc
    record = gate.record(assoc)
    metrics.association(record.calling_ae, accepted=True)
    gate.auditor.emit(
        audit.user_authentication(
            user=gate.peer(assoc, record),
            node=gate.node(assoc),
            outcome=Outcome.SUCCESS,
            description=f"association accepted ({_tls_summary(assoc)})",
        )
    )


def audit_rejected(event: Event, gate: Gate) -> None:
    """``EVT_REJECTED``: 110114 Login, failure, with the reason (rate-limited per address and reason)."""
    assoc = event.assoc
    record = gate.record(assoc)
    record.admitted = False
    primitive = assoc.acceptor.primitive
    codes = (primitive.result, primitive.result_source, primitive.diagnostic) if primitive is not None else (0, 0, 0)
    refusal = record.refusal or _Refusal(cast(tuple[int, int, int], codes), "rejected by pynetdicom", str(codes))
    kind = "transient" if refusal.codes[0] == 0x02 else "permanent"
    request = cast(A_ASSOCIATE, assoc.requestor.primitive)
    metrics.association(record.calling_ae or str(request.calling_ae_title or "").strip(), accepted=False)
    write, suppressed = gate.alert_allowed(record.host, refusal.reason)
    if not write:  # a flood: counted into the next record, neither logged nor audited one by one
        return
    more = f"; {suppressed} more since the last record" if suppressed else ""
    log.warning("association from %s (%s) rejected, %s: %s%s", record.host, record.calling_ae, kind, refusal, more)
    called = str(request.called_ae_title or "").strip()
    gate.auditor.emit(
        audit.user_authentication(
            user=gate.peer(assoc, record),
            node=gate.node(assoc),
            outcome=Outcome.MINOR_FAILURE,
            description=f"association rejected ({kind}): {refusal}; called AE {called!r}{more}",
        )
    )


def audit_released(event: Event, gate: Gate) -> None:
    """``EVT_RELEASED``: the transfer summary and Logout."""
    gate.finish(event.assoc, "released")


def audit_aborted(event: Event, gate: Gate) -> None:
    """``EVT_ABORTED``: the transfer summary and Logout (outcome minor failure)."""
    gate.finish(event.assoc, "aborted")


def store_and_count(event: Event, ctx: StoreContext, gate: Gate) -> int | Dataset:
    """``EVT_C_STORE``: :func:`~infergate.dicom.receive.handle_store`, counting what it stored for the audit
    and ``infergate_instances_received_total``."""
    stored: list[str] = []
    try:
        # The study comes from the header handle_store decoded: event.dataset would decode it all again.
        return handle_store(event, ctx, on_stored=lambda header: stored.append(header.study_instance_uid))
    finally:
        sop_class = str(getattr(event.request, "AffectedSOPClassUID", "") or "")
        gate.count_store(event.assoc, stored[0] if stored else None, sop_class)
        if stored:
            metrics.instance_received(event.assoc.requestor.ae_title, sop_class)
