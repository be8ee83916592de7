"""The worker's Celery app: ``celery -A workers.celery_app worker``.

Celery's worker command needs a module-level app, so this entry-point module is the one place
where settings are read at import time. Metrics are switched on here too, before Celery forks its
pool, so that every pool process records into the shared folder (:mod:`infergate.metrics`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from infergate import metrics
from infergate.config import get_settings
from infergate.jobs import make_celery
from infergate.logs import configure_context, use_format

settings = get_settings()
metrics.enable(settings)
if not configure_context(settings):
    logging.getLogger(__name__).warning("the log salt file cannot be written; set INFERGATE_LOG_SALT")
app = make_celery(settings)
app.conf.include = ["workers.tasks"]
# In the worker, Celery owns logging (its format names the pool process; reconfiguring the root
# logger from a task would silence Celery's own task lines); JSON lines replace only its formatter.
app.conf.worker_hijack_root_logger = True


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _log_format(logger: logging.Logger, **kwargs: Any) -> None:
    """Give Celery's handlers the ``INFERGATE_LOG_FORMAT`` of the node."""
    use_format(settings, "worker", logger)


@signals.worker_process_shutdown.connect
def _forget_process(**kwargs: Any) -> None:
    """A pool process that exits drops its live gauges (the provider its sessions used)."""
    metrics.process_exiting()
