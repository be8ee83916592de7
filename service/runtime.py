"""Process plumbing shared by the service's entry points: signals and the database."""

from __future__ import annotations

import signal
import threading
from types import FrameType

from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.store.session import make_engine, make_session_factory


def stop_event_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM, so loops can end cleanly."""
    stop = threading.Event()

    def _handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    return stop


def session_factory(settings: Settings) -> sessionmaker[Session]:
    return make_session_factory(make_engine(settings))
