"""The worker's Celery app: ``celery -A workers.celery_app worker``.

Celery's worker command needs a module-level app, so this entry-point module is the one place
where settings are read at import time.
"""

from __future__ import annotations

from infergate.config import get_settings
from infergate.jobs import make_celery

settings = get_settings()
app = make_celery(settings)
app.conf.include = ["workers.tasks"]
# In the worker, Celery owns logging (its format names the pool process; reconfiguring the root
# logger from a task would silence Celery's own task lines).
app.conf.worker_hijack_root_logger = True
