"""Production layout: PostgreSQL + Redis + separate ``scp``/``api``/``worker`` processes, Orthanc as the PACS.

These tests use the real servers this machine runs and a real Orthanc; results must end up stored
in Orthanc (asserted over its REST API) and recorded in PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from infergate.store.migrate import upgrade
from infergate.store.tables import Finding, Job, JobState, Measurement
from tests.data.make_series import SeriesInfo, write_ct_series
from tests.helpers.dicom_validation import dciodvfy_errors
from tests.helpers.node import NodeProcess, node_env, wait_for_http, wait_for_results
from tests.helpers.peers import Orthanc, free_port, run_storescu, wait_for_port

pytestmark = pytest.mark.integration


@dataclass
class Deployment:
    tmp: Path
    env: dict[str, str]
    database_url: str
    pacs: Orthanc
    scp_port: int
    api: str
    scp: NodeProcess
    api_process: NodeProcess
    worker: NodeProcess

    def start_worker(self) -> NodeProcess:
        self.worker = NodeProcess(["worker"], self.env, self.tmp / "worker.log").start()
        return self.worker

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.log_path.name}\n{p.log_text()[-8000:]}" for p in (self.scp, self.api_process, self.worker)
        )


@pytest.fixture
def deployment(request: pytest.FixtureRequest, tmp_path: Path, pg_url: str, redis_db: str) -> Iterator[Deployment]:
    """The node as separate processes; ``indirect`` parametrisation may name the only model to route to."""
    only_model = getattr(request, "param", None)
    extra = {}
    if only_model:
        rules = tmp_path / "routing.yaml"
        rules.write_text(f"rules:\n  - name: CT\n    match: {{modality: [CT]}}\n    models: [{only_model}]\n")
        extra["routing_rules"] = rules
    engine = create_engine(pg_url)
    upgrade(engine)
    engine.dispose()
    scp_port, api_port = free_port(), free_port()
    with Orthanc(tmp_path / "orthanc", aet="ORTHANC") as pacs:
        env = node_env(
            data_dir=tmp_path / "var",
            database_url=pg_url,
            broker_url=redis_db,
            scp_port=scp_port,
            api_port=api_port,
            series_quiet_seconds=3,
            pacs=f"ORTHANC@127.0.0.1:{pacs.dicom_port}",
            job_lease_seconds=20,
            reconcile_interval_seconds=2,
            requeue_after_seconds=600,  # follow-up work must be sent by the tasks, not the reconciler
            **extra,
        )
        scp = NodeProcess(["scp"], env, tmp_path / "scp.log").start()
        api = NodeProcess(["api"], env, tmp_path / "api.log").start()
        worker = NodeProcess(["worker"], env, tmp_path / "worker.log").start()
        deployment = Deployment(tmp_path, env, pg_url, pacs, scp_port, f"http://127.0.0.1:{api_port}", scp, api, worker)
        try:
            wait_for_port("127.0.0.1", scp_port, timeout=60)
            wait_for_http(f"{deployment.api}/health", timeout=60)
            yield deployment
        except BaseException:
            print(deployment.logs())  # noqa: T201
            raise
        finally:
            for process in (deployment.worker, api, scp):
                process.stop()


def _send_ct(deployment: Deployment, slices: int = 100, size: int = 512) -> SeriesInfo:
    info = write_ct_series(deployment.tmp / "ct", slices=slices, size=size)
    sent = run_storescu(info.folder, port=deployment.scp_port, aec="INFERGATE")
    assert sent.returncode == 0, sent.stderr
    return info


def _results_in_pacs(pacs: Orthanc, timeout: float, srs_expected: int) -> tuple[list[str], list[str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        segs = pacs.find("Instance", {"Modality": "SEG"})
        srs = pacs.find("Instance", {"Modality": "SR"})
        if len(segs) >= 1 and len(srs) >= srs_expected:
            return segs, srs
        time.sleep(0.5)
    return pacs.find("Instance", {"Modality": "SEG"}), pacs.find("Instance", {"Modality": "SR"})


def test_series_ends_in_orthanc_and_postgresql(deployment: Deployment) -> None:
    info = _send_ct(deployment)
    results = wait_for_results(deployment.api, info.study_uid, timeout=3 + 90, jobs=2)
    states = {job["model_id"]: job["state"] for series in results["series"] for job in series["jobs"]}
    assert states == {"ct-tissue-seg": "done", "ct-bone-classifier": "done"}, deployment.logs()

    segs, srs = _results_in_pacs(deployment.pacs, timeout=10, srs_expected=2)
    assert len(segs) == 1 and len(srs) == 2  # one SR per job: the segmentation's and the classifier's
    for instance_id in segs + srs:
        path = deployment.tmp / f"{instance_id}.dcm"
        path.write_bytes(deployment.pacs.instance_file(instance_id))
        assert dciodvfy_errors(path) == [], path
        tags = deployment.pacs.instance_tags(instance_id)
        assert tags["StudyInstanceUID"] == info.study_uid

    engine = create_engine(deployment.database_url)
    with Session(engine) as session:
        jobs = session.scalars(select(Job)).all()
        assert {job.state for job in jobs} == {JobState.done}
        assert session.scalars(select(Finding)).all(), "classification findings recorded"
        volumes = {m.segment_label: m.value for m in session.scalars(select(Measurement))}
        assert set(volumes) == {"Soft tissue", "Fat", "Lung", "Bone", "Body"} and all(v > 0 for v in volumes.values())
    engine.dispose()


@pytest.mark.parametrize("deployment", ["ct-tissue-seg"], indirect=True)
def test_worker_killed_mid_job_finishes_after_restart(deployment: Deployment) -> None:
    info = _send_ct(deployment)
    engine = create_engine(deployment.database_url)
    deadline = time.monotonic() + 60
    killed = False
    while time.monotonic() < deadline and not killed:
        with Session(engine) as session:
            if session.scalar(select(Job.id).where(Job.state == JobState.running)) is not None:
                deployment.worker.kill()  # SIGKILL the worker's whole process group mid-job
                killed = True
        time.sleep(0.05)
    assert killed, "no job was seen running"
    with Session(engine) as session:
        assert session.scalar(select(Job.id).where(Job.state == JobState.running)) is not None

    deployment.start_worker()
    # lease (20 s) + reconciler period + the job itself
    results = wait_for_results(deployment.api, info.study_uid, timeout=20 + 90, jobs=1)
    states = {job["model_id"]: job["state"] for series in results["series"] for job in series["jobs"]}
    assert states == {"ct-tissue-seg": "done"}, deployment.logs()
    _results_in_pacs(deployment.pacs, timeout=10, srs_expected=1)
    time.sleep(2)  # a late duplicate delivery would show up here
    segs, srs = _results_in_pacs(deployment.pacs, timeout=1, srs_expected=1)
    assert len(segs) == 1, segs
    assert len(srs) == 1, srs
    with Session(engine) as session:
        attempts = {job.model_id: job.attempts for job in session.scalars(select(Job))}
    assert max(attempts.values()) >= 2, attempts
    engine.dispose()
