"""Logging set-up for every process: text lines, or JSON lines that carry a correlation context.

Log lines name jobs, series and instances by database id, never by patient name, ID or birth
date; pynetdicom's identifier logging is switched off in :mod:`infergate.dicom.net`.

``INFERGATE_LOG_FORMAT=json`` writes one JSON object per line: ``time`` (UTC, ISO 8601), ``level``,
``process`` (the role: ``scp``, ``api``, ``worker``, ``watcher``, ``up``), ``pid``, ``logger``,
``message``, ``job_id`` and ``study`` (null when unknown), and ``exc`` with a traceback. ``job_id``
and ``study`` come from a :mod:`contextvars` context, set by the worker while it runs or exports a
job (:func:`log_context`), by the SCP while it stores an instance whose header it has read, and by
the API in job routes. ``study`` is a short salted hash of the Study Instance UID
(:func:`study_hash`), so the lines of one study can be followed across processes without the UID
itself, which identifies the examination, ever reaching a log line.
The salt is ``INFERGATE_LOG_SALT`` or, by default, a random one kept in ``<data dir>/log-salt``
(created once, mode 0600), so that processes sharing a data folder hash a study alike.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

from infergate.config import Settings

#: Hex digits of the study hash: 48 bits, enough to tell a node's studies apart, too few to be a UID.
STUDY_HASH_CHARS = 12
SALT_FILE = "log-salt"

_job_id: ContextVar[int | None] = ContextVar("infergate_log_job_id", default=None)
_study: ContextVar[str | None] = ContextVar("infergate_log_study", default=None)
_salt: bytes | None = None


def study_hash(study_uid: str, salt: bytes) -> str:
    """A short keyed hash (HMAC-SHA-256) of a Study Instance UID, for log correlation.

    Keyed, because study UIDs are often guessable (an organisation root, a date, a counter): without
    the salt a plain hash could be reversed by trying candidates.
    """
    if not salt:
        raise ValueError('Argument "salt" should not be empty.')
    return hmac.new(salt, study_uid.encode(), hashlib.sha256).hexdigest()[:STUDY_HASH_CHARS]


def load_salt(settings: Settings) -> bytes:
    """The study-hash salt: ``log_salt`` if set, else the data folder's salt file, created on first use.

    Several processes may start at once (``infergate up``): the file is written under a temporary name
    and linked into place, so every process reads the same complete salt.
    """
    if settings.log_salt is not None and settings.log_salt.get_secret_value():
        return settings.log_salt.get_secret_value().encode()
    path = settings.data_path / SALT_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{SALT_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)  # fails if another process was first: then its salt is the one
        except FileExistsError:
            pass
        finally:
            temporary.unlink()
    return path.read_bytes().strip()


def _current_salt() -> bytes:
    """The configured salt; a process that never configured one hashes with a random salt of its own."""
    global _salt
    if _salt is None:
        _salt = secrets.token_bytes(32)
    return _salt


def bind_job(job_id: int | None) -> None:
    """Name ``job_id`` in the log lines of the current context (a thread, a task, a request) from now on."""
    _job_id.set(job_id)


def bind_study(study_uid: str | None) -> None:
    """Name the study (hashed) in the log lines of the current context from now on; None clears it."""
    _study.set(study_hash(study_uid, _current_salt()) if study_uid else None)


@contextmanager
def log_context(job_id: int | None = None, study_uid: str | None = None) -> Iterator[None]:
    """Name a job and a study in the log lines written inside the ``with`` block, and not after it.

    Whatever :func:`bind_job` or :func:`bind_study` set inside the block is undone at its end too.
    """
    job_token = _job_id.set(job_id if job_id is not None else _job_id.get())
    study_token = _study.set(study_hash(study_uid, _current_salt()) if study_uid else _study.get())
    try:
        yield
    finally:
        _study.reset(study_token)
        _job_id.reset(job_token)


def current_context() -> tuple[int | None, str | None]:
    """(job id, study hash) of the current context."""
    return _job_id.get(), _study.get()


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for the fields)."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        job_id, study = current_context()
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        entry: dict[str, object] = {
            "time": when.replace("+00:00", "Z"),
            "level": record.levelname,
            "process": self.process,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": job_id,
            "study": study,
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def text_format(process: str) -> str:
    return f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s"


def formatter(settings: Settings, process: str) -> logging.Formatter:
    """The formatter ``settings.log_format`` asks for."""
    if settings.log_format == "json":
        return JsonFormatter(process)
    return logging.Formatter(text_format(process))


def configure_context(settings: Settings) -> bool:
    """Take the study-hash salt from ``settings`` when lines are JSON (text lines print no study hash).

    Called before any study is bound, so that every hash of this process uses the shared salt. Returns
    False if the salt file cannot be written (a full or read-only data folder): the process then hashes
    with a salt of its own rather than not starting, and its hashes do not match other processes'.
    """
    global _salt
    if settings.log_format == "json":
        try:
            _salt = load_salt(settings)
        except OSError:
            return False
    return True


def setup_logging(settings: Settings, process: str) -> None:
    """Log to stderr at ``log_level`` in ``log_format`` for a process in role ``process``."""
    shared_salt = configure_context(settings)
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(settings, process))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    # pynetdicom logs every PDU at INFO; keep its warnings and errors only.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(settings.log_level)))
    if not shared_salt:
        logging.getLogger(__name__).warning(
            "%s cannot be written: this process's study hashes will not match other processes'; set "
            "INFERGATE_LOG_SALT",
            settings.data_path / SALT_FILE,
        )


def use_format(settings: Settings, process: str, logger: logging.Logger) -> None:
    """Give the handlers someone else set up (Celery's, in the worker) the format of ``settings``.

    Text leaves them as they are: Celery's own format names the pool process.
    """
    if settings.log_format == "json":
        for handler in logger.handlers:
            handler.setFormatter(JsonFormatter(process))
