"""When the watcher looks next: at the interval, or as soon as a receiving series turns quiet."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.store import queries
from infergate.store.session import transaction
from infergate.store.tables import Series, SeriesState, utcnow
from service.watcher import Watcher


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
