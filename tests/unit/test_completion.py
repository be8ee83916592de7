"""Series completion and routing into jobs (infergate.completion).

The broker is a process boundary, so the queue is a fake that records what would have been sent.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from infergate.completion import complete_quiet_series, route_followups
from infergate.manifest import (
    ModelPackage,
    load_all,
)
from infergate.reconcile import reconcile
from infergate.routing import RoutingRules, load_rules
from infergate.store import queries
from infergate.store.session import transaction
from infergate.store.tables import Finding, Instance, Job, JobState, Series, SeriesState, utcnow
from tests.helpers.queues import BrokerDown, RecordingQueue

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO_ROOT / "models"
STUDY = "1.2.826.0.1.3680043.8.498.100"
QUIET = timedelta(seconds=5)
CT_MODELS = ["ct-tissue-seg", "ct-bone-classifier"]


@pytest.fixture(scope="module")
def packages() -> dict[str, ModelPackage]:
    """The shipped packages."""
    return load_all(MODELS_DIR, verify_hash=False)


@pytest.fixture(scope="module")
def rules(packages: dict[str, ModelPackage]) -> RoutingRules:
    return load_rules(MODELS_DIR / "routing.yaml", known_models=set(packages))


def _series(
    factory: sessionmaker[Session],
    series_uid: str,
    *,
    instances: int = 20,
    modality: str = "CT",
    image_type: str | None = "ORIGINAL\\PRIMARY\\AXIAL",
    age: timedelta = timedelta(minutes=1),
) -> int:
    """A series with ``instances`` indexed instances, the last received ``age`` ago."""
    with transaction(factory) as session:
        study_id = queries.get_or_create_study(session, STUDY)
        series_id = queries.get_or_create_series(
            session, study_id, series_uid, modality=modality, image_type=image_type, calling_ae="MODALITY"
        )
        session.add_all(
            Instance(
                series_id=series_id,
                sop_instance_uid=f"{series_uid}.{i}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                instance_number=i,
                path=f"instances/{STUDY}/{series_uid}/{series_uid}.{i}.dcm",
                size=1000,
            )
            for i in range(1, instances + 1)
        )
        session.execute(
            update(Series)
            .where(Series.id == series_id)
            .values(num_instances=instances, last_received_at=utcnow() - age)
        )
    return series_id


def _jobs(factory: sessionmaker[Session], series_id: int) -> list[Job]:
    with factory() as session:
        return list(session.scalars(select(Job).where(Job.series_id == series_id).order_by(Job.id)))


def _state(factory: sessionmaker[Session], series_id: int) -> tuple[SeriesState, str | None]:
    with factory() as session:
        series = session.get(Series, series_id)
        assert series is not None
        return series.state, series.routing_note


def test_quiet_series_gets_its_jobs_once(
    session_factory: sessionmaker[Session], rules: RoutingRules, packages: dict[str, ModelPackage]
) -> None:
    series_id = _series(session_factory, "1.2.3.1")
    queue = RecordingQueue()
    routed = complete_quiet_series(session_factory, queue, quiet=QUIET, rules=rules, packages=packages)
    jobs = _jobs(session_factory, series_id)
    assert [r.series_id for r in routed] == [series_id]
    assert routed[0].models == CT_MODELS
    assert [j.model_id for j in jobs] == CT_MODELS
    assert [j.model_version for j in jobs] == [packages[m].manifest.version for m in CT_MODELS]
    assert all(j.state == JobState.queued and j.attempts == 0 for j in jobs)
    assert queue.runs == [j.id for j in jobs] == routed[0].job_ids
    assert queue.exports == []
    state, note = _state(session_factory, series_id)
    assert state == SeriesState.routed
    assert note is not None and "CT volume" in note

    again = RecordingQueue()
    assert complete_quiet_series(session_factory, again, quiet=QUIET, rules=rules, packages=packages) == []
    assert again.runs == []
    assert len(_jobs(session_factory, series_id)) == 2


def test_series_still_receiving_is_not_routed(
    session_factory: sessionmaker[Session], rules: RoutingRules, packages: dict[str, ModelPackage]
) -> None:
    series_id = _series(session_factory, "1.2.3.2", age=timedelta(seconds=1))
    queue = RecordingQueue()
    assert complete_quiet_series(session_factory, queue, quiet=QUIET, rules=rules, packages=packages) == []
    assert queue.runs == []
    assert _state(session_factory, series_id) == (SeriesState.receiving, None)
    assert _jobs(session_factory, series_id) == []


@pytest.mark.parametrize(
    ("modality", "instances", "image_type"),
    [
        ("PT", 20, "ORIGINAL\\PRIMARY"),
        ("CT", 3, "ORIGINAL\\PRIMARY"),
        ("CT", 20, "DERIVED\\SECONDARY"),
        ("CT", 20, None),
    ],
)
def test_series_no_rule_matches_is_unmatched(
    session_factory: sessionmaker[Session],
    rules: RoutingRules,
    packages: dict[str, ModelPackage],
    modality: str,
    instances: int,
    image_type: str | None,
) -> None:
    series_id = _series(session_factory, "1.2.3.3", modality=modality, instances=instances, image_type=image_type)
    queue = RecordingQueue()
    routed = complete_quiet_series(session_factory, queue, quiet=QUIET, rules=rules, packages=packages)
    assert [(r.series_id, r.models, r.job_ids) for r in routed] == [(series_id, [], [])]
    assert _state(session_factory, series_id) == (SeriesState.unmatched, "no routing rule matched")
    assert _jobs(session_factory, series_id) == []
    assert queue.runs == []


def test_matched_models_that_are_not_installed(session_factory: sessionmaker[Session], rules: RoutingRules) -> None:
    series_id = _series(session_factory, "1.2.3.4")
    queue = RecordingQueue()
    complete_quiet_series(session_factory, queue, quiet=QUIET, rules=rules, packages={})
    state, note = _state(session_factory, series_id)
    assert state == SeriesState.unmatched
    assert note is not None and "not installed" in note and "ct-tissue-seg" in note
    assert _jobs(session_factory, series_id) == [] and queue.runs == []


def test_only_installed_models_get_jobs(
    session_factory: sessionmaker[Session], rules: RoutingRules, packages: dict[str, ModelPackage]
) -> None:
    series_id = _series(session_factory, "1.2.3.5")
    queue = RecordingQueue()
    only_seg = {"ct-tissue-seg": packages["ct-tissue-seg"]}
    complete_quiet_series(session_factory, queue, quiet=QUIET, rules=rules, packages=only_seg)
    assert [j.model_id for j in _jobs(session_factory, series_id)] == ["ct-tissue-seg"]
    assert _state(session_factory, series_id)[0] == SeriesState.routed


def test_broker_down_leaves_jobs_queued_for_the_reconciler(
    session_factory: sessionmaker[Session], rules: RoutingRules, packages: dict[str, ModelPackage]
) -> None:
    series_id = _series(session_factory, "1.2.3.6")
    routed = complete_quiet_series(session_factory, BrokerDown(), quiet=QUIET, rules=rules, packages=packages)
    jobs = _jobs(session_factory, series_id)
    assert [j.id for j in jobs] == routed[0].job_ids and len(jobs) == 2
    assert all(j.state == JobState.queued for j in jobs)
    assert _state(session_factory, series_id)[0] == SeriesState.routed

    # The watcher does not route the series again; the reconciler sends what was lost.
    queue = RecordingQueue()
    assert complete_quiet_series(session_factory, queue, quiet=QUIET, rules=rules, packages=packages) == []
    report = reconcile(session_factory, queue, requeue_after=timedelta(0))
    assert sorted(queue.runs) == sorted(j.id for j in jobs)
    assert sorted(report.resent_queued) == sorted(j.id for j in jobs)


def test_several_watchers_route_a_series_once(
    session_factory: sessionmaker[Session], rules: RoutingRules, packages: dict[str, ModelPackage]
) -> None:
    series_ids = [_series(session_factory, f"1.2.3.7.{i}") for i in range(4)]
    queues = [RecordingQueue() for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(queues))

    def watcher(queue: RecordingQueue) -> None:
        start.wait()
        try:
            complete_quiet_series(session_factory, queue, quiet=QUIET, rules=rules, packages=packages)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=watcher, args=(q,)) for q in queues]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    sent = sorted(job_id for q in queues for job_id in q.runs)
    all_jobs = sorted(j.id for s in series_ids for j in _jobs(session_factory, s))
    assert sent == all_jobs and len(all_jobs) == 2 * len(series_ids)


def _finish_with_finding(factory: sessionmaker[Session], job_id: int, name: str) -> None:
    with transaction(factory) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state = JobState.done
        session.add(
            Finding(job_id=job_id, name=name, code_value="1", code_scheme="99X", code_meaning=name, probability=0.9)
        )


@pytest.mark.parametrize(("series_type", "expected"), [("T1w", ["brain-extraction"]), ("FLAIR", [])])
def test_rules_waiting_for_findings_queue_after_the_classifier(
    session_factory: sessionmaker[Session],
    rules: RoutingRules,
    packages: dict[str, ModelPackage],
    series_type: str,
    expected: list[str],
) -> None:
    series_id = _series(session_factory, "1.2.3.9", modality="MR", instances=30)
    routed = complete_quiet_series(session_factory, RecordingQueue(), quiet=QUIET, rules=rules, packages=packages)
    assert [r.models for r in routed] == [["mr-series-type"]]
    _finish_with_finding(session_factory, routed[0].job_ids[0], series_type)
    with transaction(session_factory) as session:
        new = route_followups(session, series_id, rules=rules, packages=packages)
    assert [job.model_id for job in _jobs(session_factory, series_id) if job.id in new] == expected
    with transaction(session_factory) as session:  # asked again, nothing is duplicated
        assert route_followups(session, series_id, rules=rules, packages=packages) == []
