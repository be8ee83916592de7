"""Query functions over the results store, on SQLite and PostgreSQL (infergate.store.queries)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from infergate.store import queries
from infergate.store.session import transaction
from infergate.store.tables import Job, JobState, Series, SeriesState, Study, utcnow

STUDY = "1.2.826.0.1.3680043.8.498.10"
SERIES = "1.2.826.0.1.3680043.8.498.11"
LEASE = timedelta(minutes=15)


def _series(
    factory: sessionmaker[Session], series_uid: str = SERIES, *, age: timedelta = timedelta(0)
) -> int:
    """A receiving series whose last instance arrived ``age`` ago."""
    with transaction(factory) as session:
        study_id = queries.get_or_create_study(session, STUDY)
        series_id = queries.get_or_create_series(session, study_id, series_uid, modality="CT")
        session.execute(update(Series).where(Series.id == series_id).values(last_received_at=utcnow() - age))
    return series_id


def _job(factory: sessionmaker[Session], series_id: int, model_id: str = "seg") -> int:
    with transaction(factory) as session:
        job_id = queries.create_job(session, series_id, model_id, "1.0")
    assert job_id is not None
    return job_id


def _aware(value: datetime) -> datetime:
    """SQLite gives naive datetimes back; everything stored is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _get_job(factory: sessionmaker[Session], job_id: int) -> Job:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_get_or_create_study_is_idempotent(session_factory: sessionmaker[Session]) -> None:
    with transaction(session_factory) as session:
        first = queries.get_or_create_study(session, STUDY)
        assert queries.get_or_create_study(session, STUDY) == first
    with transaction(session_factory) as session:
        assert queries.get_or_create_study(session, STUDY) == first
        assert queries.get_or_create_study(session, STUDY + ".1") != first
        assert session.scalar(select(func.count()).select_from(Study)) == 2


def test_get_or_create_series_is_idempotent_and_keeps_first_attributes(
    session_factory: sessionmaker[Session],
) -> None:
    with transaction(session_factory) as session:
        study_id = queries.get_or_create_study(session, STUDY)
        first = queries.get_or_create_series(
            session, study_id, SERIES, modality="CT", series_description="first"
        )
    with transaction(session_factory) as session:
        again = queries.get_or_create_series(
            session, study_id, SERIES, modality="MR", series_description="second"
        )
        assert again == first
        series = session.get(Series, first)
        assert series is not None
        assert (series.modality, series.series_description) == ("CT", "first")
        assert series.state == SeriesState.receiving
        assert series.num_instances == 0
        assert session.scalar(select(func.count()).select_from(Series)) == 1


def test_insert_ignore_tells_whether_it_inserted(session_factory: sessionmaker[Session]) -> None:
    values = {"study_instance_uid": STUDY, "created_at": utcnow()}
    with transaction(session_factory) as session:
        assert queries.insert_ignore(session, Study, values, ["study_instance_uid"]) is True
        assert queries.insert_ignore(session, Study, values, ["study_instance_uid"]) is False
    with transaction(session_factory) as session:
        assert queries.insert_ignore(session, Study, values, ["study_instance_uid"]) is False
        assert session.scalar(select(func.count()).select_from(Study)) == 1


def test_create_job_once_per_series_and_model(session_factory: sessionmaker[Session]) -> None:
    series_id = _series(session_factory)
    job_id = _job(session_factory, series_id, "seg")
    with transaction(session_factory) as session:
        assert queries.create_job(session, series_id, "seg", "2.0") is None
        other = queries.create_job(session, series_id, "cls", None)
    assert other is not None and other != job_id
    job = _get_job(session_factory, job_id)
    assert (job.state, job.attempts, job.model_version) == (JobState.queued, 0, "1.0")
    assert job.lease_until is None


def test_claim_job_claims_a_queued_job_once(session_factory: sessionmaker[Session]) -> None:
    job_id = _job(session_factory, _series(session_factory))
    with transaction(session_factory) as session:
        assert queries.claim_job(session, job_id, LEASE) is True
    with transaction(session_factory) as session:
        assert queries.claim_job(session, job_id, LEASE) is False
    job = _get_job(session_factory, job_id)
    assert job.state == JobState.running
    assert job.attempts == 1
    assert job.started_at is not None and job.lease_until is not None
    assert _aware(job.lease_until) > utcnow() + LEASE - timedelta(minutes=1)


def test_claim_job_retakes_a_running_job_only_after_its_lease_expired(
    session_factory: sessionmaker[Session],
) -> None:
    job_id = _job(session_factory, _series(session_factory))
    with transaction(session_factory) as session:
        assert queries.claim_job(session, job_id, LEASE)
        session.execute(update(Job).where(Job.id == job_id).values(error="worker died"))
    with transaction(session_factory) as session:
        assert not queries.claim_job(session, job_id, LEASE), "the lease is still valid"
        session.execute(
            update(Job).where(Job.id == job_id).values(lease_until=utcnow() - timedelta(seconds=1))
        )
    with transaction(session_factory) as session:
        assert queries.claim_job(session, job_id, LEASE)
    job = _get_job(session_factory, job_id)
    assert (job.state, job.attempts, job.error) == (JobState.running, 2, None)


