"""Production layout: PostgreSQL + Redis + separate ``scp``/``api``/``worker`` processes, Orthanc as the PACS.

These tests use the real servers this machine runs and a real Orthanc; results must end up stored
in Orthanc (asserted over its REST API) and recorded in PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from infergate.store.tables import Finding, Job, JobState, Measurement
from tests.helpers.deployment import Deployment, results_in_pacs, run_deployment, send_ct, write_rules
from tests.helpers.dicom_validation import dciodvfy_errors
from tests.helpers.node import wait_for_results

pytestmark = pytest.mark.integration


@pytest.fixture
def deployment(request: pytest.FixtureRequest, tmp_path: Path, pg_url: str, redis_db: str) -> Iterator[Deployment]:
    """The node as separate processes; ``indirect`` parametrisation may name the only model to route to."""
    only_model = getattr(request, "param", None)
    extra = {"routing_rules": write_rules(tmp_path / "routing.yaml", [only_model])} if only_model else {}
    # requeue_after: follow-up work must be sent by the tasks, not the reconciler
    with run_deployment(tmp_path, pg_url, redis_db, requeue_after_seconds=600, **extra) as deployment:
        yield deployment


def test_series_ends_in_orthanc_and_postgresql(deployment: Deployment) -> None:
    info = send_ct(deployment)
    results = wait_for_results(deployment.api, info.study_uid, timeout=3 + 90, jobs=2)
    states = {job["model_id"]: job["state"] for series in results["series"] for job in series["jobs"]}
    assert states == {"ct-tissue-seg": "done", "ct-bone-classifier": "done"}, deployment.logs()

    segs, srs = results_in_pacs(deployment.pacs, timeout=10, srs_expected=2)
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
    info = send_ct(deployment)
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
    results_in_pacs(deployment.pacs, timeout=10, srs_expected=1)
    time.sleep(2)  # a late duplicate delivery would show up here
    segs, srs = results_in_pacs(deployment.pacs, timeout=1, srs_expected=1)
    assert len(segs) == 1, segs
    assert len(srs) == 1, srs
    with Session(engine) as session:
        attempts = {job.model_id: job.attempts for job in session.scalars(select(Job))}
    assert max(attempts.values()) >= 2, attempts
    engine.dispose()
