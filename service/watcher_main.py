"""``python -m service.watcher_main``: the watcher alone (when the SCP runs with ``--no-watcher``)."""

from __future__ import annotations

from infergate import metrics
from infergate.audit import Auditor
from infergate.config import get_settings
from infergate.jobs import JobQueue, make_celery
from infergate.logs import setup_logging
from service.runtime import session_factory, stop_event_on_signals
from service.watcher import Watcher


def main() -> int:
    settings = get_settings()
    setup_logging(settings, "watcher")
    metrics.enable(settings)
    stop = stop_event_on_signals()
    auditor = Auditor.from_settings(settings, process="watcher")  # retention records each study it removes
    try:
        Watcher(settings, session_factory(settings), JobQueue(make_celery(settings)), auditor).run(stop)
    finally:
        auditor.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
