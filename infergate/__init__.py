"""infergate core: configuration, the job contract, DICOM helpers and the SQL store.

Shared by :mod:`service` (SCP, watcher, REST API) and :mod:`workers` (Celery tasks and the
inference pipeline); it imports neither of them.
"""

__version__ = "0.1.0"
