"""``python -m service.scp``: the DICOM SCP (and, unless ``--no-watcher``, the watcher)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from infergate import audit, metrics
from infergate.audit import Auditor
from infergate.config import get_settings
from infergate.dicom.receive import StoreContext
from infergate.jobs import JobQueue, make_celery
from infergate.logs import setup_logging
from service.runtime import session_factory, stop_event_on_signals
from service.scp.ae import free_bytes, start_server
from service.watcher import Watcher

log = logging.getLogger("service.scp")


#: How long open associations may finish after a stop signal before they are aborted; under the
#: 10 s Docker and systemd give before SIGKILL, so that an abort, not a kill, ends what is left.
SHUTDOWN_GRACE_SECONDS = 8.0


def _drain(server: Any, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
    """Let open associations finish (new ones are no longer accepted), then A-ABORT the rest.

    An aborted sender got no Success for what was in flight and sends it again; what it was
    answered Success for is already stored.
    """
    deadline = time.monotonic() + grace
    while server.ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.1)
    left = list(server.ae.active_associations)
    for assoc in left:
        assoc.abort()
    if left:
        log.warning("aborted %d association(s) still open %.0f s after the stop signal", len(left), grace)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infergate scp", description=__doc__)
    parser.add_argument("--no-watcher", action="store_true", help="Do not run the watcher in this process.")
    args = parser.parse_args(argv)
    settings = get_settings()
    setup_logging(settings, "scp")
    metrics.enable(settings)
    stop = stop_event_on_signals()
    factory = session_factory(settings)
    settings.instances_dir.mkdir(parents=True, exist_ok=True)
    try:
        auditor = Auditor.from_settings(settings, process="scp")
    except (OSError, ValueError) as exc:  # no audit trail, no service
        log.error("INFERGATE_AUDIT_LOG cannot be opened (%s)", type(exc).__name__)
        sys.stderr.write(f"infergate scp: INFERGATE_AUDIT_LOG cannot be opened ({exc})\n")
        return 2
    try:
        server = start_server(settings, StoreContext(factory=factory, data_root=settings.data_path), auditor)
    except ValueError as exc:  # TLS files that cannot be loaded: refuse to start, saying which setting
        log.error("%s", exc)
        sys.stderr.write(f"infergate scp: {exc}\n")
        return 2
    watcher = None if args.no_watcher else Watcher(settings, factory, JobQueue(make_celery(settings)), auditor)
    auditor.emit(audit.application_activity(node=auditor.node(), start=True))
    log.info(
        "DICOM SCP %s listening on %s:%d (%s)",
        settings.ae_title,
        settings.scp_host,
        settings.scp_port,
        "TLS, client certificates required" if settings.tls_cert_file else "no TLS",
    )
    if settings.min_free_bytes and free_bytes(settings.instances_dir) < settings.min_free_bytes:
        log.warning("the data folder is below the free-space watermark: associations are rejected (transient)")
    thread = watcher.start_thread(stop) if watcher is not None else None
    try:
        stop.wait()
    finally:
        log.info("stopping")
        server.shutdown()
        _drain(server)
        if thread is not None:
            thread.join(timeout=10)
        auditor.emit(audit.application_activity(node=auditor.node(), start=False))
        auditor.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
