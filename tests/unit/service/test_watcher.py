"""When the watcher looks next: at the interval, or as soon as a receiving series turns quiet."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.store import queries
from infergate.store.session import transaction
from infergate.store.tables import Series, SeriesState, utcnow
from service.watcher import Watcher
from tests.helpers.held import receive_series


class _NoBroker:
    def send_run(self, job_id: int, countdown: float | None = None) -> None:
        raise AssertionError("nothing is sent here")

    def send_export(self, job_id: int, countdown: float | None = None) -> None:
        raise AssertionError("nothing is sent here")

    def send_retrieve(self, retrieval_id: int, countdown: float | None = None) -> None:
        raise AssertionError("nothing is sent here")


def _series(factory: sessionmaker[Session], last_received_ago: float, state: SeriesState) -> None:
    with transaction(factory) as session:
        study_id = queries.get_or_create_study(session, generate_uid())
        series_id = queries.get_or_create_series(session, study_id, generate_uid(), modality="CT")
        session.execute(
            update(Series)
            .where(Series.id == series_id)
            .values(last_received_at=utcnow() - timedelta(seconds=last_received_ago), state=state)
        )


@pytest.fixture
def watcher(db_settings: Settings, session_factory: sessionmaker[Session]) -> Watcher:
    settings = db_settings.model_copy(update={"series_quiet_seconds": 5.0, "watcher_interval_seconds": 1.0})
    return Watcher(settings, session_factory, _NoBroker())


def test_with_nothing_receiving_the_watcher_waits_one_interval(
    watcher: Watcher, session_factory: sessionmaker[Session]
) -> None:
    _series(session_factory, 0.5, SeriesState.routed)  # not receiving: no deadline of its own
    assert watcher.next_wait() == pytest.approx(1.0)


def test_the_watcher_wakes_just_after_the_next_series_turns_quiet(
    watcher: Watcher, session_factory: sessionmaker[Session]
) -> None:
    _series(session_factory, 1.0, SeriesState.receiving)  # quiet in 4 s: beyond the interval
    assert watcher.next_wait() == pytest.approx(1.0)
    _series(session_factory, 4.7, SeriesState.receiving)  # quiet in 0.3 s
    assert 0.2 < watcher.next_wait() < 0.34


def test_a_series_already_due_is_looked_at_almost_at_once(
    watcher: Watcher, session_factory: sessionmaker[Session]
) -> None:
    _series(session_factory, 60.0, SeriesState.receiving)
    assert watcher.next_wait() == pytest.approx(0.02)


def test_the_watcher_applies_retention_only_when_a_retention_is_set(
    db_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    series = receive_series(session_factory, db_settings.data_path, tmp_path, state=SeriesState.unmatched)
    assert Watcher(db_settings, session_factory, _NoBroker()).cleanup() is None  # the default keeps everything
    assert all(path.is_file() for path in series.paths)
    settings = db_settings.model_copy(update={"retain_inputs_days": 30.0})
    report = Watcher(settings, session_factory, _NoBroker()).cleanup()
    assert report is not None and report.series == [series.id]
    assert not any(path.exists() for path in series.paths)


def test_the_retention_thread_runs_a_pass_at_once_and_stops_with_the_watcher(
    db_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    series = receive_series(session_factory, db_settings.data_path, tmp_path, state=SeriesState.unmatched)
    settings = db_settings.model_copy(update={"retain_inputs_days": 30.0, "cleanup_interval_seconds": 3600.0})
    stop = threading.Event()
    thread = threading.Thread(target=Watcher(settings, session_factory, _NoBroker()).run_cleanup_loop, args=(stop,))
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while any(path.exists() for path in series.paths) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(path.exists() for path in series.paths)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
