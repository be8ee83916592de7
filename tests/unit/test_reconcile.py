"""The SQL reconciler re-sends work whose broker message was lost (infergate.reconcile).

The broker is a process boundary, so the queue is a fake that records what would have been sent.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from infergate.reconcile import reconcile
from infergate.store import queries
from infergate.store.session import transaction
from infergate.store.tables import Export, ExportState, Job, JobState, ResultObject, utcnow
from tests.helpers.queues import BrokerDown, RecordingQueue

STUDY = "1.2.826.0.1.3680043.8.498.200"
SERIES = "1.2.826.0.1.3680043.8.498.201"
LEASE = timedelta(minutes=15)


def _jobs(factory: sessionmaker[Session], *model_ids: str) -> list[int]:
    with transaction(factory) as session:
        study_id = queries.get_or_create_study(session, STUDY)
        series_id = queries.get_or_create_series(session, study_id, SERIES, modality="CT")
        ids = [queries.create_job(session, series_id, model_id, "1") for model_id in model_ids]
    assert all(i is not None for i in ids)
    return [i for i in ids if i is not None]


def _job(factory: sessionmaker[Session], job_id: int) -> Job:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _claim(factory: sessionmaker[Session], job_id: int, *, expired: bool) -> None:
    with transaction(factory) as session:
        assert queries.claim_job(session, job_id, LEASE)
        if expired:
            session.execute(update(Job).where(Job.id == job_id).values(lease_until=utcnow() - timedelta(seconds=1)))


def test_stale_queued_jobs_are_resent(session_factory: sessionmaker[Session]) -> None:
    queued = _jobs(session_factory, "a", "b")
    queue = RecordingQueue()
    report = reconcile(session_factory, queue, requeue_after=timedelta(0))
    assert sorted(queue.runs) == sorted(queued)
    assert sorted(report.resent_queued) == sorted(queued)
    assert report.resent_expired == [] and report.resent_exports == []
    assert all(_job(session_factory, j).state == JobState.queued for j in queued)


def test_recently_queued_jobs_are_left_alone(session_factory: sessionmaker[Session]) -> None:
    _jobs(session_factory, "a")
    queue = RecordingQueue()
    report = reconcile(session_factory, queue, requeue_after=timedelta(minutes=1))
    assert queue.runs == [] and report.resent_queued == []


def test_resent_jobs_wait_a_full_period_before_the_next_resend(
    session_factory: sessionmaker[Session],
) -> None:
    (job_id,) = _jobs(session_factory, "a")
    with transaction(session_factory) as session:
        session.execute(update(Job).where(Job.id == job_id).values(queued_at=utcnow() - timedelta(hours=1)))
    queue = RecordingQueue()
    reconcile(session_factory, queue, requeue_after=timedelta(minutes=1))
    reconcile(session_factory, queue, requeue_after=timedelta(minutes=1))
    assert queue.runs == [job_id]


def test_expired_running_jobs_are_queued_again_and_resent(session_factory: sessionmaker[Session]) -> None:
    expired, live = _jobs(session_factory, "expired", "live")
    _claim(session_factory, expired, expired=True)
    _claim(session_factory, live, expired=False)
    queue = RecordingQueue()
    report = reconcile(session_factory, queue, requeue_after=timedelta(0))
    assert queue.runs == [expired]
    assert report.resent_expired == [expired] and report.resent_queued == []
    job = _job(session_factory, expired)
    assert (job.state, job.lease_until, job.attempts) == (JobState.queued, None, 1)
    assert _job(session_factory, live).state == JobState.running
    # The re-sent message can claim it again.
    with transaction(session_factory) as session:
        assert queries.claim_job(session, expired, LEASE)
    assert _job(session_factory, expired).attempts == 2


def test_finished_jobs_are_untouched(session_factory: sessionmaker[Session]) -> None:
    done, failed = _jobs(session_factory, "done", "failed")
    with transaction(session_factory) as session:
        queries.set_job_state(session, done, JobState.done)
        queries.set_job_state(session, failed, JobState.failed, error="model failed")
        old = utcnow() - timedelta(hours=1)
        session.execute(update(Job).values(queued_at=old, updated_at=old))
    before = {j: _job(session_factory, j) for j in (done, failed)}
    queue = RecordingQueue()
    report = reconcile(session_factory, queue, requeue_after=timedelta(0))
    assert queue.runs == [] and queue.exports == []
    assert report.resent_queued == report.resent_expired == report.resent_exports == []
    for job_id, job in before.items():
        after = _job(session_factory, job_id)
        assert (after.state, after.error, after.queued_at, after.updated_at) == (
            job.state,
            job.error,
            job.queued_at,
            job.updated_at,
        )


def test_overdue_exports_are_resent(session_factory: sessionmaker[Session]) -> None:
    exporting, delivered = _jobs(session_factory, "exporting", "delivered")
    with transaction(session_factory) as session:
        for n, (job_id, state) in enumerate([(exporting, ExportState.pending), (delivered, ExportState.done)]):
            queries.set_job_state(session, job_id, JobState.exporting)
            result = ResultObject(
                job_id=job_id,
                kind="SEG",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                sop_instance_uid=f"2.25.{n + 1}",
                series_instance_uid=f"2.25.{n + 10}",
                path=f"results/{job_id}/x.dcm",
            )
            result.exports.append(Export(destination="PACS@127.0.0.1:104", state=state, attempts=1))
            session.add(result)
        session.flush()
        session.execute(update(Job).values(updated_at=utcnow() - timedelta(hours=1)))
    queue = RecordingQueue()
    report = reconcile(session_factory, queue, requeue_after=timedelta(minutes=1))
    assert queue.exports == [exporting] and report.resent_exports == [exporting]
    assert queue.runs == []


def test_broker_down_sends_nothing_and_the_next_pass_retries(session_factory: sessionmaker[Session]) -> None:
    (job_id,) = _jobs(session_factory, "a")
    report = reconcile(session_factory, BrokerDown(), requeue_after=timedelta(0))
    assert report.resent_queued == []
    assert _job(session_factory, job_id).state == JobState.queued
    queue = RecordingQueue()
    reconcile(session_factory, queue, requeue_after=timedelta(0))
    assert queue.runs == [job_id]
