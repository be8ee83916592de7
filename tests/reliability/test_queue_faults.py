"""Never lose a study: the broker fails, SQL keeps the work (rows 6, 7 and 9 of issue 5).

* Row 6: Redis is down when a study arrives. Storage still answers Success, the jobs wait in SQL,
  and all of them run within 60 s of Redis returning (production reconcile settings); the watcher
  sends what it could not send on its first tick after the broker returns.
* Row 7: Redis is restarted without persistence with 20 jobs in flight. All 20 finish with exactly
  one SEG and one SR each: the SQL reconciler re-sends what the broker forgot.
* Row 9: the broker's visibility timeout is shorter than a job. Redis hands the message of the
  running job to a second worker process, whose claim the SQL lease refuses: the job runs once.

Each test runs the node as separate processes (``infergate scp``/``api``/``worker``) on PostgreSQL,
with its own ``redis-server`` on a free loopback port (never the shared one) and Orthanc as the PACS.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import update

from infergate.config import Settings
from infergate.jobs import GPU_QUEUE
from infergate.store import queries
from infergate.store.session import make_engine, make_session_factory, transaction
from infergate.store.tables import Job, JobState, Series, utcnow
from service.watcher import Watcher
from tests.data.make_series import write_ct_series
from tests.helpers.deployment import (
    REPO,
    RedisServer,
    install_model,
    results_in_pacs,
    run_deployment,
    send_ct,
    slow_segmentation,
    wait_for,
    write_rules,
)
from tests.helpers.peers import run_storescu
from tests.helpers.queues import RecordingQueue
from tests.reliability.scp_harness import SUCCESS, Sender

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    """A private Redis without persistence (the machine's shared Redis is never stopped)."""
    with RedisServer(tmp_path / "redis") as server:
        yield server
        print(server.log_text())  # noqa: T201 - shown when the test failed


def _settled(jobs: list[Job], count: int) -> bool:
    return len(jobs) == count and all(job.state in (JobState.done, JobState.failed) for job in jobs)


# --- Row 6 --------------------------------------------------------------------------------------------------


class _Broker(RecordingQueue):
    """A queue whose broker is down until ``up`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.up = False

    def send_run(self, job_id: int, countdown: float | None = None) -> None:
        if not self.up:
            raise ConnectionRefusedError(111, "Connection refused")
        super().send_run(job_id, countdown)


@pytest.mark.timeout(60)
def test_the_watcher_sends_jobs_it_could_not_send_on_its_first_tick_after_the_broker_returns(
    db_settings: Settings, tmp_path: Path
) -> None:
    """Row 6's mechanism, without processes: no waiting for ``requeue_after`` or the reconcile period."""
    settings = db_settings.model_copy(
        update={
            "models_dir": REPO / "models",
            "routing_rules": write_rules(tmp_path / "routing.yaml", ["ct-tissue-seg"]),
            "series_quiet_seconds": 1.0,
            "requeue_after_seconds": 3600.0,
            "reconcile_interval_seconds": 3600.0,
        }
    )
    engine = make_engine(settings)
    factory = make_session_factory(engine)
    with transaction(factory) as session:
        study_id = queries.get_or_create_study(session, generate_uid())
        series_id = queries.get_or_create_series(session, study_id, generate_uid(), modality="CT", num_instances=8)
        session.execute(
            update(Series).where(Series.id == series_id).values(last_received_at=utcnow() - timedelta(minutes=1))
        )
    broker = _Broker()
    watcher = Watcher(settings, factory, broker)
    (routed,) = watcher.run_once()  # the series completes; sending its job fails
    assert broker.runs == [] and len(routed.job_ids) == 1
    watcher.run_once()  # still down: nothing is lost, the job waits in SQL
    broker.up = True
    watcher.run_once()
    assert broker.runs == routed.job_ids
    with factory() as session:
        job = session.get(Job, routed.job_ids[0])
        assert job is not None and job.state == JobState.queued
    watcher.run_once()
    assert broker.runs == routed.job_ids, "sent twice"
    engine.dispose()


@pytest.mark.timeout(240)
def test_redis_down_when_a_study_arrives_jobs_wait_in_sql_and_run_soon_after_it_returns(
    tmp_path: Path, pg_url: str, broker: RedisServer
) -> None:
    models = tmp_path / "models"
    install_model(models, "ct-tissue-seg")
    with run_deployment(
        tmp_path,
        pg_url,
        broker.url(),
        models_dir=models,
        routing_rules=write_rules(tmp_path / "routing.yaml", ["ct-tissue-seg"]),
        # the production defaults: the 60 s promise must hold with them
        reconcile_interval_seconds=15,
        requeue_after_seconds=60,
        job_lease_seconds=900,
    ) as deployment:
        broker.kill()
        study = generate_uid()
        series = [
            write_ct_series(tmp_path / f"ct{n}", slices=8, size=96, seed=n, study_uid=study, series_number=n + 1)
            for n in (1, 2)
        ]
        sender = Sender(deployment.scp_port)
        sender.connect()
        statuses = [sender.store(path) for info in series for path in info.paths]
        sender.close()
        assert statuses == [SUCCESS] * 16, "storage must not depend on the broker"

        # The series complete, the jobs are created, and sending them fails: they wait in SQL.
        wait_for(lambda: len(deployment.jobs()) == 2, 30, "two jobs created")
        wait_for(lambda: "could not enqueue job" in deployment.scp.log_text(), 30, "a failed send")
        time.sleep(5)  # the watcher keeps failing for a while; nothing may run meanwhile
        assert {job.state for job in deployment.jobs()} == {JobState.queued}, deployment.logs()

        broker.start()
        returned = datetime.now(UTC)
        wait_for(lambda: _settled(deployment.jobs(), 2), 60 + 60, "both jobs settled")
        jobs = deployment.jobs()
        assert {job.state for job in jobs} == {JobState.done}, deployment.logs()
        latest_start = max(job.started_at for job in jobs if job.started_at is not None)
        waited = latest_start - returned
        assert waited < timedelta(seconds=60), f"the last job started {waited} after Redis returned"
        segs, srs = results_in_pacs(deployment.pacs, timeout=10, srs_expected=2, segs_expected=2)
        assert (len(segs), len(srs)) == (2, 2)
        print(f"jobs started {waited} after Redis returned")  # noqa: T201


# --- Row 7 --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_redis_restarted_without_persistence_with_20_jobs_in_flight_all_finish_once(
    tmp_path: Path, pg_url: str, broker: RedisServer
) -> None:
    models = tmp_path / "models"
    model = slow_segmentation(models, overlap=0.96)  # about 1 s of inference per job
    with run_deployment(
        tmp_path,
        pg_url,
        broker.url(),
        models_dir=models,
        routing_rules=write_rules(tmp_path / "routing.yaml", [model]),
        series_quiet_seconds=2,
        worker_concurrency=2,
        onnx_threads=1,
        job_lease_seconds=30,
        reconcile_interval_seconds=1,
        requeue_after_seconds=10,
    ) as deployment:
        study = generate_uid()
        for n in range(20):
            write_ct_series(
                tmp_path / "studies" / f"s{n:02d}", slices=2, size=128, seed=n, study_uid=study, series_number=n + 1
            )
        sent = run_storescu(tmp_path / "studies", port=deployment.scp_port, aec="INFERGATE")
        assert sent.returncode == 0, sent.stderr

        def in_flight() -> bool:
            states = [job.state for job in deployment.jobs()]
            return (
                len(states) == 20
                and JobState.running in states
                and states.count(JobState.queued) >= 5
                and broker.queue_length(GPU_QUEUE) >= 3
            )

        wait_for(in_flight, 60, "20 jobs in flight: some running, messages waiting in Redis", interval=0.1)
        before = {job.id: job.state for job in deployment.jobs()}
        broker.restart()  # SIGKILL and start again on the same port: every message is gone
        assert broker.queue_length(GPU_QUEUE) == 0
        restarted = time.monotonic()

        wait_for(lambda: _settled(deployment.jobs(), 20), 180, "all 20 jobs settled")
        jobs = deployment.jobs()
        assert {job.state for job in jobs} == {JobState.done}, deployment.logs()
        per_job: dict[int, list[str]] = {}
        for job_id, kind, _ in deployment.result_objects():
            per_job.setdefault(job_id, []).append(kind)
        assert per_job == {job.id: ["SEG", "SR"] for job in jobs}
        segs, srs = results_in_pacs(deployment.pacs, timeout=30, srs_expected=20, segs_expected=20)
        time.sleep(2)  # a late duplicate would show up here
        segs, srs = results_in_pacs(deployment.pacs, timeout=1, srs_expected=20, segs_expected=20)
        assert (len(segs), len(srs)) == (20, 20)
        assert set(deployment.export_states()) == {"done"}
        assert "reconciler re-sent" in deployment.scp.log_text()
        print(  # noqa: T201
            f"at the restart: {sum(s == JobState.queued for s in before.values())} queued, "
            f"{sum(s == JobState.running for s in before.values())} running; "
            f"all done {time.monotonic() - restarted:.0f} s later"
        )


