"""Logging set-up for every process.

Log lines name jobs, series and instances by database id, never by patient name, ID or birth
date; pynetdicom's identifier logging is switched off in :mod:`infergate.dicom.net`.
"""

from __future__ import annotations

import logging

from infergate.config import Settings


def setup_logging(settings: Settings, process: str) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    # pynetdicom logs every PDU at INFO; keep its warnings and errors only.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(settings.log_level)))
