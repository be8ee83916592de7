"""Never lose a study: graceful shutdown (row 27 of issue 5).

* SIGTERM to the worker during a job (what ``docker stop`` and ``infergate up`` send to its main
  process): Celery's warm shutdown lets the running task finish; its export goes out once a worker
  runs again, and the job is not run a second time.
* SIGTERM to the worker's whole process group (systemd's default ``KillMode=control-group``): the
  pool process dies with the job, which comes back once its lease expired and finishes once.
* SIGTERM to the SCP during a transfer: the process exits promptly and cleanly; every instance the
  sender got Success for is stored intact, nothing partial is left, the sender sees no Success for
  what was not stored, and a re-send after the restart completes the series.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from infergate.store.tables import Job, JobState
from tests.data.make_series import write_ct_series
from tests.helpers.deployment import (
    Deployment,
    RedisServer,
    child_pids,
    results_in_pacs,
    run_deployment,
    send_ct,
    slow_segmentation,
    wait_for,
    write_rules,
)
from tests.reliability.scp_harness import SUCCESS, ScpProcess, Sender, assert_consistent, migrate

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def _job(deployment: Deployment) -> Job | None:
    jobs = deployment.jobs()
    return jobs[0] if jobs else None


def _running(deployment: Deployment, attempt: int = 1) -> bool:
    job = _job(deployment)
    return job is not None and job.state == JobState.running and job.attempts == attempt


def _settled(deployment: Deployment) -> bool:
    job = _job(deployment)
    return job is not None and job.state in (JobState.done, JobState.failed)


def _one_seg_and_sr(deployment: Deployment) -> None:
    segs, srs = results_in_pacs(deployment.pacs, timeout=30, srs_expected=1)
    time.sleep(2)  # a late duplicate would show up here
    segs, srs = results_in_pacs(deployment.pacs, timeout=1, srs_expected=1)
    assert (len(segs), len(srs)) == (1, 1)
    assert [kind for _, kind, _ in deployment.result_objects()] == ["SEG", "SR"]


@pytest.mark.timeout(300)
def test_sigterm_to_the_worker_lets_the_running_job_finish(tmp_path: Path, pg_url: str, broker: RedisServer) -> None:
    models = tmp_path / "models"
    model = slow_segmentation(models)  # about 10 s for 4 slices
    with run_deployment(
        tmp_path,
        pg_url,
        broker.url(),
        models_dir=models,
        routing_rules=write_rules(tmp_path / "routing.yaml", [model]),
        series_quiet_seconds=2,
        onnx_threads=1,
        job_lease_seconds=10,
        reconcile_interval_seconds=1,
        requeue_after_seconds=600,  # the job must not need the reconciler
    ) as deployment:
        send_ct(deployment, slices=4, size=128)
        wait_for(lambda: _running(deployment), 60, "the job running")
        time.sleep(2)
        worker = deployment.worker
        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)  # the main process only, as docker stop does
        stopped = time.monotonic()
        assert worker.process.wait(timeout=120) == 0, worker.log_text()[-6000:]
        job = _job(deployment)
        assert job is not None and job.state in (JobState.exporting, JobState.done), worker.log_text()[-6000:]
        assert job.attempts == 1
        print(f"the worker finished the job and exited {time.monotonic() - stopped:.1f} s after SIGTERM")  # noqa: T201

        deployment.start_worker()  # the export message waits in Redis for it
        wait_for(lambda: _settled(deployment), 60, "the job settled")
        job = _job(deployment)
        assert job is not None and job.state == JobState.done and job.attempts == 1, deployment.logs()
        _one_seg_and_sr(deployment)


@pytest.mark.timeout(300)
def test_sigterm_to_the_worker_process_group_requeues_the_job(tmp_path: Path, pg_url: str, broker: RedisServer) -> None:
    lease = 10
    models = tmp_path / "models"
    model = slow_segmentation(models)
    with run_deployment(
        tmp_path,
        pg_url,
        broker.url(),
        models_dir=models,
        routing_rules=write_rules(tmp_path / "routing.yaml", [model]),
        series_quiet_seconds=2,
        onnx_threads=1,
        job_lease_seconds=lease,
        reconcile_interval_seconds=1,
        requeue_after_seconds=lease,
    ) as deployment:
        send_ct(deployment, slices=4, size=128)
        wait_for(lambda: _running(deployment), 60, "the job running")
        time.sleep(2)
        worker = deployment.worker
        assert worker.process is not None and child_pids(worker.pid)
        worker.signal_group(signal.SIGTERM)
        stopped = time.monotonic()
        code = worker.process.wait(timeout=120)
        print(f"worker exit code {code} {time.monotonic() - stopped:.1f} s after SIGTERM")  # noqa: T201
        deployment.start_worker()
        wait_for(lambda: _settled(deployment), lease + 60 + 30, "the job settled")
        job = _job(deployment)
        assert job is not None and job.state == JobState.done, deployment.logs()
        print(f"attempts: {job.attempts}")  # noqa: T201
        _one_seg_and_sr(deployment)


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("verbatim_sends")
def test_sigterm_to_the_scp_during_a_transfer_keeps_every_acknowledged_instance(
    tmp_path: Path, pg_url: str, scp_process: Callable[..., ScpProcess]
) -> None:
    settings = migrate(tmp_path / "var", pg_url)
    scp = scp_process(settings).start()
    series = write_ct_series(tmp_path / "ct", slices=60, size=512, seed=3)
    acknowledged: dict[str, Path] = {}
    answers: list[int | None] = []
    sender = Sender(scp.port)
    sender.connect()

    def send() -> None:
        for path, uid in zip(series.paths, series.sop_instance_uids, strict=True):
            status = sender.store(path)
            answers.append(status)
            if status != SUCCESS:
                return
            acknowledged[uid] = path
        sender.close()  # A-RELEASE: the association completed

    thread = threading.Thread(target=send, name="sender", daemon=True)
    thread.start()
    wait_for(lambda: len(acknowledged) >= 10, 60, "ten instances acknowledged", interval=0.005)
    assert scp.process is not None
    scp.process.send_signal(signal.SIGTERM)  # the main process, as docker stop and `infergate up` do
    signalled = time.monotonic()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the association neither completed nor ended after SIGTERM"
    ended = time.monotonic()
    code = scp.process.wait(timeout=30)  # promptly once the association is over
    assert code == 0, scp.log_text()
    if len(acknowledged) == len(series.paths):
        outcome = "completed (every instance acknowledged, then released)"
    else:
        # aborted: the sender saw no Success for the instance in flight, and stops there
        assert answers[-1] != SUCCESS and len(answers) == len(acknowledged) + 1
        outcome = f"aborted after {len(acknowledged)} acknowledged (last answer {answers[-1]})"
    print(  # noqa: T201
        f"association {outcome}, {ended - signalled:.1f} s after SIGTERM; "
        f"the SCP exited {time.monotonic() - ended:.1f} s after that"
    )
    assert_consistent(settings, acknowledged)

    scp.start()
    resend = Sender(scp.port)
    resend.connect()
    for path, uid in zip(series.paths, series.sop_instance_uids, strict=True):
        if uid not in acknowledged:
            assert resend.store(path) == SUCCESS
            acknowledged[uid] = path
    resend.close()
    assert_consistent(settings, acknowledged)
