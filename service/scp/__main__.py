"""``python -m service.scp``: the DICOM SCP (and, unless ``--no-watcher``, the watcher)."""

from __future__ import annotations

import argparse
import logging

from infergate.config import get_settings
from infergate.dicom.receive import StoreContext
from infergate.jobs import JobQueue, make_celery
from infergate.logs import setup_logging
from service.runtime import session_factory, stop_event_on_signals
from service.scp.ae import start_server
from service.watcher import Watcher

log = logging.getLogger("service.scp")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infergate scp", description=__doc__)
    parser.add_argument("--no-watcher", action="store_true", help="Do not run the watcher in this process.")
    args = parser.parse_args(argv)
    settings = get_settings()
    setup_logging(settings, "scp")
    stop = stop_event_on_signals()
    factory = session_factory(settings)
    settings.instances_dir.mkdir(parents=True, exist_ok=True)
    watcher = None if args.no_watcher else Watcher(settings, factory, JobQueue(make_celery(settings)))
    server = start_server(settings, StoreContext(factory=factory, data_root=settings.data_path))
    log.info("DICOM SCP %s listening on %s:%d", settings.ae_title, settings.scp_host, settings.scp_port)
    thread = watcher.start_thread(stop) if watcher is not None else None
    try:
        stop.wait()
    finally:
        log.info("stopping")
        server.shutdown()
        if thread is not None:
            thread.join(timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
