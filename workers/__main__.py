"""``python -m workers``: a Celery worker on the ``gpu`` and ``dispatch`` queues."""

from __future__ import annotations

import sys

from infergate.config import get_settings
from infergate.jobs import DISPATCH_QUEUE, GPU_QUEUE
from infergate.metrics import start_worker_exporter


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    from workers.celery_app import app

    # A worker on another machine serves its own metrics (the API sees only its local folder's).
    start_worker_exporter(settings)

    args = [
        "worker",
        "--queues",
        f"{GPU_QUEUE},{DISPATCH_QUEUE}",
        "--concurrency",
        str(settings.worker_concurrency),
        "--pool",
        "prefork",
        "--loglevel",
        settings.log_level,
        "--without-gossip",
        "--without-mingle",
        *(argv if argv is not None else sys.argv[1:]),
    ]
    app.worker_main(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
