"""Where audit records go: a file appended one line per ``write()``, syslog, or memory (tests)."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import threading
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from infergate.audit.messages import Outcome


class AuditSink(Protocol):
    """Where records go; ``write`` gets one JSON line without its newline and may raise ``OSError``."""

    def write(self, line: str, outcome: Outcome) -> None: ...

    def close(self) -> None: ...


class FileSink:
    """Append each record as one line with a single ``write()`` to a file opened with ``O_APPEND``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, line: str, outcome: Outcome) -> None:
        data = (line + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
        if written != len(data):
            raise OSError(f"short write to the audit log ({written} of {len(data)} bytes)")

    def close(self) -> None:
        return None


class SyslogSink:
    """Send each record as one syslog message (facility ``authpriv``)."""

    def __init__(self, address: tuple[str, int] | str) -> None:
        self.handler = logging.handlers.SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.LOG_AUTHPRIV
        )
        self.handler.ident = "infergate-audit: "
        self._lock = threading.Lock()

    def write(self, line: str, outcome: Outcome) -> None:
        level = logging.INFO if outcome == Outcome.SUCCESS else logging.WARNING
        record = logging.makeLogRecord({"msg": line, "levelno": level, "levelname": logging.getLevelName(level)})
        with self._lock:
            self.handler.emit(record)

    def close(self) -> None:
        self.handler.close()


class MemorySink:
    """Keeps the lines in a list: for tests and for callers that forward records themselves."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def write(self, line: str, outcome: Outcome) -> None:
        with self._lock:
            self.lines.append(line)

    def close(self) -> None:
        return None

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(line) for line in self.lines]


def open_sink(target: str | Path) -> AuditSink:
    """The sink for ``INFERGATE_AUDIT_LOG``: ``syslog://host:port``, ``syslog:///path/to/socket`` or a file.

    Raises
    ------
    ValueError
        If a ``syslog:`` URL names neither a host and port nor a socket path.
    """
    text = str(target)
    if text.startswith("syslog:"):
        url = urlsplit(text)
        if url.hostname:
            return SyslogSink((url.hostname, url.port or 514))
        if url.path:
            return SyslogSink(url.path)
        raise ValueError(f'Audit log "{text}" should be syslog://host:port or syslog:///path/to/socket.')
    return FileSink(Path(text).expanduser())
