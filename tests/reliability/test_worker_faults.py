"""Never lose a study: workers die and models fail (rows 8 and 10 of issue 5).

* Row 8: worker processes are SIGKILLed at random points of a job (the pool process running it, or
  the whole worker). The job finishes within its lease + 60 s of the last kill, with exactly one SEG
  and one SR in the PACS.
* Row 10: a poison job. A model that always raises ends ``failed`` with the error recorded, without a
  redelivery loop, while the other jobs keep flowing; a job whose every run kills its worker process
  ends ``failed`` after the configured attempts.

The node runs as separate processes on PostgreSQL with a private ``redis-server`` and Orthanc.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from infergate.jobs import GPU_QUEUE
from infergate.store.tables import Job, JobState
from tests.data.make_series import write_ct_series
from tests.helpers.deployment import (
    Deployment,
    RedisServer,
    child_pids,
    install_model,
    kill_pid,
    poison_classifier,
    results_in_pacs,
    run_deployment,
    send_ct,
    slow_segmentation,
    wait_for,
    write_rules,
)
from tests.helpers.peers import run_storescu

pytestmark = pytest.mark.integration

#: Fixed so that a failing run can be compared with the next; the kills' effects also depend on timing.
SEED = 20261128


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def _job(deployment: Deployment, model_id: str | None = None) -> Job | None:
    jobs = [job for job in deployment.jobs() if model_id is None or job.model_id == model_id]
    return jobs[0] if jobs else None


def _running(deployment: Deployment) -> Job | None:
    job = _job(deployment)
    return job if job is not None and job.state == JobState.running else None


def _state(deployment: Deployment) -> str:
    job = _job(deployment)
    return "no job yet" if job is None else f"{job.state.value}, attempt {job.attempts}"


def _pool_processes(deployment: Deployment) -> list[int]:
    return child_pids(deployment.worker.pid)


# --- Row 8 --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(360)
def test_worker_killed_at_random_points_the_job_finishes_once(tmp_path: Path, pg_url: str, broker: RedisServer) -> None:
    lease = 10
    models = tmp_path / "models"
    model = slow_segmentation(models)  # about 10 s for 4 slices
    rng = random.Random(SEED)
    with run_deployment(
        tmp_path,
        pg_url,
        broker.url(),
        models_dir=models,
        routing_rules=write_rules(tmp_path / "routing.yaml", [model]),
        series_quiet_seconds=2,
        onnx_threads=1,
        job_lease_seconds=lease,
        job_max_attempts=5,  # three kills may each cut an attempt short
        reconcile_interval_seconds=1,
        requeue_after_seconds=lease,
    ) as deployment:
        send_ct(deployment, slices=4, size=128)
        kills: list[str] = []

        def attempt_running(attempt: int) -> bool:
            job = _running(deployment)
            return job is not None and job.attempts == attempt

        # 1: the pool process running attempt 1, mid-inference; the worker itself lives on.
        wait_for(lambda: attempt_running(1), 60, "attempt 1 running")
        time.sleep(rng.uniform(0.2, 4.0))
        pool = _pool_processes(deployment)
        assert pool, "the worker has no pool process"
        kills += [f"pool process ({_state(deployment)})" for pid in pool if kill_pid(pid)]
        # 2: the whole worker during attempt 2 (the reconciler re-sends the job once the lease expired).
        wait_for(lambda: attempt_running(2), lease + 60, "attempt 2 running")
        time.sleep(rng.uniform(0.2, 4.0))
        kills.append(f"whole worker ({_state(deployment)})")
        deployment.worker.kill()
        deployment.start_worker()
        # 3: the whole worker again, at a random moment after its restart: before it takes a message,
        # mid-inference, while recording or exporting, wherever the moment falls.
        time.sleep(rng.uniform(0.0, 8.0))
        kills.append(f"whole worker ({_state(deployment)})")
        deployment.worker.kill()
        deployment.start_worker()
        last_kill = datetime.now(UTC)

        def settled() -> bool:
            job = _job(deployment)
            return job is not None and job.state in (JobState.done, JobState.failed)

        wait_for(settled, lease + 60, f"the job settled within its lease + 60 s of the last kill ({kills})")
        job = _job(deployment)
        assert job is not None and job.state == JobState.done, (kills, deployment.logs())
        assert job.finished_at is not None and job.finished_at - last_kill < timedelta(seconds=lease + 60)
        assert job.attempts >= 2, "no kill hit the running job"
        assert [kind for _, kind, _ in deployment.result_objects()] == ["SEG", "SR"]
        segs, srs = results_in_pacs(deployment.pacs, timeout=30, srs_expected=1)
        time.sleep(2)  # a late duplicate would show up here
        segs, srs = results_in_pacs(deployment.pacs, timeout=1, srs_expected=1)
        assert (len(segs), len(srs)) == (1, 1)
        assert set(deployment.export_states()) == {"done"}
        print(f"kills: {kills}; attempts {job.attempts}; done {job.finished_at - last_kill} after the last")  # noqa: T201


# --- Row 10 -------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_poison_model_fails_its_jobs_with_the_error_and_others_keep_flowing(
    tmp_path: Path, pg_url: str, broker: RedisServer
) -> None:
    models = tmp_path / "models"
    poison = poison_classifier(models)
    good = install_model(models, "ct-tissue-seg")
    max_attempts = 3
    with run_deployment(
        tmp_path,
        pg_url,
        broker.url(),
        models_dir=models,
        routing_rules=write_rules(tmp_path / "routing.yaml", [poison, good]),
        series_quiet_seconds=2,
        job_max_attempts=max_attempts,
        job_lease_seconds=10,
        reconcile_interval_seconds=1,
        requeue_after_seconds=5,
    ) as deployment:
        study = generate_uid()
        for n in range(3):
            write_ct_series(
                tmp_path / "studies" / f"s{n}", slices=8, size=96, seed=n, study_uid=study, series_number=n + 1
            )
        sent = run_storescu(tmp_path / "studies", port=deployment.scp_port, aec="INFERGATE")
        assert sent.returncode == 0, sent.stderr

        def settled() -> bool:
            jobs = deployment.jobs()
            return len(jobs) == 6 and all(job.state in (JobState.done, JobState.failed) for job in jobs)

        wait_for(settled, 120, "all six jobs settled")
        jobs = deployment.jobs()
        poisoned = [job for job in jobs if job.model_id == poison]
        others = [job for job in jobs if job.model_id == good]
        assert {job.state for job in others} == {JobState.done}, deployment.logs()
        assert {job.state for job in poisoned} == {JobState.failed}, deployment.logs()
        for job in poisoned:
            assert job.error is not None and poison in job.error and "Invalid rank" in job.error, job.error
            assert 1 <= job.attempts <= max_attempts
        segs, srs = results_in_pacs(deployment.pacs, timeout=30, srs_expected=3, segs_expected=3)
        assert (len(segs), len(srs)) == (3, 3)

        # No redelivery loop: several reconcile periods later nothing ran again.
        attempts = {job.id: job.attempts for job in deployment.jobs()}
        deliveries = len(re.findall(r"run_model\[[0-9a-f-]+\] received", deployment.worker.log_text()))
        time.sleep(3 * 5 + 2)
        assert {job.id: job.attempts for job in deployment.jobs()} == attempts
        assert len(re.findall(r"run_model\[[0-9a-f-]+\] received", deployment.worker.log_text())) == deliveries
        assert broker.queue_length(GPU_QUEUE) == 0
        print(f"poison error: {(poisoned[0].error or '')[:200]}")  # noqa: T201


@pytest.mark.timeout(300)
def test_job_that_kills_its_worker_every_time_fails_after_the_configured_attempts(
    tmp_path: Path, pg_url: str, broker: RedisServer
) -> None:
    """A model that takes its process down (a native crash, the OOM killer) must not loop forever.

    Celery requeues the message of a lost worker (``task_reject_on_worker_lost``); the SQL lease
    drops that copy, the reconciler re-sends the job once the lease expired, and the claim counts
    the attempts: after ``job_max_attempts`` runs without an outcome the job is failed.
    """
    models = tmp_path / "models"
    crashing = slow_segmentation(models, overlap=0.96)
    good = install_model(models, "ct-tissue-seg")
    max_attempts, lease = 2, 5
    with run_deployment(
        tmp_path,
        pg_url,
        broker.url(),
        models_dir=models,
        routing_rules=write_rules(tmp_path / "routing.yaml", [crashing, good]),
        series_quiet_seconds=2,
        onnx_threads=1,
        job_max_attempts=max_attempts,
        job_lease_seconds=lease,
        reconcile_interval_seconds=1,
        requeue_after_seconds=lease,
    ) as deployment:
        send_ct(deployment, slices=4, size=128)
        killed: set[int] = set()
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            job = _job(deployment, crashing)
            if job is not None and job.state == JobState.failed:
                break
            if job is not None and job.state == JobState.running and job.attempts not in killed:
                for pid in _pool_processes(deployment):
                    kill_pid(pid)
                killed.add(job.attempts)
            time.sleep(0.05)
        job = _job(deployment, crashing)
        assert job is not None and job.state == JobState.failed, deployment.logs()
        assert killed == set(range(1, max_attempts + 1)), killed
        assert job.attempts == max_attempts + 1  # the claim that found the attempts used up
        assert job.error is not None and f"gave up after {max_attempts} attempts" in job.error, job.error

        def good_done() -> bool:
            other = _job(deployment, good)
            return other is not None and other.state == JobState.done

        wait_for(good_done, 60, "the other model's job done")
        time.sleep(3 * lease)
        job = _job(deployment, crashing)
        assert job is not None and job.state == JobState.failed and job.attempts == max_attempts + 1
        runs = re.findall(rf"job {job.id}: running", deployment.worker.log_text())
        assert len(runs) == max_attempts, deployment.worker.log_text()[-6000:]


@pytest.mark.timeout(300)
def test_a_hung_job_is_stopped_by_its_time_limit_and_fails_after_its_attempts(
    tmp_path: Path, pg_url: str, broker: RedisServer
) -> None:
    """A job's lease is renewed while it runs, so only the time limit ends a model that never returns.

    Celery kills the pool process past ``job_time_limit_seconds``; the job is then retried like after a
    crash and, still too slow each time, ends ``failed`` after its attempts while the other job is done.
    """
    models = tmp_path / "models"
    slow = slow_segmentation(models)  # a few seconds per slice: far above the limit below
    good = install_model(models, "ct-tissue-seg")
    max_attempts, lease, limit = 2, 4, 3
    with run_deployment(
        tmp_path,
        pg_url,
        broker.url(),
        models_dir=models,
        routing_rules=write_rules(tmp_path / "routing.yaml", [slow, good]),
        series_quiet_seconds=2,
        onnx_threads=1,
        job_max_attempts=max_attempts,
        job_lease_seconds=lease,
        job_time_limit_seconds=limit,
        reconcile_interval_seconds=1,
        requeue_after_seconds=lease,
    ) as deployment:
        send_ct(deployment, slices=8, size=128)

        def settled() -> bool:
            job = _job(deployment, slow)
            return job is not None and job.state in (JobState.failed, JobState.done)

        wait_for(settled, 200, "the hung job settled")
        job = _job(deployment, slow)
        assert job is not None and job.state == JobState.failed, _state(deployment)
        assert job.error is not None and f"gave up after {max_attempts} attempts" in job.error, job.error
        log = deployment.worker.log_text()
        assert "TimeLimitExceeded" in log or "Hard time limit" in log, log[-4000:]
        other = _job(deployment, good)
        assert other is not None and other.state == JobState.done, _state(deployment)
