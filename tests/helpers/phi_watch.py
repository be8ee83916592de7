"""Row 26 of the reliability suite: no patient data in the node's logs, across the whole test run.

The synthetic studies every test sends carry recognisable patient values (canaries): the names,
IDs, birth date and accession numbers that ``tests/data/make_series.py`` and the tests write. This
module watches two places for them while the suite runs:

* every log record emitted in the pytest process by the node's own code and the libraries it
  calls (``infergate``, ``service``, ``workers``, ``pynetdicom``, ``pydicom``, ``celery``, ...),
  through a handler on the root logger;
* the log files of node processes started by tests (``NodeProcess``) and any ``audit.log``, read
  when the run ends.

A hit fails the run (``tests/conftest.py`` sets the exit status) and is printed with where it was
found, never silently ignored. Test code's own loggers (``tests.*``) and peers' logs (Orthanc,
dcmtk) are not watched: they are not the node.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

#: Patient values the test data use (make_series defaults, and names/IDs tests pass explicitly).
CANARY = re.compile(
    r"Phantom\^|PHANTOM-(?:CT|MR|MF)|MNI152\^Template|Doe\^Jane|Other\^Beta|PAT-[AB1]\b|"
    r"\b19700101\b|\bACC\d{7}\b|CANARY"
)

#: Loggers of code that runs as part of the node (in-process in unit tests).
_NODE_LOGGERS = ("infergate", "service", "workers", "pynetdicom", "pydicom", "highdicom", "celery", "kombu", "uvicorn")


@dataclass
class Hit:
    where: str
    text: str


class PhiWatch(logging.Handler):
    """Collects log lines of the node that contain a canary."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.hits: list[Hit] = []
        self.files: set[Path] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(_NODE_LOGGERS):
            return
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken log call is not ours to judge here
            return
        if record.exc_info and record.exc_info[1] is not None:
            text += f" {record.exc_info[1]!r}"
        if CANARY.search(text):
            self.hits.append(Hit(f"log record {record.name}", text[:300]))

    def watch_file(self, path: Path) -> None:
        """A node process's log file, read when the run ends."""
        self.files.add(path)

    def scan_files(self, extra_roots: list[Path]) -> None:
        """Read the watched files and every ``audit.log`` under ``extra_roots``."""
        paths = set(self.files)
        for root in extra_roots:
            if root.is_dir():
                paths.update(root.rglob("audit.log"))
        for path in sorted(paths):
            if not path.is_file():
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
                if CANARY.search(line):
                    self.hits.append(Hit(f"{path}:{number}", line[:300]))


#: The one watch of this pytest process (installed by tests/conftest.py).
WATCH = PhiWatch()