# --- Row 9 --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_job_longer_than_the_visibility_timeout_runs_once(tmp_path: Path, pg_url: str, broker: RedisServer) -> None:
    models = tmp_path / "models"
    model = slow_segmentation(models)  # about 2-3 s per slice
    with run_deployment(
        tmp_path,
        pg_url,
        broker.url(),
        models_dir=models,
        routing_rules=write_rules(tmp_path / "routing.yaml", [model]),
        series_quiet_seconds=2,
        worker_concurrency=2,  # a second pool process is free to take the redelivered message
        onnx_threads=1,
        broker_visibility_timeout_seconds=2,
        job_lease_seconds=600,  # longer than the job: the lease, not luck, keeps it single
        requeue_after_seconds=600,  # no re-send by the reconciler: the broker alone redelivers
    ) as deployment:
        send_ct(deployment, slices=6, size=128)
        wait_for(lambda: _settled(deployment.jobs(), 1), 240, "the job settled")
        (job,) = deployment.jobs()
        assert job.state == JobState.done, deployment.logs()
        assert job.attempts == 1, "a second claim succeeded: the job ran twice"
        log = deployment.worker.log_text()
        runs = re.findall(rf"job {job.id}: running", log)
        dropped = re.findall(rf"job {job.id}: not claimable", log)
        assert len(runs) == 1, log[-6000:]
        # The broker did redeliver while the job ran (otherwise this test proves nothing) ...
        received = re.findall(r"Task infergate\.run_model\[([0-9a-f-]+)\] received", log)
        assert len(received) > len(set(received)), f"the message was never redelivered: {received}"
        # ... and the lease refused the redelivered copy before the job finished.
        assert dropped, log[-6000:]
        assert log.index(f"job {job.id}: not claimable") < log.index(f"job {job.id}: exporting"), log[-6000:]
        segs, srs = results_in_pacs(deployment.pacs, timeout=30, srs_expected=1)
        time.sleep(2)
        segs, srs = results_in_pacs(deployment.pacs, timeout=1, srs_expected=1)
        assert (len(segs), len(srs)) == (1, 1)
        assert [kind for _, kind, _ in deployment.result_objects()] == ["SEG", "SR"]
        print(f"{len(received)} deliveries of {len(set(received))} message(s); {len(dropped)} refused")  # noqa: T201