def test_guarded_updates_with_the_row_already_in_the_session(session_factory: sessionmaker[Session]) -> None:
    """The caller may hold the row (SQLite returns naive datetimes, which Python cannot compare)."""
    series_id = _series(session_factory, age=timedelta(minutes=5))
    job_id = _job(session_factory, series_id)
    with transaction(session_factory) as session:
        job = session.get(Job, job_id)
        series = session.get(Series, series_id)
        assert job is not None and series is not None
        assert queries.claim_job(session, job_id, LEASE)
        assert job.state == JobState.running and job.attempts == 1
        session.execute(
            update(Job).where(Job.id == job_id).values(lease_until=utcnow() - timedelta(seconds=1))
        )
        assert queries.claim_job(session, job_id, LEASE)
        assert job.attempts == 2
        assert queries.claim_series(session, series_id, utcnow(), SeriesState.routed, "matched")
        assert series.state == SeriesState.routed


def test_claim_job_refuses_finished_and_missing_jobs(session_factory: sessionmaker[Session]) -> None:
    series_id = _series(session_factory)
    done, failed, exporting = (_job(session_factory, series_id, m) for m in ("a", "b", "c"))
    with transaction(session_factory) as session:
        queries.set_job_state(session, done, JobState.done)
        queries.set_job_state(session, failed, JobState.failed, error="boom")
        queries.set_job_state(session, exporting, JobState.exporting)
    with transaction(session_factory) as session:
        for job_id in (done, failed, exporting, 999_999):
            assert not queries.claim_job(session, job_id, LEASE)


def test_claim_job_under_concurrency_claims_once(session_factory: sessionmaker[Session]) -> None:
    """Several workers receiving the same message at once: exactly one runs the job."""
    job_id = _job(session_factory, _series(session_factory))
    results: list[bool] = []
    start = threading.Barrier(6)

    def worker() -> None:
        start.wait()
        with transaction(session_factory) as session:
            results.append(queries.claim_job(session, job_id, LEASE))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == [False] * 5 + [True]
    assert _get_job(session_factory, job_id).attempts == 1


def test_set_job_state_timestamps(session_factory: sessionmaker[Session]) -> None:
    job_id = _job(session_factory, _series(session_factory))
    with transaction(session_factory) as session:
        queries.claim_job(session, job_id, LEASE)
        queries.set_job_state(session, job_id, JobState.done)
    job = _get_job(session_factory, job_id)
    assert job.state == JobState.done and job.finished_at is not None and job.lease_until is None


def test_quiet_series_and_claim_only_once(session_factory: sessionmaker[Session]) -> None:
    quiet = _series(session_factory, SERIES, age=timedelta(minutes=5))
    busy = _series(session_factory, SERIES + ".1", age=timedelta(0))
    cutoff = utcnow() - timedelta(seconds=30)
    with session_factory() as session:
        assert queries.quiet_series_ids(session, cutoff) == [quiet]
    with transaction(session_factory) as session:
        assert queries.claim_series(session, quiet, cutoff, SeriesState.routed, "matched r") is True
    with transaction(session_factory) as session:
        assert queries.claim_series(session, quiet, cutoff, SeriesState.unmatched, "again") is False
        assert queries.claim_series(session, busy, cutoff, SeriesState.routed, "too early") is False
        assert queries.quiet_series_ids(session, cutoff) == []
        series = session.get(Series, quiet)
        assert series is not None
        assert (series.state, series.routing_note) == (SeriesState.routed, "matched r")
        assert series.completed_at is not None


def test_claim_series_refuses_a_series_that_received_an_instance_meanwhile(
    session_factory: sessionmaker[Session],
) -> None:
    series_id = _series(session_factory, age=timedelta(minutes=5))
    cutoff = utcnow() - timedelta(seconds=30)
    with session_factory() as session:
        assert queries.quiet_series_ids(session, cutoff) == [series_id]
    # An instance arrives between the watcher's look-up and its claim.
    with transaction(session_factory) as session:
        session.execute(update(Series).where(Series.id == series_id).values(last_received_at=utcnow()))
    with transaction(session_factory) as session:
        assert not queries.claim_series(session, series_id, cutoff, SeriesState.routed, "")


def test_jobs_to_resend(session_factory: sessionmaker[Session]) -> None:
    series_id = _series(session_factory)
    fresh, stale, running, expired, done = (_job(session_factory, series_id, m) for m in "abcde")
    now = utcnow()
    hour_ago = now - timedelta(hours=1)
    with transaction(session_factory) as session:
        session.execute(update(Job).where(Job.id.in_([stale, done])).values(queued_at=hour_ago))
        for job_id in (running, expired):
            queries.claim_job(session, job_id, LEASE)
        session.execute(update(Job).where(Job.id == expired).values(lease_until=hour_ago))
        queries.set_job_state(session, done, JobState.done)
    with session_factory() as session:
        stale_ids, expired_ids = queries.jobs_to_resend(session, now - timedelta(minutes=1), now)
    assert stale_ids == [stale]
    assert expired_ids == [expired]
    assert fresh not in stale_ids


def test_list_jobs_filters(session_factory: sessionmaker[Session]) -> None:
    first = _series(session_factory, SERIES)
    a = _job(session_factory, first, "seg")
    b = _job(session_factory, first, "cls")
    with transaction(session_factory) as session:
        other_study = queries.get_or_create_study(session, STUDY + ".9")
        other_series = queries.get_or_create_series(session, other_study, SERIES + ".9")
        c = queries.create_job(session, other_series, "seg", None)
        queries.set_job_state(session, b, JobState.failed, error="x")
    with session_factory() as session:
        assert [j.id for j in queries.list_jobs(session)] == [c, b, a]
        assert [j.id for j in queries.list_jobs(session, state=JobState.failed)] == [b]
        assert [j.id for j in queries.list_jobs(session, model_id="seg")] == [c, a]
        assert [j.id for j in queries.list_jobs(session, study_instance_uid=STUDY)] == [b, a]
        assert [j.id for j in queries.list_jobs(session, limit=1, offset=1)] == [b]
